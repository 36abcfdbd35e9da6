"""factorcl.mi_bench and the MI probes: the closed-form CLUB against its materialising form, a tiny
benchmark run writing its JSON and PNG, and the Gaussian MI probe on data with known MI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from factorcl import cli
from factorcl import data as D
from factorcl import eval as E
from factorcl import mi_bench as B

from conftest import assert_rel_close, signed_sum_floor

F64 = torch.float64


def test_club_gaussian_closed_form_matches_pairs():
    club = B.CLUBGaussian(4, 3, 10).double()
    x, y = torch.randn(9, 4, dtype=F64), torch.randn(9, 3, dtype=F64)
    mu, logvar = club.p_mu(x), club.p_logvar(x)
    positive = -((mu - y) ** 2) / 2.0 / logvar.exp()
    negative = -((y[None, :, :] - mu[:, None, :]) ** 2).mean(1) / 2.0 / logvar.exp()
    expected = (positive.sum(-1) - negative.sum(-1)).mean()
    assert_rel_close(club(x, y), expected, 1e-12,
                     floor=signed_sum_floor(positive / 9, negative / 9))
    nll = ((mu - y) ** 2 / logvar.exp() + logvar).sum(1).mean()
    assert_rel_close(club.learning_loss(x, y), nll, 1e-12,
                     floor=signed_sum_floor((mu - y) ** 2 / logvar.exp() / 9, logvar / 9))


def test_tiny_benchmark_writes_json_and_png(tmp_path):
    cfg = B.MIBenchConfig(dims=(3, 5), levels=(1.0, 2.0), steps_per_level=6, tail_steps=3,
                          batch=8, hidden=8, backend="reference", large_batch_sizes=(4, 8),
                          large_batch_dim=3, large_batch_steps=4, large_batch_hidden=8)
    out = B.run_mi_bench(cfg, str(tmp_path), log=lambda m: None)
    js = json.loads((tmp_path / "mi_bench.json").read_text())
    assert set(js["results"]) == {"3", "5"}
    for est in B.ESTIMATORS:
        for level in ("1", "2"):
            r = js["results"]["3"][est][level]
            assert math.isfinite(r["bias"]) and r["variance"] >= 0
            assert math.isclose(r["mse"], r["bias"] ** 2 + r["variance"], rel_tol=1e-6,
                                abs_tol=1e-9)
    assert len(js["traces"]["5"]["infonce"]) == 12
    assert js["log_batch"] == math.log(8)
    assert "infonce_saturates_near_log_batch" in out["findings"]
    assert set(out["findings"]["club_over_exact_q_bound_by_dim"]) == {"3", "5"}
    assert (tmp_path / "mi_bench.png").stat().st_size > 1000
    lb = B.run_large_batch(cfg, str(tmp_path), log=lambda m: None)
    assert [r["batch"] for r in lb["rows"]] == [4, 8]
    assert (tmp_path / "mi_large_batch.png").stat().st_size > 1000
    assert json.loads((tmp_path / "mi_large_batch.json").read_text())["rows"][1]["log_batch"] == \
        math.log(8)


def test_staircase_plot_takes_traces_not_divisible_by_the_levels(tmp_path):
    # 2 levels x 1500 steps average down to 375 trace points (the plot once needed a multiple)
    values = [float(i % 7) for i in range(3000)]
    out = {"config": {"levels": [1.0, 2.0], "estimators": ["infonce"]}, "log_batch": 4.0,
           "traces": {"3": {"infonce": B._downsample(values)}}}
    assert len(out["traces"]["3"]["infonce"]) == 375
    B._plot_staircase(out, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_benchmark_cut_short_continues_to_the_uninterrupted_result(tmp_path, monkeypatch):
    """Ctrl-C in the second dimension (or batch size) keeps the first in the results file; the
    same call again reuses it and computes the rest, giving the uninterrupted run's numbers."""
    cfg = B.MIBenchConfig(dims=(3, 4), levels=(1.0, 2.0), steps_per_level=4, batch=8, hidden=8,
                          backend="reference", large_batch_sizes=(4, 8), large_batch_dim=3,
                          large_batch_steps=3, large_batch_hidden=8)
    full, cut = tmp_path / "full", tmp_path / "cut"
    whole = B.run_mi_bench(cfg, str(full), log=lambda m: None)
    whole_lb = B.run_large_batch(cfg, str(full), log=lambda m: None)

    real_step, calls = B._step, []

    def step_then_ctrl_c(*args):
        calls.append(1)
        if len(calls) > limit:
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(B, "_step", step_then_ctrl_c)
    limit = 2 * 4 * len(B.ESTIMATORS) + 1  # all of dim 3, one step of dim 4
    with pytest.raises(KeyboardInterrupt):
        B.run_mi_bench(cfg, str(cut), log=lambda m: None)
    kept = json.loads((cut / "mi_bench.json").read_text())
    assert kept["complete"] is False and set(kept["results"]) == {"3"}
    calls.clear()
    limit = 3 + 1  # all of N = 4, one step of N = 8
    with pytest.raises(KeyboardInterrupt):
        B.run_large_batch(cfg, str(cut), log=lambda m: None)
    assert [r["batch"] for r in json.loads((cut / "mi_large_batch.json").read_text())["rows"]] \
        == [4]
    monkeypatch.setattr(B, "_step", real_step)

    lines = []
    again = B.run_mi_bench(cfg, str(cut), log=lines.append)
    again_lb = B.run_large_batch(cfg, str(cut), log=lines.append)
    assert again["complete"] and again["results"] == whole["results"]
    assert again["traces"] == whole["traces"] and again["findings"] == whole["findings"]
    for a, b in zip(again_lb["rows"], whole_lb["rows"]):
        assert a["estimate"] == b["estimate"]
    assert sum("finished earlier, reusing" in line for line in lines) == 2
    # overwrite computes everything again
    lines.clear()
    B.run_mi_bench(cfg, str(cut), log=lines.append, overwrite=True)
    assert not any("reusing" in line for line in lines)


