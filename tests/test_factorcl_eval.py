"""factorcl.eval: what the chance accuracy and the MI probes of metrics.json estimate (held-out,
scale-free, leaving the caller's random state alone)."""

from __future__ import annotations

import math

import pytest
import torch

from factorcl import data as D
from factorcl import eval as E

F64 = torch.float64


class _Inputs(torch.nn.Module):
    """A "model" whose representations are its inputs: x1, x2 and both together (backbone)."""

    def representations(self, x1, x2):
        return {"backbone": torch.cat([x1, x2], 1), "x1": x1, "x2": x2}


class _Collapsed(torch.nn.Module):
    """A representation that holds nothing: every example maps to the same vector."""

    def representations(self, x1, x2):
        z = torch.zeros(x1.shape[0], 4, dtype=x1.dtype)
        return {"backbone": z, "x1": z, "x2": z}


def _paired(x1, x2, num_train: int) -> D.PairedData:
    n = x1.shape[0]
    y = torch.arange(n) % 2
    return D.PairedData(x1.float(), x2.float(), y, torch.arange(num_train),
                        torch.arange(num_train, n), 2)


def _infonce(data: D.PairedData, steps: int) -> float:
    out = E.evaluate(_Inputs(), data, mi_probe_steps=steps, backend="auto")
    return out["mi"]["infonce I(x1;x2)"]


def test_infonce_probe_is_near_zero_on_independent_data():
    # The critic is fitted on the training split and its bound measured on the test split: on
    # 64-dimensional independent Gaussians a critic scored on its own training batches reported
    # 2.7 nats at 200 steps (at most log 256 = 5.5).
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2400, 64, generator=g), torch.randn(2400, 64, generator=g)
    est = _infonce(_paired(a, b, 1200), steps=200)
    assert abs(est) < 0.1, est


@pytest.mark.parametrize("mi", [1.0, 2.0])
def test_infonce_probe_is_close_to_a_known_mi(mi):
    g = D.make_generator(1, "known-mi")
    x, y = D.sample_correlated_gaussian(2400, 4, mi, g, dtype=F64)
    est = _infonce(_paired(x, y, 1200), steps=200)
    assert mi - 0.3 < est < mi + 0.1, est  # a lower bound: not much above the truth


def test_infonce_probe_minimum_sizes_and_determinism():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 3, generator=g, dtype=F64), torch.randn(40, 3, generator=g, dtype=F64)
    kw = dict(steps=2, backend="reference")
    assert E.infonce_mi_probe(a[:1], b[:1], a[20:], b[20:], **kw) is None  # training split
    assert E.infonce_mi_probe(a[:20], b[:20], a[20:21], b[20:21], **kw) is None  # test split
    assert E.infonce_mi_probe(a[:2], b[:2], a[20:22], b[20:22], **kw) is not None
    assert E.infonce_mi_probe(a[:20], b[:20], a[20:], b[20:], **kw) == E.infonce_mi_probe(
        a[:20], b[:20], a[20:], b[20:], **kw)
    # the test pairs in batches of one size (the last ends at the last pair), fitting or not
    assert math.isfinite(E.infonce_mi_probe(a[:20], b[:20], a[20:], b[20:], batch=7, **kw))


def test_infonce_probe_leaves_the_global_random_state_alone():
    g = torch.Generator().manual_seed(0)
    data = _paired(torch.randn(60, 3, generator=g), torch.randn(60, 3, generator=g), 40)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = _infonce(data, steps=3)
    assert torch.equal(torch.rand(3), expected)
    torch.manual_seed(7)  # and its own numbers do not depend on that state
    assert _infonce(data, steps=3) == first


def test_gaussian_mi_does_not_depend_on_the_scale():
    g = torch.Generator().manual_seed(0)
    n, d, rho = 2000, 4, 0.8
    a = torch.randn(n, d, generator=g, dtype=F64)
    b = rho * a + math.sqrt(1 - rho**2) * torch.randn(n, d, generator=g, dtype=F64)
    true = -0.5 * d * math.log(1 - rho**2)
    ref = E.gaussian_mi(a, b)
    assert abs(ref - true) < 0.05, (ref, true)
    for scale in (1.0, 1e-6, 1e-9, 1e6):
        for sa, sb in ((scale, scale), (scale, 1.0)):
            est = E.gaussian_mi(a * sa, b * sb)
            assert abs(est - ref) <= 1e-6 * ref, (sa, sb, est, ref)


