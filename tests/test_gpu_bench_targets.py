"""benchmarks/gpu_bench.py without a GPU: the issues' targets as a pure function of result rows
(pass, fail, missing, errored; the CUDA and the Triton rows of two runs; the peak-memory row and
its units), the --check-targets mode over result files, the JSON file rewritten after every row,
the stop on a device error, an unavailable implementation refused before timing, the next
lease's flags; and triton_bwd_ablation.py's timer and exit status."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import factorcl_ext

from conftest import load_benchmark

gb = load_benchmark("gpu_bench")

CONCAT = dict(critic="concat", dtype="bf16", n=4096, m=4096, layers=1, hidden=512, dim=128)
SEPARABLE = dict(critic="separable", dtype="bf16", n=65536, m=65536, dim=512)


def _row(impl, ms=100.0, pct=None, peak=800.0, pass_name="fwd+bwd", **case):
    """A measured row; ``pct``: its % of ``peak`` (tflops set to match)."""
    row = {**CONCAT, **case, "impl": impl, "pass": pass_name, "ms": ms, "runs": 10}
    if pct is not None:
        row["tflops"] = pct * peak / 100
        row["matmul_peak_tflops"] = peak
        row["pct_peak"] = pct
    return row


def _by_name(records):
    return {r["name"]: r for r in records}


ALL_TARGETS = ["triton_concat_rate", "triton_concat_vs_chunked", "triton_concat_memory",
               "triton_separable_vs_matmuls", "cuda_concat_rate", "cuda_concat_vs_triton"]


def _passing_triton_rows():
    return [
        _row("triton", ms=100.0, pct=55.0),
        _row("chunked", ms=250.0, pct=20.0),
        _row("triton", ms=2000.0, n=16384, m=16384, peak_extra_bytes=500 * 2**20),
        _row("triton", ms=30.0, **SEPARABLE),
        _row("matmuls", ms=25.0, products=gb.YARDSTICK["fwd+bwd"], **SEPARABLE),
    ]


# --------------------------------------------------------------------------------------------
# the targets
# --------------------------------------------------------------------------------------------


def test_every_target_is_reported_even_with_no_rows():
    recs = gb.check_targets([])
    assert [r["name"] for r in recs] == ALL_TARGETS
    for r in recs:
        assert r["status"] == "NOT MEASURED" and r["passed"] is None and r["value"] is None
        assert r["reason"].startswith("no ")
        assert "NOT MEASURED" in gb.format_target(r) and "not measured: no " in gb.format_target(r)


def test_triton_targets_pass_and_the_records_name_their_rows():
    recs = _by_name(gb.check_targets(_passing_triton_rows()))
    for name in ALL_TARGETS[:4]:
        assert recs[name]["status"] == "PASS" and recs[name]["passed"] is True, recs[name]
        assert "PASS" in gb.format_target(recs[name])
    rate = recs["triton_concat_rate"]
    assert rate["value"] == pytest.approx(55.0) and rate["threshold"] == 50.0
    assert rate["comparison"] == ">="
    (used,) = rate["rows"]
    assert used["key"] == {"impl": "triton", "critic": "concat", "dtype": "bf16", "layers": 1,
                           "n": 4096, "m": 4096, "hidden": 512, "pass": "fwd+bwd"}
    assert used["fields"]["matmul_peak_tflops"] == 800.0 and used["fields"]["ms"] == 100.0
    assert recs["triton_concat_vs_chunked"]["value"] == pytest.approx(2.5)
    assert recs["triton_separable_vs_matmuls"]["value"] == pytest.approx(1.2)
    assert [r["key"]["impl"] for r in recs["triton_separable_vs_matmuls"]["rows"]] == [
        "triton", "matmuls"]
    assert recs["triton_separable_vs_matmuls"]["rows"][0]["key"]["dim"] == 512
    # no CUDA rows: its targets are there, not measured, and say why
    for name in ("cuda_concat_rate", "cuda_concat_vs_triton"):
        assert recs[name]["status"] == "NOT MEASURED"
        assert "no cuda concat bf16 N=M=4096 H=512 L=1 fwd+bwd row" in recs[name]["reason"]


def test_triton_targets_fail():
    rows = [_row("triton", ms=100.0, pct=49.9), _row("chunked", ms=199.0),
            _row("triton", ms=40.0, **SEPARABLE), _row("matmuls", ms=25.0, **SEPARABLE)]
    recs = _by_name(gb.check_targets(rows))
    for name in ("triton_concat_rate", "triton_concat_vs_chunked",
                 "triton_separable_vs_matmuls"):
        assert recs[name]["status"] == "FAIL" and recs[name]["passed"] is False
        assert gb.format_target(recs[name]).startswith("FAIL")
    # a matmuls row without ``products`` is the old yardstick (G H^T and three S H): said so
    assert "older yardstick" in recs["triton_separable_vs_matmuls"]["detail"]


def test_errored_or_other_rows_are_not_used():
    rows = [_row("triton", ms=None, error="OOM"),
            _row("triton", ms=50.0, pct=90.0, pass_name="fwd"),  # forward only
            _row("triton", ms=50.0, pct=90.0, dtype="fp32"),
            _row("triton", ms=50.0, pct=90.0, layers=0),
            _row("triton_det", ms=50.0, pct=90.0),
            _row("triton", ms=50.0, pct=90.0, hidden=256)]
    del rows[0]["ms"]
    rec = _by_name(gb.check_targets(rows))["triton_concat_rate"]
    assert rec["status"] == "NOT MEASURED"
    assert rec["reason"] == "triton concat bf16 N=M=4096 H=512 L=1 fwd+bwd errored: OOM"
    # a good row beside an errored one is used
    rec = _by_name(gb.check_targets(rows + [_row("triton", ms=80.0, pct=51.0)]))
    assert rec["triton_concat_rate"]["status"] == "PASS"


def test_cuda_needs_60_percent_and_triton_speed_each_row_against_its_own_peak():
    """The CUDA and Triton rows come from two runs with two matmul rates: each row's own."""
    triton = _row("triton", ms=100.0, pct=55.0, peak=800.0)
    cuda = _row("cuda", ms=90.0, pct=58.0, peak=700.0)
    recs = _by_name(gb.check_targets([triton, cuda]))
    assert recs["triton_concat_rate"]["status"] == "PASS"
    assert recs["cuda_concat_rate"]["status"] == "FAIL"  # 58 % passes Triton's 50 %, not 60 %
    assert recs["cuda_concat_rate"]["threshold"] == 60.0
    assert recs["cuda_concat_rate"]["value"] == pytest.approx(58.0)
    assert recs["cuda_concat_rate"]["rows"][0]["fields"]["matmul_peak_tflops"] == 700.0
    faster = recs["cuda_concat_vs_triton"]
    assert faster["status"] == "PASS" and faster["value"] == pytest.approx(0.9)
    assert [r["key"]["impl"] for r in faster["rows"]] == ["cuda", "triton"]
    slower = _by_name(gb.check_targets([triton, dict(cuda, ms=101.0)]))["cuda_concat_vs_triton"]
    assert slower["status"] == "FAIL"
    rec = _by_name(gb.check_targets([dict(cuda, tflops=0.61 * 700)]))["cuda_concat_rate"]
    assert rec["status"] == "PASS"
    # a row without its own peak takes the one given
    bare = {k: v for k, v in cuda.items() if k not in ("matmul_peak_tflops", "pct_peak")}
    rec = _by_name(gb.check_targets([bare], {"bf16": 580.0}))["cuda_concat_rate"]
    assert rec["value"] == pytest.approx(70.0)
    assert _by_name(gb.check_targets([bare]))["cuda_concat_rate"]["status"] == "NOT MEASURED"


