"""factorcl.train and the CLI: the alternation touches only the intended parameters, a resumed
run equals an uninterrupted one, checkpoints are atomic, Ctrl-C saves and exits cleanly, bad flags
and data give one line and exit status 2, and a short end-to-end run beats chance."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from factorcl import cli
from factorcl import data as D
from factorcl import models as M
from factorcl import train as T

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = M.ModelConfig(embed_dim=8, backbone_hidden=16, critic_hidden=12,
                      critic_backend="reference")


def _fused_or_reference() -> str:
    """``auto`` once the fused CPU kernels work in this build, else ``reference``."""
    from factorcl_ext.nn import InfoNCECritic

    try:
        x = torch.randn(3, 2, requires_grad=True)
        InfoNCECritic(2, 2, 4, 1, "relu", backend="auto")(x, torch.randn(3, 2)).backward()
        return "auto"
    except RuntimeError:
        return "reference"


def _data(n=160, seed=0):
    return D.make_synthetic(D.SyntheticConfig(num_examples=n, shared_dim=3, unique_dim=2,
                                              x_dim=12, seed=seed))


def _cfg(model="factorcl-sup", **kw):
    base = dict(model=model, epochs=2, batch_size=16, lr=1e-3, progress=False, probe=False,
                model_cfg=SMALL)
    base.update(kw)
    return T.TrainConfig(**base)


def _snapshot(params):
    return [p.detach().clone() for p in params]


def _changed(before, params):
    return [not torch.equal(b, p.detach()) for b, p in zip(before, params)]


def _zero_gradient_by_construction(model):
    """Critics' output biases: InfoNCE and NCE-CLUB are shift invariant, so their gradient is
    zero in exact arithmetic and Adam may leave them exactly where they were."""
    return {id(m[-1].bias) for m in (c._f for c in model.critics.values())}


@pytest.mark.parametrize("name", ["factorcl-sup", "factorcl-ssl"])
def test_alternation_touches_only_the_intended_parameters(name):
    d = _data()
    torch.manual_seed(0)
    # Width 16: at width 8 a head's ReLU layer is sometimes dead for a whole batch at init,
    # which leaves its weights without gradient whatever the alternation does.
    wide = M.ModelConfig(embed_dim=16, backbone_hidden=32, critic_hidden=16,
                         critic_backend="reference")
    model = M.build_model(name, (12,), (12,), 2, wide)
    main, club = model.main_parameters(), model.club_parameters()
    assert club and {id(p) for p in main}.isdisjoint({id(p) for p in club})
    assert len(main) + len(club) == len(list(model.parameters()))
    opt = torch.optim.Adam(main, lr=1e-2)
    club_opt = torch.optim.Adam(club, lr=1e-2)
    idx = torch.arange(16)
    x1, x2, y = d.x1[idx], d.x2[idx], d.y[idx]
    batch = M.Batch(x1, x2, y, x1 * 0.9, x2 * 0.9)

    free = _zero_gradient_by_construction(model)
    m0, c0 = _snapshot(main), _snapshot(club)
    T.main_step(model, opt, batch)
    assert all(ch for ch, p in zip(_changed(m0, main), main) if id(p) not in free), \
        "the main step must move every non-CLUB parameter"
    assert not any(_changed(c0, club)), "the main step must leave the NCE-CLUB critics alone"
    assert all(p.requires_grad for p in club)

    m1, c1 = _snapshot(main), _snapshot(club)
    T.club_step(model, club_opt, batch)
    assert not any(_changed(m1, main)), "the CLUB step must leave everything else alone"
    assert all(ch for ch, p in zip(_changed(c1, club), club) if id(p) not in free), \
        "the CLUB step must move both NCE-CLUB critics"


def test_baselines_have_no_club_step():
    model = M.build_model("simclr", (12,), (12,), 2, SMALL)
    assert model.club_parameters() == []
    with pytest.raises(NotImplementedError):
        model.club_learning_loss(M.Batch(torch.randn(4, 12), torch.randn(4, 12), torch.zeros(4)))


@pytest.mark.parametrize("name", ["factorcl-ssl", "supcon"])
def test_resume_equals_uninterrupted(tmp_path, name):
    d = _data()
    cfg = _cfg(name, epochs=2, checkpoint_every=3)
    full = T.train(cfg, d, str(tmp_path / "full"))
    part = T.train(cfg, d, str(tmp_path / "part"), stop_at_step=7)
    assert part["stopped"] and part["steps"] == 7
    ckpt = torch.load(part["checkpoint"], weights_only=True)
    assert ckpt["step"] == 7
    resumed = T.train(cfg, d, str(tmp_path / "part"), resume=part["checkpoint"])
    assert resumed["steps"] == full["steps"] == 2 * (128 // 16)
    a, b = full["model_ref"].state_dict(), resumed["model_ref"].state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["final_loss"] == full["final_loss"]
    # the metric log of the resumed run continues without duplicates
    steps = [json.loads(line)["step"] for line in open(tmp_path / "part" / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == full["steps"]
    # resuming the finished run trains nothing and reports the run, not an empty process
    again = T.train(cfg, d, str(tmp_path / "part"), resume=resumed["checkpoint"])
    assert again["steps"] == full["steps"] and again["final_loss"] == full["final_loss"]
    assert again["samples_per_second"] > 0 and again["seconds"] >= resumed["seconds"]


def test_resume_refuses_other_settings(tmp_path):
    d = _data()
    part = T.train(_cfg(), d, str(tmp_path), stop_at_step=2)
    with pytest.raises(T.TrainError, match="batch_size=16 but this run has batch_size=32"):
        T.train(_cfg(batch_size=32), d, str(tmp_path), resume=part["checkpoint"])
    with pytest.raises(T.TrainError, match="different data"):
        T.train(_cfg(), _data(seed=5), str(tmp_path), resume=part["checkpoint"])
    with pytest.raises(T.TrainError, match="not found"):
        T.train(_cfg(), d, str(tmp_path), resume=str(tmp_path / "nope.pt"))


def test_resume_of_synthetic_data_made_elsewhere(tmp_path):
    """Synthetic data from the same settings with other bits (torch's vectorised and scalar
    normal samplers round differently, so another kind of CPU or torch build regenerates it
    so): refused on resume with what made each and the ways on, not 'use the same settings'.
    Only what made the data, where its values agree, resumes."""
    d = _data()
    part = T.train(_cfg(), d, str(tmp_path), stop_at_step=2)
    ckpt = torch.load(part["checkpoint"], weights_only=True)
    assert ckpt["data"]["made_by"].startswith(f"torch {torch.__version__} on ")
    x1 = d.x1.clone()
    x1[3, 4] = torch.nextafter(x1[3, 4], torch.tensor(math.inf))  # one ulp: another rounding
    elsewhere = dataclasses.replace(d, x1=x1)
    with pytest.raises(T.TrainError) as err:
        T.train(_cfg(), elsewhere, str(tmp_path), resume=part["checkpoint"])
    msg = str(err.value)
    assert "other values with the same settings" in msg and "use the same settings" not in msg
    assert f"the checkpoint's by {ckpt['data']['made_by']}, this run's by torch" in msg
    assert "resume it where it was started" in msg and "--overwrite" in msg
    # a setting that differs as well comes first, with its own remedy
    with pytest.raises(T.TrainError, match="has batch_size=32; use the same settings"):
        T.train(_cfg(batch_size=32), elsewhere, str(tmp_path), resume=part["checkpoint"])
    # a checkpoint from before made_by: the same refusal, without the provenance
    del ckpt["data"]["made_by"]
    older = part["checkpoint"]
    torch.save(ckpt, older)
    with pytest.raises(T.TrainError, match=r"other values with the same settings: it rounds "
                       r"differently on another kind of CPU or torch build\); resume it"):
        T.train(_cfg(), elsewhere, str(tmp_path), resume=older)
    # the same values, made by something else: resumes
    ckpt["data"]["made_by"] = "torch 0.0 on arm64 (DEFAULT)"
    torch.save(ckpt, older)
    resumed = T.train(_cfg(), d, str(tmp_path), resume=older)
    assert resumed["steps"] == 2 * (128 // 16)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "c.pt")
    T.save_checkpoint(path, {"a": 1})

    def boom(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        T.save_checkpoint(path, {"a": 2})
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"a": 1}
    assert os.listdir(tmp_path) == ["c.pt"]  # no temporary file left behind


class _RunsCode:
    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_checkpoints_load_without_running_code(tmp_path):
    """A pickle that would call a function when unpickled is refused (weights_only), nothing
    runs, and the error says which file."""
    evil = _RunsCode()
    evil.marker = str(tmp_path / "ran")
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": T.CHECKPOINT_FORMAT, "payload": evil}, path)
    with pytest.raises(T.TrainError, match=f"--resume: cannot read {path}"):
        T.load_checkpoint(str(path))
    with pytest.raises(T.TrainError, match=f"load_model: cannot read {path}"):
        T.load_model(str(tmp_path))
    assert not os.path.exists(evil.marker)


def test_seeded_runs_are_reproducible(tmp_path):
    d = _data()
    a = T.train(_cfg("factorcl-ssl", epochs=1), d, str(tmp_path / "a"))
    b = T.train(_cfg("factorcl-ssl", epochs=1), d, str(tmp_path / "b"))
    c = T.train(_cfg("factorcl-ssl", epochs=1, seed=1), d, str(tmp_path / "c"))
    assert a["final_loss"] == b["final_loss"] != c["final_loss"]


def test_bad_config_raises_train_error(tmp_path):
    d = _data()
    for bad in (dict(batch_size=1000), dict(model="clip"), dict(batch_size=1),
                dict(model_cfg=M.ModelConfig(critic_backend="gpu"))):
        with pytest.raises(T.TrainError):
            T.train(_cfg(**bad), d, str(tmp_path))


# ---- CLI ------------------------------------------------------------------------------------

TINY_SYNTHETIC = ["--n-examples", "200", "--shared-dim", "3", "--unique-dim", "2", "--x-dim", "12"]
TINY_MODEL = ["--embed-dim", "8", "--backbone-hidden", "16", "--batch-size", "32",
              "--no-progress"]
TINY_CRITIC = ["--critic-hidden", "12"]  # FactorCL's concat critics (refused for the others)
TINY = TINY_SYNTHETIC + TINY_CRITIC + TINY_MODEL  # FactorCL models, or a mix
TINY_BASELINE = TINY_SYNTHETIC + TINY_MODEL  # SimCLR / SupCon alone


def _one_line_error(capsys, code, expected):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == cli.EXIT_USAGE
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert expected in err[0], err[0]


@pytest.mark.parametrize("argv, expected", [
    (["train", "--out", "x", "--epochs", "0"], "--epochs: expected a positive integer"),
    (["train", "--out", "x", "--model", "clip"], "invalid choice: 'clip'"),
    (["train", "--out", "x", "--backend", "gpu"], "invalid choice: 'gpu'"),
    (["train", "--out", "x", "--lr", "inf"], "--lr: expected a positive, finite number"),
    (["train", "--out", "x", "--temperature", "inf"], "--temperature: expected a positive, finite"),
    (["train", "--out", "x", "--frobnicate"],
     "unrecognized arguments: --frobnicate (see factorcl train --help)"),
    (["train"], "required: --out"),
    (["compare", "--out", "x", "--no-probe"], "unrecognized arguments: --no-probe"),
    (["mi-bench", "--out", "x", "--dims", "a,b"], "--dims"),
])
def test_cli_bad_flags(capsys, argv, expected):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    _one_line_error(capsys, exc.value.code, expected)


def test_cli_bad_data_and_values(capsys, tmp_path):
    np.savez(tmp_path / "d.npz", x1=np.zeros((10, 3)), y=np.arange(10) % 2)
    out = str(tmp_path / "o")
    cases = [
        (["--dataset", f"npz:{tmp_path / 'd.npz'}"], "missing key 'x2'"),
        (["--dataset", f"npz:{tmp_path / 'none.npz'}"], "not found"),
        (["--dataset", "imagenet"], "unknown dataset"),
        (["--label-parts", "shared,colour"], "label part"),
        (["--batch-size", "100000"], "larger than the training split"),
        (["--device", "tpu"], "--device"),
        (["--resume", str(tmp_path / "none.pt")], "checkpoint not found"),
        (["--mi-probe-steps", "1", "--backend", "cuda"], "--backend cuda"),
        (["--mi-probe-steps", "5", "--no-probe"], "--mi-probe-steps runs in the evaluation"),
        # a data flag the chosen dataset does not use is refused, not silently ignored
        (["--task", "3"], "--task applies to --dataset multibench only, not to synthetic"),
        (["--dataset", f"npz:{tmp_path / 'd.npz'}", "--n-examples", "50"],
         "--n-examples applies to --dataset synthetic only"),
        (["--dataset", "multibench:mosi.pkl", "--test-fraction", "0.5"],
         "--test-fraction applies to --dataset synthetic / npz / pt only"),
    ]
    for extra, expected in cases:
        data = TINY_SYNTHETIC if "--dataset" not in extra else []
        code = cli.main(["train", "--out", out, "--backend", "reference", *data, *TINY_CRITIC,
                         *TINY_MODEL, *extra])
        _one_line_error(capsys, code, expected)
    code = cli.main(["compare", "--out", out, "--backend", "reference", "--models", "simclr,clip",
                     *TINY])
    _one_line_error(capsys, code, "unknown model 'clip'")
    code = cli.main(["compare", "--out", out, "--seeds", "0", "1", "0", *TINY])
    _one_line_error(capsys, code, "--seeds repeats 0")
    code = cli.main(["compare", "--out", out, "--models", "simclr,supcon,simclr", *TINY])
    _one_line_error(capsys, code, "--models repeats simclr")
    code = cli.main(["compare", "--out", out, "--backend", "reference", "--modalities",
                     "text,audio", *TINY])
    _one_line_error(capsys, code, "--modalities applies to --dataset multibench only")
    assert not os.path.exists(out)
    code = cli.main(["mi-bench", "--out", out, "--estimators", "infonce,mine", "--backend",
                     "reference"])
    _one_line_error(capsys, code, "unknown estimator 'mine'")


def test_cli_train_end_to_end_beats_chance(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["train", "--model", "factorcl-sup", "--epochs", "3", "--out", str(out),
                     "--backend", _fused_or_reference(), *TINY[:-3], "--batch-size", "32",
                     "--n-examples", "400", "--no-progress"])
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    for key in ("probe_accuracy", "accuracies", "steps", "seconds", "backend"):
        assert key in m
    assert set(m["accuracies"]) == {"backbone", "S+U1+U2", "S", "U1", "U2"}
    assert m["probe_accuracy"] == m["accuracies"]["backbone"]
    assert m["steps"] == 3 * (320 // 32)
    assert m["backend"] in ("cpu", "reference")
    assert m["probe_accuracy"] > m["chance_accuracy"] + 0.15
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == m["steps"]
    assert (out / "checkpoint.pt").exists()


def test_load_model_and_cli_embed(tmp_path, capsys):
    """A run's model comes back from its directory, and ``factorcl embed`` writes the
    representations the run's own linear probe scored (same numbers, same split)."""
    from factorcl.eval import linear_probe

    run = tmp_path / "run"
    assert cli.main(["train", "--model", "factorcl-sup", "--epochs", "1", "--out", str(run),
                     "--backend", _fused_or_reference(), "--seed", "3", *TINY]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    model, info = T.load_model(str(run))
    assert not model.training and info["step"] == metrics["steps"]
    assert info["config"].model == "factorcl-sup" and info["data"]["x1"] == [12]
    trained = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, trained[k]), k

    emb = tmp_path / "emb" / "reps.npz"
    assert cli.main(["embed", str(run), *TINY_SYNTHETIC, "--out", str(emb)]) == 0
    assert "(the data it was trained on)" in capsys.readouterr().err
    with np.load(emb) as f:
        arrays = {k: f[k] for k in f.files}
    assert set(arrays) == {"backbone", "S", "U1", "U2", "S+U1+U2", "S1", "S2", "y", "split"}
    assert arrays["backbone"].shape == (200, 16) and arrays["split"].sum() == 40
    tr, te = arrays["split"] == 0, arrays["split"] == 1
    for name in ("backbone", "S", "U1"):
        x, y = torch.from_numpy(arrays[name]).double(), torch.from_numpy(arrays["y"])
        assert linear_probe(x[tr], y[tr], x[te], y[te]) == metrics["accuracies"][name], name

    # refusals: an existing file, data of other shapes, a missing run, a data flag of another
    # dataset; none of them touches the file written above
    before = emb.read_bytes()
    cases = [
        ([str(run), *TINY_SYNTHETIC, "--out", str(emb)], "exists; pass --overwrite"),
        ([str(run), "--out", str(tmp_path / "o.npz")], "trained on examples of shape x1 [12]"),
        ([str(tmp_path / "none"), "--out", str(tmp_path / "o.npz")], "checkpoint not found"),
        ([str(run), "--task", "2", "--out", str(tmp_path / "o.npz")], "--task applies"),
        ([str(run), "--out", str(tmp_path / "o.txt")], "must name a .npz file"),
    ]
    for argv, expected in cases:
        _one_line_error(capsys, cli.main(["embed", *argv]), expected)
    assert emb.read_bytes() == before and not (tmp_path / "o.npz").exists()
    assert cli.main(["embed", str(run / "checkpoint.pt"), *TINY_SYNTHETIC, "--n-examples", "150",
                     "--out", str(emb), "--overwrite"]) == 0
    assert "(not the data it was trained on)" in capsys.readouterr().err
    with np.load(emb) as f:
        assert f["S"].shape == (150, model.representations(
            torch.randn(1, 12), torch.randn(1, 12))["S"].shape[1])
    assert sorted(os.listdir(emb.parent)) == ["reps.npz"]  # no temporary file left