def test_chance_accuracy_is_a_constant_classifier_fitted_on_the_training_split():
    # training split 70/30, test split 40/60: always predicting the training majority (class 0)
    # scores 40 % on the test split, as does a probe on a representation that holds nothing;
    # the test split's own majority rate (60 %) is out of reach without the test labels
    y = torch.cat([torch.zeros(70), torch.ones(30), torch.zeros(40), torch.ones(60)]).long()
    x = torch.randn(200, 3)
    data = D.PairedData(x, x.clone(), y, torch.arange(100), torch.arange(100, 200), 2)
    out = E.evaluate(_Collapsed(), data)
    assert out["chance_accuracy"] == pytest.approx(0.4)
    assert out["probe_accuracy"] == pytest.approx(out["chance_accuracy"])
    assert E.chance_accuracy(y[:100], y[100:]) == pytest.approx(0.4)
    # a training majority class absent from the test split
    assert E.chance_accuracy(torch.tensor([2, 2, 1]), torch.tensor([0, 1])) == 0.0


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_infonce_probe_trains_its_critic_when_called_without_gradients(context):
    # an evaluation is naturally wrapped in no_grad or inference_mode; the probe's critic still
    # trains (its backward failed: "element 0 of tensors does not require grad"), to the same
    # estimate, and the caller's mode is left as it was
    g = torch.Generator().manual_seed(0)
    with context():
        a, b = torch.randn(60, 3, generator=g), torch.randn(60, 3, generator=g)
        kw = dict(steps=3, backend="reference")
        est = E.infonce_mi_probe(a[:40], b[:40], a[40:], b[40:], **kw)
        assert not torch.is_grad_enabled()
    assert est == E.infonce_mi_probe(a[:40].clone(), b[:40].clone(), a[40:].clone(),
                                     b[40:].clone(), **kw)


def test_infonce_probe_refuses_sides_of_different_lengths():
    a, b = torch.randn(60, 3), torch.randn(80, 3)
    with pytest.raises(ValueError, match="a_test and b_test must hold the same pairs, got 20 "
                                         "and 40 rows"):
        E.infonce_mi_probe(a[:40], b[:40], a[40:60], b[40:80], steps=1, backend="reference")
    with pytest.raises(ValueError, match="a_train and b_train .* got 40 and 41 rows"):
        E.infonce_mi_probe(a[:40], b[:41], a[40:], b[40:60], steps=1, backend="reference")


class _Linear(torch.nn.Module):
    """A model with parameters (its dtype is theirs) that refuses inputs with a NaN."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 2)

    def representations(self, x1, x2):
        if x1.isnan().any():
            raise ValueError("a NaN input")
        z = self.proj(x1)
        return {"backbone": torch.cat([z, x2], 1), "x1": z, "x2": x2}


def test_evaluate_runs_the_model_in_its_own_dtype():
    # a float64 model (load_model of a --dtype float64 run) got float32 inputs and failed in
    # its first matmul; the inputs now take the parameters' dtype unless dtype is given
    g = torch.Generator().manual_seed(0)
    data = _paired(torch.randn(60, 3, generator=g), torch.randn(60, 3, generator=g), 40)
    model = _Linear().double()
    out = E.evaluate(model, data)
    assert 0.0 <= out["probe_accuracy"] <= 1.0
    reps = E.embed(model, data.x1, data.x2, "cpu")
    expected = model.proj(data.x1.double()).detach()
    assert torch.equal(reps["x1"], expected)
    with pytest.raises(RuntimeError):  # an explicit dtype is still obeyed
        E.embed(model, data.x1, data.x2, "cpu", torch.float32)


def test_embed_leaves_the_model_in_its_mode_when_a_batch_is_refused():
    model = _Linear()
    x1 = torch.randn(10, 3)
    x1[7, 1] = float("nan")
    for training in (True, False):
        model.train(training)
        with pytest.raises(ValueError, match="a NaN input"):
            E.embed(model, x1, torch.randn(10, 3), "cpu", chunk=4)
        assert model.training is training