def test_peak_memory_reads_exactly_the_bf16_l1_concat_forward_backward_row_in_bytes():
    big = dict(n=16384, m=16384)
    others = [  # none of these is the target's row
        _row("triton", pass_name="fwd", peak_extra_bytes=5 * 2**30, **big),
        _row("triton", dtype="fp32", peak_extra_bytes=5 * 2**30, **big),
        _row("triton", layers=0, peak_extra_bytes=5 * 2**30, **big),
        _row("triton_det", peak_extra_bytes=5 * 2**30, **big),
        _row("cuda", peak_extra_bytes=5 * 2**30, **big),
        _row("triton", peak_extra_bytes=10),  # N = 4096
    ]
    rec = _by_name(gb.check_targets(others))["triton_concat_memory"]
    assert rec["status"] == "NOT MEASURED"
    assert "no triton concat bf16 N=M=16384 H=512 L=1 fwd+bwd row" in rec["reason"]

    def verdict(nbytes):
        rows = others + [_row("triton", peak_extra_bytes=nbytes, peak_extra_mib=nbytes / 2**20,
                              **big)]
        return _by_name(gb.check_targets(rows))["triton_concat_memory"]

    ok = verdict(900 * 2**20)  # 943.7 MB
    assert ok["status"] == "PASS" and ok["value"] == 900 * 2**20 and ok["threshold"] == 1e9
    assert ok["rows"][0]["fields"]["peak_extra_bytes"] == 900 * 2**20
    line = gb.format_target(ok)
    assert "0.944 GB < 1 GB" in line and "900.0 MiB" in line, line
    # 960 MiB is under 1 GiB but over 1 GB (1e9 bytes): the target says GB
    bad = verdict(960 * 2**20)
    assert bad["status"] == "FAIL" and "1.007 GB < 1 GB" in gb.format_target(bad)
    errored = _by_name(gb.check_targets(others + [_row("triton", error="OOM", **big)]))
    assert "errored: OOM" in errored["triton_concat_memory"]["reason"]