def test_cli_compare_writes_table_and_chart(tmp_path, capsys):
    out = tmp_path / "cmp"
    code = cli.main(["compare", "--out", str(out), "--epochs", "1", "--backend", "reference",
                     *TINY, "--seeds", "0", "1"])
    assert code == 0
    table = (out / "compare.md").read_text()
    for label in ("FactorCL-SUP", "FactorCL-SSL", "SimCLR", "SupCon"):
        assert label in table
    assert "±" in table and table in capsys.readouterr().out
    summary = json.loads((out / "compare.json").read_text())
    assert len(summary["models"]["simclr"]["per_seed"]) == 2
    assert (out / "compare.png").stat().st_size > 1000


def test_train_refuses_to_replace_a_run_unless_asked(tmp_path):
    d = _data()
    first = T.train(_cfg(probe=True), d, str(tmp_path))
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(T.TrainError, match="already holds a run .*factorcl-sup, checkpoint at "
                                           "step 16.*--resume .*--overwrite"):
        T.train(_cfg(lr=1e-2), d, str(tmp_path))
    assert (tmp_path / "checkpoint.pt").read_bytes() == before  # nothing was touched
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == first["steps"]
    # continuing it is allowed (nothing left to train: it is evaluated again)
    again = T.train(_cfg(probe=True), d, str(tmp_path), resume=str(tmp_path / "checkpoint.pt"))
    assert again["probe_accuracy"] == first["probe_accuracy"]
    # overwrite starts again: the old metrics.json goes at once, the new run's replaces it
    part = T.train(_cfg(lr=1e-2), d, str(tmp_path), overwrite=True, stop_at_step=3)
    assert part["steps"] == 3 and not (tmp_path / "metrics.json").exists()
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
    assert steps == []  # the old run's log was dropped; step 3 is before the first log line
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["config"]["lr"] == 1e-2