def test_infonce_estimate_tracks_truth_at_low_mi(tmp_path):
    # One level at 1 nat in 2 dimensions: the trained InfoNCE critic lands near the truth.
    cfg = B.MIBenchConfig(dims=(2,), levels=(1.0,), steps_per_level=150, tail_steps=50, batch=32,
                          hidden=32, lr=3e-3, estimators=("infonce",), backend="reference")
    out = B.run_mi_bench(cfg, str(tmp_path), log=lambda m: None)
    assert abs(out["results"]["2"]["infonce"]["1"]["bias"]) < 0.35


def test_cli_mi_bench_quick_shape(tmp_path):
    code = cli.main(["mi-bench", "--out", str(tmp_path), "--quick", "--dims", "3", "--levels",
                     "1,2", "--steps-per-level", "4", "--hidden", "8", "--large-batch-sizes",
                     "4,8", "--large-batch-steps", "2", "--backend", "reference"])
    assert code == 0
    for name in ("mi_bench.json", "mi_bench.png", "mi_large_batch.json", "mi_large_batch.png"):
        assert (tmp_path / name).exists()


TINY_MI = ["--quick", "--dims", "3", "--levels", "1,2", "--steps-per-level", "4", "--hidden", "8",
           "--large-batch-sizes", "4,8", "--large-batch-steps", "2", "--backend", "reference",
           "--no-progress"]