# --------------------------------------------------------------------------------------------
# --check-targets over result files
# --------------------------------------------------------------------------------------------


def _result_file(path: Path, rows, peak=800.0, complete=True):
    path.write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "complete": complete,
                                "aborted": None if complete else "terminated by SIGTERM",
                                "matmul_peak_tflops": {"bf16": peak}, "rows": rows}))
    return path


def test_check_targets_cli_joins_the_rows_of_two_runs(tmp_path, capsys):
    triton = _result_file(tmp_path / "gpu_bench-a.json", _passing_triton_rows())
    cuda = _result_file(tmp_path / "gpu_bench-b.json", [_row("cuda", ms=95.0, pct=61.0,
                                                             peak=790.0)], complete=False)
    # cuda against triton: a ratio, measured side by side or not at all (it compared the rows
    # of two runs, two processes with two matmul rates)
    assert gb.main(["--check-targets", str(triton), str(cuda)]) == 0
    out = capsys.readouterr().out
    assert ("NOT MEASURED cuda_concat_vs_triton" in out and "no run timed cuda and triton side "
            f"by side (a ratio is measured in one run): cuda in {cuda}; triton in {triton}"
            in out), out
    assert out.count(" PASS ") == 5, out
    cuda = _result_file(tmp_path / "gpu_bench-b.json", [
        _row("cuda", ms=95.0, pct=61.0, peak=790.0), _row("triton", ms=100.0, pct=57.0,
                                                          peak=790.0)], complete=False)
    assert gb.main(["--check-targets", str(triton), str(cuda)]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("# target: ")]
    assert len(lines) == 6, out
    assert all(line.split()[2] == "PASS" for line in lines), out
    assert "cuda_concat_vs_triton" in out and "cuda 95.000 ms, triton 100.000 ms" in out
    assert "INCOMPLETE (terminated by SIGTERM)" in out
    # a directory: its gpu_bench-*.json
    assert gb.main(["--check-targets", str(tmp_path)]) == 0
    assert capsys.readouterr().out.count(" PASS ") == 6
    # the rows carry their source file into the records
    rows, _ = gb.load_results([triton, cuda])
    recs = _by_name(gb.check_targets(rows))
    assert [r["key"]["source"] for r in recs["cuda_concat_vs_triton"]["rows"]] == [str(cuda)] * 2
    # a single-row target reads the last run that has its row (here the second file's triton)
    assert [r["key"]["source"] for r in recs["triton_concat_rate"]["rows"]] == [str(cuda)]
    # the triton-vs-chunked ratio: the first file is the run holding both
    assert [r["key"]["source"] for r in recs["triton_concat_vs_chunked"]["rows"]] == \
        [str(triton)] * 2