def test_compare_continues_and_reuses_runs(tmp_path):
    from factorcl.compare import compare

    d = _data()
    cfg = _cfg(probe=True)
    models = ("factorcl-sup", "simclr")
    lines = []

    def results(summary):  # all but the timings
        return {m: {k: v for k, v in r.items() if k != "seconds"}
                for m, r in summary["models"].items()}

    full = compare(cfg, lambda seed: d, str(tmp_path / "full"), models=models, log=lines.append)
    # an interrupted compare: the first run stopped part-way, the second never started
    run_cfg = _cfg("factorcl-sup", probe=True)
    T.train(run_cfg, d, str(tmp_path / "part" / "factorcl-sup-seed0"), stop_at_step=5)
    lines.clear()
    resumed = compare(cfg, lambda seed: d, str(tmp_path / "part"), models=models,
                      log=lines.append)
    assert "steps 5..16" in "\n".join(lines)  # the stopped run was continued, not restarted
    assert results(resumed) == results(full)
    # the same command again reuses every finished run
    lines.clear()
    again = compare(cfg, lambda seed: d, str(tmp_path / "part"), models=models, log=lines.append)
    assert sum("finished earlier, reusing" in line for line in lines) == 2
    assert again["models"] == resumed["models"]
    # other settings: refused, naming the difference, until --overwrite
    with pytest.raises(T.TrainError, match="epochs=2 but this run has epochs=1.*--overwrite"):
        compare(_cfg(epochs=1, probe=True), lambda seed: d, str(tmp_path / "part"),
                models=models, log=lines.append)
    short = compare(_cfg(epochs=1, probe=True), lambda seed: d, str(tmp_path / "part"),
                    models=models, log=lines.append, overwrite=True)
    assert short["models"]["simclr"]["steps"] == 8