def test_cli_mi_bench_keeps_results_of_other_settings(tmp_path, capsys):
    out = ["mi-bench", "--out", str(tmp_path)]
    assert cli.main(out + TINY_MI) == 0
    before = {name: (tmp_path / name).read_text() for name in ("mi_bench.json",
                                                               "mi_large_batch.json")}
    capsys.readouterr()
    # other settings of either mode: refused in one line before anything runs
    cases = ((["--levels", "1,3"],
              "mi_bench.json made with levels=[1.0, 2.0] but this run has levels=[1.0, 3.0]"),
             (["--large-batch-steps", "3"], "mi_large_batch.json made with large_batch_steps=2"))
    for extra, expected in cases:
        code = cli.main(out + TINY_MI + extra)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == cli.EXIT_USAGE and len(err) == 1, err
        assert expected in err[0] and "--overwrite" in err[0], err[0]
        for name, text in before.items():
            assert (tmp_path / name).read_text() == text, name
    # a setting only the large-batch mode uses does not concern the staircase, and back
    assert cli.main(out + TINY_MI + ["--large-batch-steps", "3", "--no-large-batch"]) == 0
    # the same settings again reuse the same numbers; --overwrite replaces
    assert cli.main(out + TINY_MI) == 0
    again = json.loads((tmp_path / "mi_bench.json").read_text())
    assert again["results"] == json.loads(before["mi_bench.json"])["results"]
    assert cli.main(out + TINY_MI + ["--levels", "1,3", "--overwrite"]) == 0
    assert json.loads((tmp_path / "mi_bench.json").read_text())["config"]["levels"] == [1.0, 3.0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cli_mi_bench_on_a_gpu(tmp_path, backend):
    import factorcl_ext

    if backend not in factorcl_ext.available_backends():
        pytest.skip(f"{backend} is not available here")
    argv = ["mi-bench", "--out", str(tmp_path), *TINY_MI[:-3], "--backend", backend,
            "--device", "cuda", "--no-progress"]
    assert cli.main(argv) == 0
    js = json.loads((tmp_path / "mi_large_batch.json").read_text())
    assert js["config"]["device"] == "cuda" and all(math.isfinite(r["estimate"])
                                                     for r in js["rows"])


def test_gaussian_mi_probe_on_known_mi():
    g = D.make_generator(0)
    x, y = D.sample_correlated_gaussian(4000, 3, 1.5, g, dtype=F64)
    assert abs(E.gaussian_mi(x, y, k=3) - 1.5) < 0.1
    assert E.gaussian_mi(x, torch.randn(4000, 3, dtype=F64, generator=g), k=3) < 0.05
    # invariant to invertible linear maps of either side
    a = x @ torch.randn(3, 3, dtype=F64, generator=g)
    assert abs(E.gaussian_mi(a, y, k=3) - E.gaussian_mi(x, y, k=3)) < 1e-6


def test_latent_r2_and_linear_probe():
    g = D.make_generator(1)
    z = torch.randn(600, 2, dtype=F64, generator=g)
    rep = torch.cat([z @ torch.randn(2, 5, dtype=F64, generator=g),
                     torch.randn(600, 3, dtype=F64, generator=g)], 1)
    assert E.latent_r2(rep[:400], z[:400], rep[400:], z[400:]) > 0.99
    noise = torch.randn(600, 8, dtype=F64, generator=g)
    assert E.latent_r2(noise[:400], z[:400], noise[400:], z[400:]) < 0.05
    y = (z.sum(1) > 0).long()
    assert E.linear_probe(rep[:400], y[:400], rep[400:], y[400:]) > 0.95
    assert E.linear_probe(noise[:400], y[:400], noise[400:], y[400:]) < 0.65


def _strict_json(path):
    """The file's JSON, failing on NaN / Infinity (which json.loads accepts by default)."""
    def refuse(constant):
        raise AssertionError(f"{path} holds the non-JSON constant {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_diverged_estimates_are_null_with_a_warning(tmp_path, monkeypatch):
    """An estimator that diverges (NaN from the second level on, Infinity at one batch size) is
    a result, not a crash: strict JSON with null in its place, and a warning naming it."""
    cfg = B.MIBenchConfig(dims=(3,), levels=(1.0, 2.0), steps_per_level=4, batch=6, hidden=8,
                          backend="reference", large_batch_sizes=(4, 8), large_batch_dim=3,
                          large_batch_steps=3, large_batch_hidden=8)
    real_step, club_calls = B._step, []

    def diverging_step(name, module, opt, x, y):
        value = real_step(name, module, opt, x, y)
        if name == "club":
            club_calls.append(1)
            return math.nan if len(club_calls) > cfg.steps_per_level else value
        return math.inf if x.shape[0] == 8 else value

    monkeypatch.setattr(B, "_step", diverging_step)
    lines = []
    out = B.run_mi_bench(cfg, str(tmp_path), log=lines.append)
    js = _strict_json(tmp_path / "mi_bench.json")
    club = js["results"]["3"]["club"]
    assert math.isfinite(club["1"]["mean"]) and club["2"]["mean"] is None
    assert club["2"]["mse"] is None and js["traces"]["3"]["club"][-1] is None
    assert math.isfinite(js["results"]["3"]["infonce"]["2"]["mean"])
    assert js["findings"]["club_mse_by_dim"] == {"3": None} == out["findings"]["club_mse_by_dim"]
    warned = [line for line in lines if "warning" in line]
    assert len(warned) == 1 and "club diverged" in warned[0] and "level 2 nats" in warned[0]
    assert (tmp_path / "mi_bench.png").stat().st_size > 1000
    lines.clear()
    lb = B.run_large_batch(cfg, str(tmp_path), log=lines.append)
    rows = _strict_json(tmp_path / "mi_large_batch.json")["rows"]
    assert math.isfinite(rows[0]["estimate"]) and rows[1]["estimate"] is None
    assert lb["rises_with_batch"] is False
    warned = [line for line in lines if "warning" in line]
    assert len(warned) == 1 and "N=8: infonce diverged" in warned[0], lines
    # the same settings again reuse the null results
    again = B.run_mi_bench(cfg, str(tmp_path), log=lambda m: None)
    assert again["results"] == out["results"]


def test_results_are_written_before_the_findings(tmp_path, monkeypatch):
    # a failure while deriving the findings keeps every dimension's results, the last one too
    cfg = B.MIBenchConfig(dims=(3, 4), levels=(1.0,), steps_per_level=2, batch=8, hidden=8,
                          estimators=("infonce",), backend="reference")

    def broken(out):
        raise RuntimeError("findings")

    monkeypatch.setattr(B, "_findings", broken)
    with pytest.raises(RuntimeError, match="findings"):
        B.run_mi_bench(cfg, str(tmp_path), log=lambda m: None)
    kept = json.loads((tmp_path / "mi_bench.json").read_text())
    assert set(kept["results"]) == {"3", "4"} and kept["complete"] is False


@pytest.mark.parametrize("overrides, expected", [
    (dict(levels=(1.0, math.inf)), "--levels must be positive, finite MI values in nats"),
    (dict(dims=(1, 3), levels=(1.0, 400.0)), "--levels 400 is too large for --dims 1"),
    (dict(dims=(3,), levels=(60.0,)), "--levels 60 is too large for --dims 3"),
    (dict(lr=1e30), "--lr must be in (0, 1]"),
    (dict(lr=math.inf), "--lr must be in (0, 1]"),
    (dict(estimators=()), "--estimators must name at least one of infonce, club, nce-club"),
    (dict(large_batch_sizes=()), "--large-batch-sizes must list at least one batch size"),
    # float32 samples: at 13 nats in one dimension 1 % of them had y == x exactly
    (dict(dims=(1,), levels=(13.0,)), "--levels 13 is too large for --dims 1: the pairs are "
                                      "sampled in float32"),
    (dict(large_batch_mi=241.0), "large_batch_mi 241 is too large for large_batch_dim 20"),
    # results are keyed by level; rises_with_batch reads the batch sizes in their order
    (dict(levels=(1.0, 3.0, 1.0)), "--levels must be distinct MI values, got (1.0, 3.0, 1.0)"),
    (dict(large_batch_sizes=(64, 8)), "--large-batch-sizes must be increasing, got [64, 8]"),
    (dict(large_batch_sizes=(8, 8)), "--large-batch-sizes must be increasing, got [8, 8]"),
])
def test_config_refuses_values_that_cannot_run(overrides, expected):
    with pytest.raises(ValueError) as exc:
        B.MIBenchConfig(**overrides).validate()
    assert expected in str(exc.value)
    B.MIBenchConfig(dims=(1, 2), levels=(12.0, 1.0), large_batch_sizes=(2, 3),
                    lr=B.MAX_LR).validate()  # the bounds themselves


def _exit_status(argv):
    try:
        return cli.main(argv)
    except SystemExit as exc:  # argparse
        return exc.code


@pytest.mark.parametrize("extra, expected", [
    (["--levels", "1,inf"], "argument --levels: expected a comma-separated list, got '1,inf' "
                            "(expected a positive, finite number, got 'inf')"),
    (["--dims", "1", "--levels", "1,400"], "--levels 400 is too large for --dims 1"),
    (["--lr", "1e30"], "--lr must be in (0, 1] (Adam's step size), got 1e+30"),
    (["--lr", "inf"], "argument --lr: expected a positive, finite number, got 'inf'"),
    (["--estimators", ","], "--estimators must name at least one"),
    (["--large-batch-sizes", ","], "--large-batch-sizes must list at least one batch size"),
])
def test_cli_mi_bench_refuses_in_one_line(tmp_path, capsys, extra, expected):
    out = tmp_path / "o"
    argv = ["mi-bench", "--out", str(out), "--dims", "2", "--levels", "1", "--steps-per-level",
            "4", "--hidden", "8", "--large-batch-steps", "2", "--large-batch-sizes", "4",
            "--backend", "reference", "--no-progress", *extra]
    code = _exit_status(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == cli.EXIT_USAGE and len(err) == 1, err
    assert expected in err[0] and "Traceback" not in err[0], err[0]
    assert not out.exists()


def test_findings_take_the_largest_level_as_the_top_wherever_the_staircase_puts_it():
    # a descending staircase: the saturation claim was tested at the last level, the smallest
    out = {"config": {"levels": [8.0, 1.0], "estimators": ["infonce"]}, "log_batch": 4.0,
           "results": {"20": {"infonce": {"8": {"true": 8.0, "mean": 3.9},
                                          "1": {"true": 1.0, "mean": 0.9}}}}}
    f = B._findings(out)
    assert f["infonce_top_level_mean"] == {"20": 3.9}
    assert f["infonce_saturates_near_log_batch"] is True
    out["results"]["20"]["infonce"]["8"]["mean"] = 6.0  # well above log N: not saturated
    assert B._findings(out)["infonce_saturates_near_log_batch"] is False