def test_check_targets_reads_files_written_before_the_per_row_peak(tmp_path, capsys):
    """Older files: one matmul rate per file, peak memory as ``peak_mb`` (MiB)."""
    old = [{k: v for k, v in _row("triton", ms=100.0, pct=12.5).items()
            if k not in ("matmul_peak_tflops", "pct_peak", "m")},
           {**{k: v for k, v in _row("triton", n=16384).items() if k != "m"}, "peak_mb": 980.0}]
    path = _result_file(tmp_path / "old.json", old, peak=400.0)
    rows, _ = gb.load_results([path])
    recs = _by_name(gb.check_targets(rows))
    assert recs["triton_concat_rate"]["value"] == pytest.approx(25.0)  # 100 of 400 TFLOP/s
    assert recs["triton_concat_memory"]["value"] == pytest.approx(980 * 2**20)
    assert recs["triton_concat_memory"]["status"] == "FAIL"  # 1.03 GB


def test_check_targets_cli_refuses_unreadable_files(tmp_path, capsys):
    assert gb.main(["--check-targets", str(tmp_path / "missing.json")]) == 2
    (tmp_path / "bad.json").write_text("{ not json")
    assert gb.main(["--check-targets", str(tmp_path / "bad.json")]) == 2
    (tmp_path / "other.json").write_text("{}")
    assert gb.main(["--check-targets", str(tmp_path / "other.json")]) == 2
    err = capsys.readouterr().err
    assert "missing.json" in err and "bad.json" in err and "no 'rows' list" in err


# --------------------------------------------------------------------------------------------
# the run: implementations, flags, the JSON file, stops
# --------------------------------------------------------------------------------------------

NEXT_LEASE = [  # the bench stages of the next lease's command (benchmarks/README.md)
    "--dtypes bf16 --layers 1 --ns 4096 --sep-ns 65536 --impls triton chunked matmuls",
    "--dtypes bf16 --layers 1 --ns 4096 --sep-ns 65536 --impls cuda triton --warmup 1 --budget 2",
    "--dtypes bf16 --layers 1 --ns 16384 --sep-ns --impls triton --no-autotune --reps 3",
    # triton_dotfused is separable only: with --sep-ns empty this stage planned none of it
    "--dtypes bf16 --layers 1 --ns 4096 --sep-ns 65536 --impls triton_dwslots triton_det "
    "triton_dotfused",
]