@pytest.mark.parametrize("flag", [False, True])
def test_deterministic_flag_reaches_every_critic_op(tmp_path, monkeypatch, flag):
    # --deterministic reaches the core op of every critic call of every model (training steps,
    # NCE-CLUB steps, the MI probes of the evaluation) and turns on PyTorch's deterministic
    # algorithms for the run only; without it neither happens.
    from factorcl_ext import ops

    backend = _fused_or_reference()
    if backend == "reference":
        pytest.skip("the fused CPU kernels are not built")
    seen, torch_mode = [], []
    real_core, real_step = ops._core, T.main_step

    def core(name, backend, deterministic, args):
        seen.append((name, deterministic))
        return real_core(name, backend, deterministic, args)

    def step(*args, **kw):
        torch_mode.append(torch.are_deterministic_algorithms_enabled())
        return real_step(*args, **kw)

    monkeypatch.setattr(ops, "_core", core)
    monkeypatch.setattr(T, "main_step", step)
    before = torch.are_deterministic_algorithms_enabled()
    out = tmp_path / "cmp"
    argv = ["compare", "--out", str(out), "--epochs", "1", "--backend", backend, *TINY,
            "--models", "factorcl-sup,factorcl-ssl,simclr,supcon", "--mi-probe-steps", "2"]
    assert cli.main(argv + (["--deterministic"] if flag else [])) == 0
    assert torch.are_deterministic_algorithms_enabled() == before  # restored
    assert torch_mode and set(torch_mode) == {flag or before}
    assert {name for name, _ in seen} == {"pair_mlp_loss", "pair_dot_loss"}
    assert {d for _, d in seen} == {flag}
    for model in ("factorcl-sup", "simclr"):  # the MI probes ran (their calls are in `seen`)
        metrics = json.loads((out / f"{model}-seed0" / "metrics.json").read_text())
        assert any(k.startswith("infonce I(") for k in metrics["mi"]), metrics["mi"]
    ckpt = torch.load(out / "factorcl-sup-seed0" / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["model_cfg"]["critic_deterministic"] is flag


def test_resume_may_change_how_critics_are_computed(tmp_path):
    # --backend and --deterministic choose how the critics are computed, not what: a run made
    # with the materialising reference continues on the fused kernels to rounding, while
    # compare, which reuses a finished run as it is, treats them as other settings.
    backend = _fused_or_reference()
    if backend == "reference":
        pytest.skip("the fused CPU kernels are not built")
    d = _data()
    cfg = _cfg("factorcl-ssl", dtype="float64")  # SMALL: critic_backend="reference"
    full = T.train(cfg, d, str(tmp_path / "full"))
    part = T.train(cfg, d, str(tmp_path / "part"), stop_at_step=5)
    fused = _cfg("factorcl-ssl", dtype="float64", model_cfg=dataclasses.replace(
        SMALL, critic_backend=backend, critic_deterministic=True))
    resumed = T.train(fused, d, str(tmp_path / "part"), resume=part["checkpoint"])
    assert resumed["steps"] == full["steps"] and resumed["backend"] == "cpu"
    # Adam turns the rounding noise of a gradient that is zero by construction into whole
    # steps, so those parameters are left out; the rest agree to float64 rounding.
    model = full["model_ref"]
    skip = _zero_gradient_by_construction(model)
    a = [p.detach() for p in model.parameters() if id(p) not in skip]
    b = [p.detach() for p in resumed["model_ref"].parameters()
         if id(p) not in _zero_gradient_by_construction(resumed["model_ref"])]
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, rtol=1e-9, atol=1e-9)
    assert resumed["final_loss"] == pytest.approx(full["final_loss"], rel=1e-9)
    with pytest.raises(T.TrainError, match="critic_backend='auto' but this run has "
                                           "critic_backend='reference'"):
        T.previous_run(str(tmp_path / "part"), cfg, d)


def test_checkpoints_from_before_a_setting_existed_still_match(tmp_path):
    # A checkpoint written before a setting was added (here critic_deterministic) is compared as
    # if it had the setting's default: compare reuses it rather than refusing it.
    cfg, d, _ = _edited_checkpoint(
        tmp_path, lambda state: state["config"]["model_cfg"].pop("critic_deterministic"))
    assert T.previous_run(str(tmp_path), cfg, d)["metrics"] is not None
    with pytest.raises(T.TrainError, match="critic_deterministic=False but this run has "
                                           "critic_deterministic=True"):
        T.previous_run(str(tmp_path), _cfg("simclr", probe=True, model_cfg=M.ModelConfig(
            **{**SMALL.__dict__, "critic_deterministic": True})), d)


def test_settings_the_model_does_not_use_do_not_block_reuse_or_resume(tmp_path):
    # A run of `compare --models factorcl-sup,simclr --critic-hidden 12` records critic_hidden=12
    # in its SimCLR run too; `compare --models simclr` (where --critic-hidden is refused) must
    # still reuse it, and a resume must still continue it.
    d = _data()
    cfg = _cfg("simclr", probe=True, aug_noise=0.3, num_club_iter=2)
    T.train(cfg, d, str(tmp_path))
    other = _cfg("simclr", probe=True, model_cfg=dataclasses.replace(
        SMALL, critic_hidden=SMALL.critic_hidden + 1, critic_layers=SMALL.critic_layers + 1))
    assert T.previous_run(str(tmp_path), other, d)["metrics"] is not None
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    T._check_resume(state, dataclasses.replace(other, epochs=other.epochs + 1), d, "ckpt")
    used = _cfg("simclr", probe=True, model_cfg=dataclasses.replace(SMALL, temperature=0.5))
    with pytest.raises(T.TrainError, match="temperature=0.07 but this run has temperature=0.5"):
        T.previous_run(str(tmp_path), used, d)
    with pytest.raises(T.TrainError, match="model='simclr' but this run has model='supcon'"):
        T.previous_run(str(tmp_path), _cfg("supcon", probe=True), d)


def _edited_checkpoint(tmp_path, edit):
    """A finished SimCLR run in ``tmp_path`` whose checkpoint ``edit(state)`` has changed (as an
    older factorcl would have written it): (its config, its data, the checkpoint's path)."""
    d = _data()
    cfg = _cfg("simclr", probe=True)
    T.train(cfg, d, str(tmp_path))
    path = tmp_path / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    edit(state)
    T.save_checkpoint(str(path), state)
    return cfg, d, path


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("name", ["factorcl-ssl", "supcon"])
def test_gpu_training_with_deterministic_critics_resumes_bit_identically(tmp_path, backend,
                                                                         name):
    # The trainer on a GPU (bfloat16 autocast, the default there), evaluation and InfoNCE MI
    # probes included; with deterministic critics and PyTorch's deterministic algorithms (what
    # --deterministic turns on) a resumed run equals an uninterrupted one bit for bit.
    import factorcl_ext

    if backend not in factorcl_ext.available_backends():
        pytest.skip(f"{backend} is not available here")
    d = _data()
    cfg = _cfg(name, device="cuda", probe=True, mi_probe_steps=3, checkpoint_every=3,
               model_cfg=dataclasses.replace(SMALL, critic_backend=backend,
                                             critic_deterministic=True))
    with cli._deterministic_mode(True):  # the rest of what --deterministic turns on
        full = T.train(cfg, d, str(tmp_path / "full"))
        part = T.train(cfg, d, str(tmp_path / "part"), stop_at_step=7)
        resumed = T.train(cfg, d, str(tmp_path / "part"), resume=part["checkpoint"])
    assert full["backend"] == backend and full["device"].startswith("cuda")
    a, b = full["model_ref"].state_dict(), resumed["model_ref"].state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["final_loss"] == full["final_loss"]
    assert resumed["mi"] == full["mi"] and any(k.startswith("infonce I(") for k in full["mi"])
    assert full["probe_accuracy"] > full["chance_accuracy"]