def test_next_lease_flags_parse_and_plan_the_target_cases(tmp_path):
    plans = []
    for flags in NEXT_LEASE:
        args = gb.build_parser().parse_args(["--out", str(tmp_path), *flags.split()])
        assert args.out == tmp_path and args.dtypes == ["bf16"] and args.layers == [1]
        plans.append(gb.plan_cases(args, args.impls))
    first, cuda, memory, variants = plans
    assert {c["impl"] for c in first if c["critic"] == "separable"} == {
        "triton", "chunked", "matmuls"}
    assert {c["impl"] for c in first if c["critic"] == "concat"} == {"triton", "chunked"}
    assert len(cuda) == 8 and {c["pass"] for c in cuda} == {"fwd", "fwd+bwd"}
    assert memory == [dict(critic="concat", dtype="bf16", n=16384, m=16384, layers=1,
                           hidden=512, dim=128, impl="triton", **{"pass": p})
                      for p in ("fwd", "fwd+bwd")]
    assert {c["impl"] for c in variants} == {"triton_dwslots", "triton_det", "triton_dotfused"}
    # every target's rows are planned by one stage: a ratio's two rows by the same stage
    for needs in [[("triton", gb.CONCAT_CASE), ("chunked", gb.CONCAT_CASE)],
                  [("triton", gb.MEMORY_CASE)],
                  [("triton", gb.SEPARABLE_CASE), ("matmuls", gb.SEPARABLE_CASE)],
                  [("cuda", gb.CONCAT_CASE), ("triton", gb.CONCAT_CASE)]]:
        assert any(all(any(gb._matches(c, impl, case) for c in plan) for impl, case in needs)
                   for plan in plans), needs
    args = gb.build_parser().parse_args(["--warmup", "2", "--budget", "1.5"])
    assert args.warmup == 2 and args.budget == 1.5 and args.impls is None