def _step_benchmark(capsys, device, backends):
    from factorcl import bench

    argv = ["--batch", "16", "--critic-hidden", "8", "--embed-dim", "4", "--repeats", "1",
            "--device", device, "--backends", ",".join(backends)]
    assert bench.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0].strip() for line in lines] == list(backends)
    for line in lines:
        assert "cannot run" not in line and "x vs reference" in line, line


def test_step_benchmark_runs_each_backend(capsys):
    _step_benchmark(capsys, "cpu", ["reference", _fused_or_reference()])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_step_benchmark_on_a_gpu(capsys):
    import factorcl_ext

    gpu = [b for b in ("triton", "cuda") if b in factorcl_ext.available_backends()]
    _step_benchmark(capsys, "cuda", ["reference", *gpu])


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO, os.path.join(REPO, "python")] + sys.path)
    return env


@pytest.mark.parametrize("signals", [
    (signal.SIGINT,),  # Ctrl-C
    (signal.SIGTERM,),  # a batch scheduler's stop
    (signal.SIGINT, signal.SIGTERM),  # Ctrl-C under torchrun: the agent adds SIGTERM at once
], ids=["sigint", "sigterm", "torchrun"])
def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path, signals):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "factorcl.cli", "train", "--model", "simclr", "--epochs",
            "100000", "--out", str(out), "--backend", "reference", "--log-every", "1",
            *TINY_BASELINE]
    proc = subprocess.Popen(argv, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    jsonl = out / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (jsonl.exists() and jsonl.stat().st_size > 0):
        time.sleep(0.1)
    for sig in signals:
        proc.send_signal(sig)
        time.sleep(0.003)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == cli.EXIT_INTERRUPTED, stderr
    assert "Traceback" not in stderr
    assert "interrupted at step" in stderr and "--resume" in stderr
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] >= 1
    logged = [json.loads(line)["step"] for line in jsonl.read_text().splitlines()]
    assert logged[-1] == state["step"]
    assert not (out / "metrics.json").exists()


# ---- what a run is compared on, and what the CLI refuses --------------------------------------


def test_data_fingerprint_covers_every_value_and_the_split():
    # Any change to x1, x2, y (even in the last row) or to the split is other data; the same
    # data in another process gives the same fingerprint.
    d = _data()
    fp = T._data_fingerprint(d)
    assert fp == T._data_fingerprint(_data())

    def changed(**kw):
        return T._data_fingerprint(dataclasses.replace(d, **kw))

    x1, x2, y = d.x1.clone(), d.x2.clone(), d.y.clone()
    x1[-1, -1] += 1.0
    x2[100, 3] += 1.0
    y[-1] = 1 - y[-1]
    train_idx, test_idx = d.train_idx.clone(), d.test_idx.clone()
    train_idx[-1], test_idx[-1] = test_idx[-1].clone(), train_idx[-1].clone()
    for other in (changed(x1=x1), changed(x2=x2), changed(y=y),
                  changed(train_idx=train_idx, test_idx=test_idx)):
        assert other["content_hash"] != fp["content_hash"]
    code = ("from factorcl import data as D, train as T; print(T._data_fingerprint("
            "D.make_synthetic(D.SyntheticConfig(num_examples=160, shared_dim=3, unique_dim=2, "
            "x_dim=12, seed=0)))['content_hash'])")
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == fp["content_hash"]


def test_resume_and_compare_refuse_other_labels(tmp_path, capsys, monkeypatch):
    # The labels alone differ (--label-parts): --resume refuses the checkpoint, and compare
    # refuses to reuse (or continue) the runs of the first labels.
    d = _data()
    shared_only = D.make_synthetic(D.SyntheticConfig(num_examples=160, shared_dim=3, unique_dim=2,
                                                     x_dim=12, label_parts=("shared",)))
    assert torch.equal(shared_only.x1, d.x1) and not torch.equal(shared_only.y, d.y)
    part = T.train(_cfg(), d, str(tmp_path / "r"), stop_at_step=2)
    with pytest.raises(T.TrainError, match="different data .*label_parts"):
        T.train(_cfg(), shared_only, str(tmp_path / "r"), resume=part["checkpoint"])
    out = str(tmp_path / "cmp")
    argv = ["compare", "--out", out, "--epochs", "1", "--backend", "reference", "--models",
            "simclr", *TINY_BASELINE]
    assert cli.main(argv) == 0
    capsys.readouterr()
    _one_line_error(capsys, cli.main(argv + ["--label-parts", "shared"]), "label_parts")
    # a failed --overwrite leaves none of the old results (summary, checkpoint) behind
    with monkeypatch.context() as m:
        m.setattr(T, "main_step", lambda *a, **k: (_ for _ in ()).throw(T.TrainError("failed")))
        assert cli.main(argv + ["--label-parts", "shared", "--overwrite"]) == cli.EXIT_USAGE
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("error: failed")
    assert os.listdir(out) == ["simclr-seed0"]
    assert not os.path.exists(os.path.join(out, "simclr-seed0", "checkpoint.pt"))
    assert cli.main(argv + ["--label-parts", "shared", "--overwrite"]) == 0
    assert "reusing" not in capsys.readouterr().err


def test_checkpoint_of_the_old_data_format_is_refused_clearly(tmp_path):
    def old_format(state):
        fp = state["data"]
        state["data"] = {k: fp[k] for k in ("name", "n", "num_train", "x1", "x2", "num_classes")}
        state["data"]["checksum"] = 12.5  # what factorcl recorded before it hashed the data

    cfg, d, path = _edited_checkpoint(tmp_path, old_format)
    with pytest.raises(T.TrainError, match="older factorcl.*--overwrite"):
        T.train(cfg, d, str(tmp_path), resume=str(path))
    with pytest.raises(T.TrainError, match="older factorcl.*--overwrite"):
        T.previous_run(str(tmp_path), cfg, d)
    T.load_model(str(tmp_path))  # still usable for its representations


def test_resume_with_fewer_epochs_than_trained_is_refused(tmp_path):
    d = _data()
    done = T.train(_cfg(epochs=2), d, str(tmp_path))
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(T.TrainError, match="at step 16.*--epochs 2 or more"):
        T.train(_cfg(epochs=1), d, str(tmp_path), resume=done["checkpoint"])
    assert (tmp_path / "metrics.jsonl").read_text() == before  # nothing was touched


def test_failed_overwrite_leaves_no_file_of_the_old_run(tmp_path, monkeypatch):
    d = _data()
    T.train(_cfg(probe=True), d, str(tmp_path))
    ckpt = str(tmp_path / "checkpoint.pt")
    with pytest.raises(T.TrainError, match="--resume .*--overwrite"):
        T.train(_cfg(), d, str(tmp_path), resume=ckpt, overwrite=True)
    assert os.path.exists(ckpt) and (tmp_path / "metrics.json").exists()  # refused: untouched

    def fails(*a, **k):
        raise T.TrainError("the step failed")

    monkeypatch.setattr(T, "main_step", fails)
    with pytest.raises(T.TrainError, match="the step failed"):
        T.train(_cfg(lr=1e-2), d, str(tmp_path), overwrite=True)
    # the old run's checkpoint, metrics.json and log are gone with it, not left to be resumed
    assert set(os.listdir(tmp_path)) <= {"metrics.jsonl"}
    assert not os.path.exists(ckpt) and (tmp_path / "metrics.jsonl").read_text() == ""


def test_cli_refuses_resume_with_overwrite(tmp_path, capsys):
    argv = ["train", "--model", "simclr", "--epochs", "1", "--out", str(tmp_path),
            "--backend", "reference", "--no-probe", *TINY_BASELINE]
    assert cli.main(argv) == 0
    before = (tmp_path / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    code = cli.main(argv + ["--epochs", "2", "--resume", str(tmp_path / "checkpoint.pt"),
                            "--overwrite"])
    _one_line_error(capsys, code, "--resume and --overwrite")
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_cli_unusable_out_is_one_line(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    run = tmp_path / "run"
    assert cli.main(["train", "--model", "simclr", "--epochs", "1", "--out", str(run),
                     "--backend", "reference", "--no-probe", *TINY_BASELINE]) == 0
    (tmp_path / "adir.npz").mkdir()
    capsys.readouterr()
    bad = [str(afile), str(afile / "sub")] + (["/proc/factorcl-out"] if os.path.isdir("/proc")
                                               else [])
    commands = [
        ["train", "--model", "simclr", "--epochs", "1", "--backend", "reference", *TINY_BASELINE],
        ["compare", "--models", "simclr", "--epochs", "1", "--backend", "reference",
         *TINY_BASELINE],
        ["mi-bench", "--quick", "--dims", "3", "--levels", "1", "--steps-per-level", "4",
         "--hidden", "8", "--no-large-batch", "--backend", "reference", "--no-progress"],
    ]
    for argv in commands:
        for out in bad:
            _one_line_error(capsys, cli.main(argv + ["--out", out]), out)
        with pytest.raises(SystemExit) as exc:
            cli.main(argv + ["--out", ""])
        _one_line_error(capsys, exc.value.code, "--out")
    for out in [str(afile / "e.npz"), str(tmp_path / "adir.npz")] + [
            p + ".npz" for p in bad[2:]]:
        _one_line_error(capsys, cli.main(["embed", str(run), *TINY_SYNTHETIC, "--out", out,
                                          "--overwrite"]), out)


def test_single_class_training_split_is_refused_before_training(tmp_path, capsys):
    y = np.arange(60) % 2
    split = np.where(y == 1, 1, 0)
    split[:2] = 1  # the test split has both classes, the training split only class 0
    np.savez(tmp_path / "d.npz", x1=np.random.randn(60, 4), x2=np.random.randn(60, 3), y=y,
             split=split)
    out = tmp_path / "o"
    code = cli.main(["train", "--dataset", f"npz:{tmp_path / 'd.npz'}", "--out", str(out),
                     "--backend", "reference", *TINY_CRITIC, *TINY_MODEL, "--batch-size", "8"])
    _one_line_error(capsys, code, "the training split (29 examples) holds a single class")
    assert not out.exists()


@pytest.mark.parametrize("extra, expected", [
    (["--aug-drop", "5"], "--aug-drop"), (["--aug-drop", "1"], "--aug-drop"),
    (["--aug-drop", "-1"], "--aug-drop"), (["--aug-noise", "-1"], "--aug-noise"),
    (["--aug-noise", "nan"], "--aug-noise"), (["--aug-noise", "inf"], "--aug-noise"),
    (["--lr", "1e38"], "--lr"), (["--club-lr", "1e38"], "--club-lr"),
])
def test_cli_out_of_range_values(tmp_path, capsys, extra, expected):
    out = tmp_path / "o"
    code = cli.main(["train", "--out", str(out), "--backend", "reference", "--model",
                     "factorcl-ssl", *TINY, *extra])
    _one_line_error(capsys, code, expected)
    assert not out.exists()


def test_nan_loss_names_the_step_and_the_usual_causes(tmp_path):
    d = _data()
    cfg = _cfg("simclr", model_cfg=dataclasses.replace(SMALL, temperature=1e-38))
    with pytest.raises(T.TrainError) as exc:
        T.train(cfg, d, str(tmp_path))
    msg = str(exc.value)
    assert "at step 1" in msg and "--temperature" in msg and "--lr" in msg
    assert "--club-lr" not in msg  # SimCLR has no NCE-CLUB critics


def test_cli_resume_of_a_file_that_is_no_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", "--model", "simclr", "--epochs", "1", "--out", str(run),
                     "--backend", "reference", "--no-probe", *TINY_BASELINE]) == 0
    junk = tmp_path / "junk.pt"
    junk.write_text("hello\n")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((run / "checkpoint.pt").read_bytes()[:5000])
    objects = tmp_path / "objects.pt"  # torch's refusal spans lines, advising weights_only=False
    torch.save({"x": np.zeros(3)}, objects)
    capsys.readouterr()
    for path in (junk, truncated, objects):
        code = cli.main(["train", "--model", "simclr", "--epochs", "1", "--out", str(run),
                         "--backend", "reference", "--resume", str(path), *TINY_BASELINE])
        err = capsys.readouterr().err
        assert code == cli.EXIT_USAGE and len(err.strip().splitlines()) == 1, err
        assert f"cannot read {path}: not a factorcl checkpoint, or a damaged one" in err, err
        assert "weights_only" not in err  # no advice to load it unsafely


def test_cli_train_always_ends_with_a_summary(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--model", "simclr", "--epochs", "1", "--out", str(out),
                     "--backend", "reference", "--no-probe", *TINY_BASELINE]) == 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "5 steps" in last and "final loss" in last and str(out) in last, last


def test_cli_ctrl_c_in_the_final_evaluation_keeps_the_checkpoint(tmp_path, capsys, monkeypatch):
    from factorcl import eval as E

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    out = tmp_path / "run"
    argv = ["train", "--model", "simclr", "--epochs", "1", "--out", str(out), "--backend",
            "reference", *TINY_BASELINE]
    with monkeypatch.context() as m:
        m.setattr(E, "evaluate", interrupted)
        assert cli.main(argv) == cli.EXIT_INTERRUPTED
    err = capsys.readouterr().err
    ckpt = str(out / "checkpoint.pt")
    assert "final evaluation" in err and f"--resume {ckpt}" in err, err
    assert torch.load(ckpt, weights_only=True)["step"] == 5
    assert not (out / "metrics.json").exists()
    assert cli.main(argv + ["--resume", ckpt]) == 0  # evaluates, trains nothing more
    assert json.loads((out / "metrics.json").read_text())["steps"] == 5