def test_help_works():
    done = subprocess.run([sys.executable, str(Path(gb.__file__)), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--check-targets" in done.stdout and "--no-autotune" in done.stdout


def test_without_a_gpu_the_run_says_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _keep_global_settings(monkeypatch)
    assert gb.main(["--out", str(tmp_path), "--impls", "triton", "--ns", "8", "--sep-ns"]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def _no_cuda_kernels(monkeypatch):
    info = dict(factorcl_ext.build_info(), cuda_kernels=False)
    monkeypatch.setattr(factorcl_ext, "build_info", lambda: dict(info))


def _refuse_timing(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("timed before refusing")
    monkeypatch.setattr(gb, "matmul_peak", fail)
    monkeypatch.setattr(gb, "measure_case", fail)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_an_unavailable_implementation_stops_the_run_before_timing(monkeypatch, tmp_path,
                                                                   capsys):
    _no_cuda_kernels(monkeypatch)
    _refuse_timing(monkeypatch)
    _keep_global_settings(monkeypatch)
    rc = gb.main(["--out", str(tmp_path), "--impls", "triton", "cuda", "--ns", "8"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--impls cuda is not available" in err[0], err
    assert "cuda_kernels" in err[0]
    assert list(tmp_path.iterdir()) == []
    # by default cuda is left out, and said so
    impls, notes = gb.resolve_impls(None, factorcl_ext.build_info())
    assert "cuda" not in impls and "triton" in impls and "cuda left out" in notes[0]


def test_nothing_to_time_is_refused(monkeypatch, tmp_path, capsys):
    _refuse_timing(monkeypatch)
    _keep_global_settings(monkeypatch)
    assert gb.main(["--out", str(tmp_path), "--impls", "matmuls", "--sep-ns"]) == 2
    assert "nothing to time" in capsys.readouterr().err
    # one implementation named that nothing would time (a separable-only one without --sep-ns):
    # the last stage of the next lease's command planned no triton_dotfused row without a word
    assert gb.main(["--out", str(tmp_path), "--impls", "triton", "matmuls", "--sep-ns"]) == 2
    assert "nothing to time for --impls matmuls with --ns" in capsys.readouterr().err


def test_profile_kernels_refuses_an_unavailable_backend(monkeypatch, capsys):
    _no_cuda_kernels(monkeypatch)
    monkeypatch.setitem(sys.modules, "gpu_bench", gb)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    pk = load_benchmark("profile_kernels")
    with pytest.raises(SystemExit) as exc:
        pk.main(["--backends", "cuda", "triton"])
    assert exc.value.code == 2
    assert "--backends cuda is not available" in capsys.readouterr().err


def _keep_global_settings(monkeypatch):
    """main() sets torch's float32 matmul precision and, with --no-autotune, the Triton
    backend's autotuning flag: neither outlives the test. Stand-ins for the device's name and
    for compile_every_case (dynamo's settings)."""
    from factorcl_ext.triton import _config

    monkeypatch.setattr(torch, "set_float32_matmul_precision", lambda precision: None)
    monkeypatch.setattr(_config, "AUTOTUNE", _config.AUTOTUNE)
    monkeypatch.setattr(gb, "compile_every_case", lambda: None)
    monkeypatch.setattr(gb, "device_info", lambda: {"device": "Fake GPU", "capability": "9.0"})


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """main() on stand-ins: a device, matmul rates 800 at the start and 820 at the end, and
    ``measure`` (set by the test) for each case. Yields the list of calls."""
    _keep_global_settings(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    rates = iter([800.0, 820.0])
    monkeypatch.setattr(gb, "matmul_peak", lambda dtype: {"tflops": next(rates), "ms": 1.0})
    state = {"calls": [], "measure": None}

    def measure_case(case, args, cache):
        state["calls"].append(case)
        return state["measure"](case)
    monkeypatch.setattr(gb, "measure_case", measure_case)
    return state


def _files(tmp_path):
    return sorted(tmp_path.glob("gpu_bench-*.json"))


def _timed(ms):
    return {"ms": ms, "min_ms": ms, "max_ms": ms, "q1_ms": ms, "q3_ms": ms, "iqr_ms": 0.0,
            "runs": 3, "peak_extra_bytes": 2**20, "peak_extra_mib": 1.0}


def test_the_json_is_written_after_every_row_and_completed_at_the_end(fake_gpu, tmp_path,
                                                                      capsys):
    seen = []

    def measure(case):
        files = _files(tmp_path)
        assert len(files) == 1  # one path for the whole run, there before the first row
        doc = json.loads(files[0].read_text())
        assert doc["complete"] is False and doc["matmul_peak_tflops"] == {"bf16": 800.0}
        seen.append(len(doc["rows"]))
        assert len(doc["targets"]) == 6
        return _timed(10.0)
    fake_gpu["measure"] = measure
    rc = gb.main(["--out", str(tmp_path), "--dtypes", "bf16", "--layers", "0", "1", "--ns",
                  "64", "--sep-ns", "128", "--impls", "triton", "chunked", "--no-autotune"])
    assert rc == 0
    assert seen == list(range(len(seen))) and len(seen) == 2 * 2 * 2 + 2 * 2
    (path,) = _files(tmp_path)
    doc = json.loads(path.read_text())
    assert doc["complete"] is True and doc["aborted"] is None
    assert doc["matmul_peak"]["start"]["bf16"]["tflops"] == 800.0
    assert doc["matmul_peak"]["end"]["bf16"]["tflops"] == 820.0
    assert doc["matmul_peak_tflops"] == {"bf16": 820.0}  # the larger: conservative
    assert doc["autotune"] is False and len(doc["rows"]) == len(seen)
    for row in doc["rows"]:
        assert row["matmul_peak_tflops"] == 820.0 and row["matmul_peak_basis"] == "max(start, end)"
        assert row["pct_peak"] == pytest.approx(100 * row["tflops"] / 820.0)
        assert row["pairs_per_s"] == pytest.approx(row["n"] * row["m"] / 10e-3)
        assert row["peak_extra_mib"] == 1.0
    assert [t["name"] for t in doc["targets"]] == ALL_TARGETS
    out = capsys.readouterr().out
    assert out.count("# target: ") == 6 and f"# wrote {path}" in out
    # L = 0 rows print pairs per second, no TFLOP/s
    l0 = [line for line in out.splitlines() if line.startswith("concat") and " 0 triton " in line]
    assert l0 and all(" -      - " in line for line in l0), l0


def test_a_device_error_stops_the_run_with_the_json_written(fake_gpu, tmp_path, capsys):
    def measure(case):
        if len(fake_gpu["calls"]) == 2:
            return {"error": "RuntimeError: CUDA error: an illegal memory access was "
                             "encountered; device unusable after this case: ...", "fatal": True}
        return _timed(10.0)
    fake_gpu["measure"] = measure
    rc = gb.main(["--out", str(tmp_path), "--dtypes", "bf16", "--layers", "1", "--ns", "64",
                  "--sep-ns", "--impls", "triton", "chunked"])
    assert rc == 3 and len(fake_gpu["calls"]) == 2
    doc = json.loads(_files(tmp_path)[0].read_text())
    assert doc["complete"] is False and "device error" in doc["aborted"]
    assert len(doc["rows"]) == 2 and doc["rows"][1]["fatal"] is True
    assert doc["matmul_peak"]["end"] == {}  # not measured on a broken device
    assert doc["rows"][0]["matmul_peak_basis"] == "start"
    captured = capsys.readouterr()
    assert "INCOMPLETE" in captured.out and "device error" in captured.err


def test_run_case_records_a_sticky_cuda_error_as_fatal(monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")
    monkeypatch.setattr(gb, "time_call", broken)
    monkeypatch.setattr(torch.cuda, "synchronize", broken)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    args = gb.build_parser().parse_args([])
    res = gb.run_case(None, None, args, heavy=False)
    assert res["fatal"] is True
    assert res["error"].startswith("RuntimeError: CUDA error: an illegal memory access")
    assert "device unusable after this case" in res["error"]
    # an ordinary failure is recorded and the run goes on
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    res = gb.run_case(None, None, args, heavy=False)
    assert "fatal" not in res and res["error"].startswith("RuntimeError")


def test_sigterm_keeps_the_rows(fake_gpu, tmp_path):
    def measure(case):
        if len(fake_gpu["calls"]) == 2:  # what the stage's `timeout` does, by the handler
            handler = signal.getsignal(signal.SIGTERM)
            assert handler is gb._terminate
            handler(signal.SIGTERM, None)
        return _timed(10.0)
    fake_gpu["measure"] = measure
    previous = signal.getsignal(signal.SIGTERM)
    rc = gb.main(["--out", str(tmp_path), "--dtypes", "bf16", "--layers", "1", "--ns", "64",
                  "--sep-ns", "--impls", "triton"])
    assert rc == 143 and signal.getsignal(signal.SIGTERM) is previous
    doc = json.loads(_files(tmp_path)[0].read_text())
    assert doc["complete"] is False and "SIGTERM" in doc["aborted"] and len(doc["rows"]) == 1


def test_every_row_errored_is_a_failure(fake_gpu, tmp_path, capsys):
    fake_gpu["measure"] = lambda case: {"error": "OOM"}
    rc = gb.main(["--out", str(tmp_path), "--dtypes", "bf16", "--layers", "1", "--ns", "64",
                  "--sep-ns", "--impls", "triton"])
    assert rc == 1 and "every timed row errored" in capsys.readouterr().err
    assert json.loads(_files(tmp_path)[0].read_text())["complete"] is True


def test_result_file_is_replaced_whole(tmp_path):
    path = tmp_path / "gpu_bench-x.json"
    res = gb.ResultFile(path, {"device": "d"})
    assert json.loads(path.read_text())["rows"] == []
    res.add(_row("triton", ms=1.0))
    doc = json.loads(path.read_text())
    assert doc["complete"] is False and len(doc["rows"]) == 1 and len(doc["targets"]) == 6
    res.finish(complete=True)
    assert json.loads(path.read_text())["complete"] is True
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


# --------------------------------------------------------------------------------------------
# rows: statistics, rates, the yardstick
# --------------------------------------------------------------------------------------------


def test_time_stats_keep_the_spread():
    st = gb.time_stats([5.0, 1.0, 3.0, 2.0, 4.0])
    assert st["ms"] == 3.0 and st["min_ms"] == 1.0 and st["max_ms"] == 5.0
    assert (st["q1_ms"], st["q3_ms"], st["iqr_ms"]) == (2.0, 4.0, 2.0)
    assert st["times_ms"] == [5.0, 1.0, 3.0, 2.0, 4.0] and st["runs"] == 5
    assert "times_ms" not in gb.time_stats([1.0] * 65)
    assert gb.time_stats([2.0])["iqr_ms"] == 0.0


def test_rows_rate_by_the_design_count():
    case = dict(CONCAT, n=64, m=64, layers=0, impl="triton", **{"pass": "fwd+bwd"})
    row = gb.make_row(case, _timed(2.0), 500.0, autotune=True)
    assert row["pairs_per_s"] == pytest.approx(64 * 64 / 2e-3) and row["autotune"] is True
    assert row["tflops"] > 0 and row["pct_peak"] == pytest.approx(row["tflops"] / 5)
    cols = gb.format_row(row).split()  # critic dtype N L impl pass ms iqr TFLOP/s %peak ...
    assert cols[8:10] == ["-", "-"] and cols[10] == f"{row['gpairs_s']:.2f}", cols
    cols = gb.format_row(dict(row, layers=1)).split()
    assert cols[8] == f"{row['tflops']:.1f}" and cols[9] == f"{row['pct_peak']:.1f}", cols
    sep = dict(SEPARABLE, n=8, m=8, impl="matmuls", **{"pass": "fwd+bwd"})
    row = gb.make_row(sep, _timed(1.0), 500.0)
    assert row["executed_tflops"] == pytest.approx(row["tflops"] * 8 / 6)
    assert row["products"] == gb.YARDSTICK["fwd+bwd"]
    err = gb.make_row(case, {"error": "OOM"}, 500.0)
    assert "tflops" not in err and gb.format_row(err).endswith("OOM")


def test_the_separable_yardstick_is_the_four_products(monkeypatch):
    monkeypatch.setattr(gb, "DEVICE", "cpu")
    x = gb.separable_inputs(6, 5, torch.float64, True)
    g, h = x["g"].detach(), x["h"].detach()
    s = g @ h.t()
    dg, dh = gb.separable_step("matmuls", 6, False, 6, {})(x)
    torch.testing.assert_close(dg, s @ h)
    torch.testing.assert_close(dh, s.t() @ g)
    torch.testing.assert_close(gb.separable_step("matmuls", 6, True, 6, {})(x), s)
    calls = []
    real_mm = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__",
                        lambda a, b: calls.append("@") or real_mm(a, b))
    real = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a, **k: calls.append("mm") or real(*a, **k))
    gb.separable_step("matmuls", 6, False, 6, {})(x)
    assert calls == ["@", "mm", "@", "@"]


# --------------------------------------------------------------------------------------------
# triton_bwd_ablation.py
# --------------------------------------------------------------------------------------------


def test_ablation_zeroes_outside_the_timed_region_and_fails_loudly(monkeypatch):
    abl = load_benchmark("triton_bwd_ablation")
    log = []
    bufs = [torch.ones(3)]
    run = abl._with_reset(bufs, lambda: log.append("launch") or 7, lambda v: (v, bufs))
    assert run() == (7, bufs) and bufs[0].sum() == 0 and log == ["launch"]

    class Event:
        def __init__(self, **kw):
            self.name = None

        def record(self):
            log.append("event")

        def elapsed_time(self, other):
            return 1.0

    log.clear()
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    run.reset = lambda: log.append("reset")
    assert abl.time_median(run, warmup_ms=2, rep_ms=3, device="cpu") == 1.0
    assert log[:6] == ["reset", "launch", "reset", "event", "launch", "event"], log[:8]
    assert log.count("reset") == log.count("launch") == 1 + 5 + 2 + 3

    # a failed (configuration, variant) makes the exit status non-zero
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(abl._config, "INTERPRETED", False)
    monkeypatch.setattr(abl, "table", lambda *a: 2)
    with pytest.raises(SystemExit) as exc:
        abl.main([])
    assert exc.value.code and "2 (configuration, variant) timings failed" in str(exc.value.code)
    monkeypatch.setattr(abl, "table", lambda *a: 0)
    abl.main([])