@pytest.mark.parametrize("argv, expected", [
    (["train", "--model", "simclr", "--club-lr", "1e-3"],
     "--club-lr applies to --model factorcl-sup / factorcl-ssl only, not to simclr"),
    (["train", "--model", "supcon", "--num-club-iter", "3"], "--num-club-iter applies"),
    (["train", "--model", "factorcl-sup", "--temperature", "0.5"],
     "--temperature applies to --model simclr / supcon only"),
    (["train", "--model", "factorcl-sup", "--aug-noise", "0.3"],
     "--aug-noise applies to --model factorcl-ssl only"),
    (["train", "--model", "simclr", "--aug-drop", "0.3"], "--aug-drop applies"),
    (["train", "--model", "supcon", "--augmentations", "noise"], "--augmentations applies"),
    (["compare", "--models", "simclr,supcon", "--club-lr", "1e-3"],
     "--club-lr applies to --model factorcl-sup / factorcl-ssl only, not to simclr, supcon"),
    (["train", "--model", "simclr", "--critic-hidden", "64"],
     "--critic-hidden applies to --model factorcl-sup / factorcl-ssl only, not to simclr"),
    (["compare", "--models", "simclr,supcon", "--critic-layers", "2"],
     "--critic-layers applies to --model factorcl-sup / factorcl-ssl only"),
    (["train", "--model", "factorcl-ssl", "--no-normalize-projections"],
     "--no-normalize-projections applies to --model simclr / supcon only, not to factorcl-ssl"),
])
def test_cli_refuses_flags_the_model_does_not_use(tmp_path, capsys, argv, expected):
    out = tmp_path / "o"
    code = cli.main(argv + ["--out", str(out), "--backend", "reference", "--epochs", "1",
                            *TINY_BASELINE])
    _one_line_error(capsys, code, expected)
    assert not out.exists()


@pytest.mark.parametrize("task", ["-2", "20", "x"])
def test_cli_task_outside_mortality_and_icd9_codes_is_refused(capsys, task):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--out", "x", "--dataset", "multibench:im.pk", "--task", task])
    _one_line_error(capsys, exc.value.code,
                    "--task: expected -1 (mortality) or an ICD-9 code index 0..19")


def test_step_benchmark_names_the_backend_its_speed_ups_are_against(capsys, monkeypatch):
    # the first backend listed cannot run: the others are compared with the first that ran
    from factorcl import bench

    seconds = {"reference": 0.4, "cpu": 0.2}

    def timed(**kw):
        if kw["backend"] not in seconds:
            raise RuntimeError(f"backend={kw['backend']!r} cannot run here")
        return seconds[kw["backend"]]

    monkeypatch.setattr(bench, "step_seconds", timed)
    assert bench.main(["--backends", "triton,reference,cpu", "--batch", "16"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "triton: cannot run" in lines[0]
    assert "1.00x vs reference" in lines[1] and "2.00x vs reference" in lines[2], lines


@pytest.mark.parametrize("argv, expected", [
    (["--backends", "bogus"], "argument --backends: unknown backend 'bogus'"),
    (["--backends", "reference,gpu"], "unknown backend 'gpu'"),
    (["--backends", ","], "argument --backends: expected a comma-separated list"),
    (["--repeats", "0"], "argument --repeats: expected a positive integer, got '0'"),
    (["--device", "tpu"], "--device: unknown device 'tpu'"),
    # every backend was reported as unable to run: the batch was the problem
    (["--batch", "9"], "--batch 9: synthetic num_examples must be at least 10, got 9"),
    # simclr has no concat critic (the line said "critic H=8" all the same)
    (["--model", "simclr"], "--critic-hidden applies to --model factorcl-sup / factorcl-ssl "
                            "only, not to simclr"),
])
def test_step_benchmark_bad_flags_are_one_line(capsys, argv, expected):
    from factorcl import bench

    with pytest.raises(SystemExit) as exc:
        bench.main(["--batch", "16", "--critic-hidden", "8", "--embed-dim", "4", "--repeats",
                    "1", *argv])
    _one_line_error(capsys, exc.value.code, expected)


def test_step_benchmark_fails_when_no_backend_runs(capsys, monkeypatch):
    from factorcl import bench

    def refused(**kw):
        raise ValueError(f"backend={kw['backend']!r} refused")

    monkeypatch.setattr(bench, "step_seconds", refused)
    code = bench.main(["--batch", "12", "--backends", "reference,cpu", "--repeats", "1"])
    captured = capsys.readouterr()
    assert "reference: cannot run (backend='reference' refused)" in captured.out
    err = captured.err.strip().splitlines()
    assert code == cli.EXIT_USAGE and len(err) == 1, err
    assert "no backend could run" in err[0] and "--batch 12" in err[0], err[0]
    assert "cpu: backend='cpu' refused" in err[0], err[0]


def test_step_benchmark_names_the_critic_width_only_for_models_with_concat_critics(
        capsys, monkeypatch):
    from factorcl import bench

    monkeypatch.setattr(bench, "step_seconds", lambda **kw: 0.5)
    for model, width in (("supcon", ""), ("factorcl-ssl", ", critic H=512")):
        assert bench.main(["--model", model, "--backends", "reference"]) == 0
        line = capsys.readouterr().out.strip()
        assert f"({model}, batch 256{width}, " in line, line


def test_step_seconds_is_the_median(monkeypatch):
    # an even number of timed steps: the mean of the middle two, not the upper one
    import types

    from factorcl import bench

    clock, durations = [0.0], iter([5.0, 1.0, 3.0])  # the warm-up, then the timed steps

    def step():
        clock[0] += next(durations)

    monkeypatch.setattr(bench, "make_step", lambda **kw: step)
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    assert bench.step_seconds(repeats=2) == 2.0


# ---- evaluation outputs: compare's summary, whole files, optional dependencies -----------------


def test_compare_without_the_probe_is_refused_before_training(tmp_path):
    from factorcl.compare import compare

    out = tmp_path / "cmp"
    with pytest.raises(T.TrainError, match="needs probe=True"):
        compare(_cfg("simclr", probe=False), lambda seed: _data(seed=seed), str(out),
                models=("simclr",), log=lambda msg: None)
    assert not out.exists()  # nothing was trained


def test_compare_summary_of_one_and_of_several_seeds(tmp_path):
    from factorcl.compare import bar_chart, compare

    cfg = _cfg("simclr", epochs=1, probe=True)
    one = compare(cfg, lambda seed: _data(seed=seed), str(tmp_path / "one"), models=("simclr",),
                  log=lambda msg: None)
    m = json.loads((tmp_path / "one" / "compare.json").read_text())["models"]["simclr"]
    assert m["probe_accuracy_std"] is None and all(std is None for _, std in m["parts"].values())
    assert "±" not in one["table"]
    assert (tmp_path / "one" / "compare.png").stat().st_size > 1000
    # each seed draws its own data, so its own chance accuracy: the summary has their mean
    many = compare(cfg, lambda seed: _data(seed=seed), str(tmp_path / "many"),
                   models=("simclr", "supcon"), seeds=(0, 1), log=lambda msg: None)
    chances = [json.loads((tmp_path / "many" / f"simclr-seed{s}" / "metrics.json").read_text())
               ["chance_accuracy"] for s in (0, 1)]
    assert chances[0] != chances[1]
    for m in many["models"].values():
        assert m["chance_accuracy"] == pytest.approx(sum(chances) / 2)
        assert m["probe_accuracy_std"] is not None
    assert "±" in many["table"]
    bar_chart(many, str(tmp_path / "many.png"))
    assert (tmp_path / "many.png").stat().st_size > 1000


def test_bar_chart_leaves_matplotlib_as_it_was(tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    from factorcl.compare import bar_chart

    before = matplotlib.get_backend()
    summary = {"seeds": [0], "models": {"simclr": {
        "label": "SimCLR", "probe_accuracy": 0.9, "probe_accuracy_std": None,
        "chance_accuracy": 0.5}}}
    matplotlib.use("svg")  # a caller's backend and figure
    try:
        fig = plt.figure()
        bar_chart(summary, str(tmp_path / "c.png"))
        assert matplotlib.get_backend() == "svg"
        assert plt.get_fignums() == [fig.number]
        plt.close(fig)
    finally:
        matplotlib.use(before)
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert os.listdir(tmp_path) == ["c.png"]


def _interrupt_json_after_some_output(monkeypatch):
    """Every JSON encoding writes a little and is then interrupted (a Ctrl-C mid-write)."""
    import json.encoder

    real = json.encoder.JSONEncoder.iterencode

    def interrupted(self, o, *args, **kw):
        chunks = real(self, o, *args, **kw)
        for _ in range(3):
            yield next(chunks)
        raise KeyboardInterrupt

    monkeypatch.setattr(json.encoder.JSONEncoder, "iterencode", interrupted)


def test_summaries_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    from factorcl.compare import compare

    # compare.json and compare.md
    cfg = _cfg("simclr", epochs=1, probe=True)
    out = tmp_path / "cmp"
    compare(cfg, lambda seed: _data(seed=seed), str(out), models=("simclr",),
            log=lambda msg: None)
    before = {name: (out / name).read_bytes() for name in ("compare.json", "compare.md")}
    with monkeypatch.context() as m:
        _interrupt_json_after_some_output(m)
        with pytest.raises(KeyboardInterrupt):  # the same command again, interrupted
            compare(cfg, lambda seed: _data(seed=seed), str(out), models=("simclr",),
                    log=lambda msg: None)
    assert {name: (out / name).read_bytes() for name in before} == before
    assert sorted(os.listdir(out)) == ["compare.json", "compare.md", "compare.png", "simclr-seed0"]
    # metrics.json: a finished run evaluated again (--resume), interrupted as it is written
    run = out / "simclr-seed0"
    before = (run / "metrics.json").read_bytes()
    with monkeypatch.context() as m:
        _interrupt_json_after_some_output(m)
        with pytest.raises(KeyboardInterrupt):
            T.train(_cfg("simclr", epochs=1, probe=True), _data(), str(run),
                    resume=str(run / "checkpoint.pt"))
    assert (run / "metrics.json").read_bytes() == before
    assert sorted(os.listdir(run)) == ["checkpoint.pt", "metrics.json", "metrics.jsonl"]
    # the files get the permissions an ordinary open() gives, not a temporary file's 0600
    mask = os.umask(0o022)
    os.umask(mask)
    for path in (run / "metrics.json", out / "compare.json", run / "checkpoint.pt"):
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask, path


def _without(monkeypatch, package: str) -> None:
    """As if ``package`` were not installed (None in sys.modules refuses its import)."""
    for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, package, None)


def test_cli_without_scikit_learn_fails_before_training(tmp_path, capsys, monkeypatch):
    _without(monkeypatch, "sklearn")
    out = tmp_path / "run"
    for argv in (["train", "--model", "simclr", *TINY_BASELINE],
                 ["compare", "--models", "simclr", *TINY_BASELINE]):
        code = cli.main([*argv, "--epochs", "1", "--backend", "reference", "--out", str(out)])
        _one_line_error(capsys, code, "pip install scikit-learn")
        assert not out.exists()  # before any data is loaded or anything trained
    # --no-probe needs no scikit-learn
    assert cli.main(["train", "--model", "simclr", *TINY_BASELINE, "--epochs", "1",
                     "--backend", "reference", "--out", str(out), "--no-probe"]) == 0


def test_cli_compare_without_matplotlib_skips_the_chart(tmp_path, capsys, monkeypatch):
    _without(monkeypatch, "matplotlib")
    out = tmp_path / "cmp"
    code = cli.main(["compare", "--models", "simclr", *TINY_BASELINE, "--epochs", "1",
                     "--backend", "reference", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0
    assert "| SimCLR |" in captured.out  # the table
    warning = [line for line in captured.err.splitlines() if "matplotlib" in line]
    assert len(warning) == 1 and "pip install matplotlib" in warning[0], captured.err
    wrote = captured.err.strip().splitlines()[-1]
    assert "wrote" in wrote and "compare.png" not in wrote, wrote
    assert sorted(os.listdir(out)) == ["compare.json", "compare.md", "simclr-seed0"]


def test_amp_is_left_off_where_bfloat16_would_merge_factorcl_sups_classes():
    # FactorCL-SUP's x-y critics read the class index as a number; under bfloat16 autocast
    # (--amp auto on a GPU) indices above 256 rounded, and neighbouring classes became one
    # critic input without a word. The premise, then the decision (no GPU needed for it):
    idx = torch.arange(255, 262, dtype=torch.float32)
    assert torch.equal(idx[:2].bfloat16().float(), idx[:2])
    assert idx[2:].bfloat16().unique().numel() < 5  # 257..261 share values
    gpu = torch.device("cuda")
    for model, classes, expected in (("factorcl-sup", 257, True), ("factorcl-sup", 258, False),
                                     ("factorcl-ssl", 1000, True), ("supcon", 1000, True)):
        use, note = T._use_amp(_cfg(model, amp="auto"), gpu, classes)
        assert use is expected, (model, classes)
        assert ("AMP off" in note) is (not expected)
    assert "258 classes" in T._use_amp(_cfg(amp="auto"), gpu, 258)[1]
    with pytest.raises(T.TrainError,
                       match=r"--amp on: factorcl-sup .* \(258 classes\); pass --amp off"):
        T._use_amp(_cfg(amp="on"), gpu, 258)
    assert T._use_amp(_cfg(amp="on"), gpu, 257) == (True, ", bfloat16 autocast")
    assert T._use_amp(_cfg(amp="off"), gpu, 2) == (False, "")
    assert T._use_amp(_cfg(amp="auto"), torch.device("cpu"), 2) == (False, "")
    with pytest.raises(T.TrainError, match="--amp on needs a CUDA device"):
        T._use_amp(_cfg(amp="on"), torch.device("cpu"), 2)


def test_resume_after_a_torn_metrics_line(tmp_path):
    # an append cut short (a crash, a full disk) left a partial last line in metrics.jsonl, and
    # the next --resume (or compare continuing the run) died in json.loads
    d = _data()
    cfg = _cfg("simclr", epochs=1, checkpoint_every=2, log_every=1)
    part = T.train(cfg, d, str(tmp_path), stop_at_step=4)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.12')  # torn: no closing brace, no newline
    resumed = T.train(cfg, d, str(tmp_path), resume=part["checkpoint"])
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == list(range(1, resumed["steps"] + 1))


def test_cli_empty_and_ignored_lists_and_fractions(tmp_path, capsys):
    out = str(tmp_path / "o")
    for models in ("", ","):  # an empty shell variable: IndexError, exit status 1
        code = cli.main(["compare", "--out", out, "--models", models, *TINY])
        _one_line_error(capsys, code, "--models must name at least one, got an empty list")
    path = tmp_path / "s.npz"
    np.savez(path, x1=np.random.randn(40, 3), x2=np.random.randn(40, 3), y=np.arange(40) % 2,
             split=(np.arange(40) % 5 == 0) * 1)
    code = cli.main(["train", "--out", out, "--model", "simclr", "--backend", "reference",
                     "--dataset", f"npz:{path}", "--test-fraction", "0.5", *TINY_MODEL])
    _one_line_error(capsys, code, "a test fraction (0.5) was given, but the file's 'split' key")
    assert not os.path.exists(out)
