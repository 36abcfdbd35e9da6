"""factorcl.data: the synthetic generator, augmentations (inputs never modified), the MI samplers,
and the loaders' errors on bad files."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from factorcl import data as D

# ---- synthetic ------------------------------------------------------------------------------


def test_synthetic_shapes_balance_and_determinism():
    cfg = D.SyntheticConfig(num_examples=500, shared_dim=4, unique_dim=3, x_dim=17, seed=3)
    a, b = D.make_synthetic(cfg), D.make_synthetic(cfg)
    assert a.x1.shape == (500, 17) and a.x2.shape == (500, 17) and a.y.shape == (500,)
    assert a.x1.dtype == torch.float32 and a.y.dtype == torch.int64
    assert torch.equal(a.x1, b.x1) and torch.equal(a.y, b.y)
    assert torch.equal(a.train_idx, b.train_idx)
    assert len(a.train_idx) + len(a.test_idx) == 500
    assert not set(a.train_idx.tolist()) & set(a.test_idx.tolist())
    assert 0.4 < a.y.float().mean() < 0.6
    c = D.make_synthetic(D.SyntheticConfig(num_examples=500, shared_dim=4, unique_dim=3, x_dim=17,
                                           seed=4))
    assert not torch.equal(a.x1, c.x1)


def test_synthetic_label_depends_on_chosen_parts_only():
    # Labels from the shared part only: a linear probe on the shared latent alone is perfect,
    # on the unique latents it is at chance.
    cfg = D.SyntheticConfig(num_examples=2000, label_parts=("shared",), noise=0.0, seed=1)
    d = D.make_synthetic(cfg)
    s = d.latents["shared"]
    assert torch.equal(d.y, (s.sum(1) > 0).long())
    u = d.latents["unique1"]
    corr = torch.corrcoef(torch.stack([u.sum(1), d.y.float()]))[0, 1]
    assert abs(corr) < 0.1


def test_synthetic_nonlinear_is_balanced_and_not_linear_in_sum():
    d = D.make_synthetic(D.SyntheticConfig(num_examples=1000, label_fn="nonlinear", seed=2))
    assert abs(d.y.float().mean() - 0.5) < 0.01
    z = torch.cat([d.latents[p] for p in ("shared", "unique1", "unique2")], 1)
    assert not torch.equal(d.y, (z.sum(1) > 0).long())


@pytest.mark.parametrize("bad", [dict(num_examples=0), dict(label_fn="cubic"),
                                 dict(label_parts=("shared", "nope")), dict(noise=-1.0),
                                 dict(label_dims={"shared": 99}), dict(projection="sparse")])
def test_synthetic_bad_config(bad):
    with pytest.raises(D.DataError):
        D.make_synthetic(D.SyntheticConfig(**bad))


def test_uniform_projection_makes_the_label_direction_dominant():
    # The authors' U[0, 1] projections: the top principal component of a modality is (nearly)
    # the sum of its latents; with Gaussian projections no direction is preferred.
    for projection, lo, hi in (("uniform", 0.9, 1.0), ("gaussian", 0.0, 0.6)):
        d = D.make_synthetic(D.SyntheticConfig(num_examples=3000, noise=0.0, projection=projection,
                                               seed=4))
        x = d.x1 - d.x1.mean(0)
        top = torch.linalg.svd(x, full_matrices=False)[2][0]
        s = torch.cat([d.latents["shared"], d.latents["unique1"]], 1).sum(1)
        corr = torch.corrcoef(torch.stack([x @ top, s]))[0, 1].abs()
        assert lo <= corr <= hi, (projection, corr)


def test_epoch_permutation_seeded():
    p0 = D.epoch_permutation(50, seed=1, epoch=0)
    assert torch.equal(p0, D.epoch_permutation(50, seed=1, epoch=0))
    assert not torch.equal(p0, D.epoch_permutation(50, seed=1, epoch=1))
    assert sorted(p0.tolist()) == list(range(50))


# ---- augmentations --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(37, 11), (9, 7, 5)])
def test_augment_leaves_input_intact_and_is_seeded(shape):
    x = torch.randn(*shape)
    before = x.clone()
    a = D.augment(x, D.make_generator(0, "t"))
    assert torch.equal(x, before)
    assert a.shape == x.shape and a.data_ptr() != x.data_ptr()
    assert torch.equal(a, D.augment(x, D.make_generator(0, "t")))
    assert not torch.equal(a, D.augment(x, D.make_generator(1, "t")))


def test_each_vector_augmentation():
    x = torch.randn(8, 6) + 3.0
    g = lambda: D.make_generator(5)  # noqa: E731
    assert torch.equal(D.augment_vectors(x, g(), ops=("identity",)), x)
    swap = D.augment_vectors(x, g(), ops=("half_swap",))
    assert torch.equal(swap, torch.cat([x[:, 3:], x[:, :3]], 1))
    drop = D.augment_vectors(x, g(), drop_prob=0.5, ops=("drop",))
    kept = drop != 0
    assert torch.equal(drop[kept], x[kept]) and 0 < kept.sum() < x.numel()
    noisy = D.augment_vectors(x, g(), noise_std=0.1, ops=("noise",))
    assert 0 < (noisy - x).abs().max() < 2.0
    mixed = D.augment_vectors(torch.randn(400, 6), g())
    assert mixed.shape == (400, 6)


def test_each_sequence_augmentation():
    x = torch.randn(4, 9, 3)
    g = lambda: D.make_generator(6)  # noqa: E731
    perm = D.augment_sequences(x, g(), ops=("time_permute",))
    for i in range(4):  # the same time steps, reordered
        assert sorted(map(tuple, perm[i].tolist())) == sorted(map(tuple, x[i].tolist()))
    drop = D.augment_sequences(x, g(), drop_prob=0.5, ops=("time_drop",))
    zero_steps = (drop == 0).all(2)
    assert torch.equal(drop[~zero_steps], x[~zero_steps])
    noisy = D.augment_sequences(x, g(), ops=("noise",))
    assert not torch.equal(noisy, x)


def test_augment_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown vector augmentation"):
        D.augment_vectors(torch.randn(3, 4), D.make_generator(0), ops=("flip",))
    with pytest.raises(ValueError):
        D.augment(torch.randn(3), D.make_generator(0))


# ---- MI samplers ----------------------------------------------------------------------------


def test_correlated_gaussian_has_the_requested_mi():
    dim, mi = 5, 4.0
    rho = D.mi_to_rho(mi, dim)
    assert math.isclose(-dim / 2 * math.log(1 - rho**2), mi, rel_tol=1e-12)
    x, y = D.sample_correlated_gaussian(20000, dim, mi, D.make_generator(0), dtype=torch.float64)
    emp = torch.stack([torch.corrcoef(torch.stack([x[:, k], y[:, k]]))[0, 1] for k in range(dim)])
    assert torch.allclose(emp, torch.full((dim,), rho, dtype=torch.float64), atol=0.01)
    _, yc = D.sample_correlated_gaussian(10, dim, mi, D.make_generator(0), cubic=True,
                                         dtype=torch.float64)
    _, yl = D.sample_correlated_gaussian(10, dim, mi, D.make_generator(0), dtype=torch.float64)
    assert torch.allclose(yc, yl**3)


# ---- loaders --------------------------------------------------------------------------------


def _write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_npz_and_pt_round_trip(tmp_path):
    x1, x2 = np.random.randn(40, 5), np.random.randn(40, 3, 2)
    y = np.arange(40) % 3
    split = (np.arange(40) % 4 == 0).astype(np.int64)
    d = D.load_dataset("npz:" + _write_npz(tmp_path / "a.npz", x1=x1, x2=x2, y=y, split=split))
    assert d.num_classes == 3 and d.x2.shape == (40, 3, 2)
    assert d.test_idx.tolist() == [i for i in range(40) if i % 4 == 0]
    torch.save({"x1": torch.tensor(x1), "x2": torch.tensor(x2), "y": torch.tensor(y)},
               tmp_path / "b.pt")
    d2 = D.load_dataset(f"pt:{tmp_path / 'b.pt'}", test_fraction=0.25)
    assert len(d2.test_idx) == 10 and torch.allclose(d2.x1, torch.tensor(x1).float())


@pytest.mark.parametrize("arrays, message", [
    (dict(x1=np.zeros((4, 2)), y=np.arange(4) % 2), "missing key 'x2'"),
    (dict(x1=np.zeros((4, 2)), x2=np.zeros((5, 2)), y=np.arange(4) % 2), "x2 has 5 examples"),
    (dict(x1=np.zeros((4, 2)), x2=np.zeros((4, 2, 2, 2)), y=np.arange(4) % 2), r"\[N, T, D\]"),
    (dict(x1=np.zeros((4, 2)), x2=np.zeros((4, 2)), y=np.array([0.5, 1, 0, 1])), "integer class"),
    (dict(x1=np.zeros((4, 2)), x2=np.zeros((4, 2)), y=np.zeros(4)), "single class"),
    (dict(x1=np.zeros((4, 2)), x2=np.zeros((4, 2)), y=np.zeros((4, 2))), r"shape \[N\]"),
    (dict(x1=np.zeros((4, 2)), x2=np.zeros((4, 2)), y=np.arange(4) % 2, split=np.arange(4)),
     "only 0"),
    (dict(x1=np.full((4, 2), np.nan), x2=np.zeros((4, 2)), y=np.arange(4) % 2), "NaN"),
    (dict(x1=np.zeros((4, 2)), x2=np.zeros((4, 2)), y=np.array(["cat", "dog"] * 2)),
     r"'y' must hold integer class indices, got an array of dtype <U3.*return_inverse"),
    (dict(x1=np.array([["a", "b"]] * 4), x2=np.zeros((4, 2)), y=np.arange(4) % 2),
     "'x1' must hold real numeric features"),
    (dict(x1=np.zeros((4, 2)) + 1j, x2=np.zeros((4, 2)), y=np.arange(4) % 2), "complex128"),
    (dict(x1=np.zeros((4, 2)), x2=np.zeros((4, 2)), y=np.arange(4) % 2,
          split=np.array(["train", "test"] * 2)), r"'split' must hold 0 \(train\) and 1"),
    (dict(x1=np.zeros((4, 2)), x2=np.zeros((4, 2)), y=np.arange(4) % 2, split=np.arange(4) % 2),
     r"the training split \(2 examples\) holds a single class \(class 0: 2;"),
])
def test_npz_errors_name_the_problem(tmp_path, arrays, message):
    path = _write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(D.DataError, match=message):
        D.load_dataset("npz:" + path)


def test_loader_file_errors(tmp_path):
    with pytest.raises(D.DataError, match="not found"):
        D.load_dataset(f"npz:{tmp_path / 'nope.npz'}")
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(D.DataError, match="unsupported file type"):
        D.load_dataset(f"npz:{tmp_path / 'x.csv'}")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(D.DataError, match="cannot read"):
        D.load_dataset(f"npz:{tmp_path / 'junk.npz'}")
    with pytest.raises(D.DataError, match="unknown dataset"):
        D.load_dataset("imagenet")


def _affect(n_train=6, n_test=4, t=5):
    def block(n):
        return {"text": np.random.randn(n, t, 7), "vision": np.random.randn(n, t, 3),
                "audio": np.random.randn(n, t, 2), "labels": np.random.randn(n, 1, 1)}
    return {"train": block(n_train), "valid": block(2), "test": block(n_test)}


def test_multibench_affect_layout(tmp_path):
    raw = _affect()
    raw["train"]["labels"][:3] = 1.0  # both classes in the training split
    raw["train"]["labels"][3:] = -1.0
    # a neutral clip (0) is positive, as in the authors' code
    raw["test"]["labels"][:, 0, 0] = [1.0, 0.0, -1.0, -1e-3]
    raw["train"]["vision"][0, 0, 0] = np.nan  # MultiBench features carry missing values
    path = tmp_path / "mosi.pkl"
    path.write_bytes(pickle.dumps(raw))
    d = D.load_dataset(f"multibench:{path}", modalities=("text", "audio"))
    assert d.x1.shape == (12, 5, 7) and d.x2.shape == (12, 5, 2)
    assert len(d.train_idx) == 8 and len(d.test_idx) == 4
    assert d.y[d.test_idx].tolist() == [1, 1, 0, 0]
    assert torch.isfinite(d.x1).all()


def test_multibench_mimic_layout(tmp_path):
    n = 30
    adm = np.zeros((n, 6))
    adm[::2, 1] = 1
    adm[1::3, 3] = 1
    raw = {"adm_features_all": np.random.randn(n, 5), "ep_tdata": np.random.randn(n, 24, 12),
           "adm_labels_all": adm, "y_icd9": np.random.randint(0, 2, (n, 20))}
    path = tmp_path / "im.pk"
    path.write_bytes(pickle.dumps(raw))
    d = D.load_dataset(f"multibench:{path}")
    assert d.x1.shape == (n, 5) and d.x2.shape == (n, 24, 12)
    expected = np.where(adm[:, 1] > 0, 1, np.where(adm[:, 3] > 0, 3, 0))
    assert d.y.tolist() == expected.tolist()
    d9 = D.load_dataset(f"multibench:{path}", task=4)
    assert d9.y.tolist() == raw["y_icd9"][:, 4].tolist()


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r["train"].pop("vision"), "missing key 'vision' in train"),
    (lambda r: r.pop("test"), "missing key 'test'"),
    (lambda r: r["train"].__setitem__("text", np.zeros((6, 7))), r"train/text must have shape"),
    (lambda r: r.clear() or r.__setitem__("foo", 1), "not a MultiBench"),
])
def test_multibench_errors(tmp_path, mutate, message):
    raw = _affect()
    mutate(raw)
    path = tmp_path / "bad.pkl"
    path.write_bytes(pickle.dumps(raw))
    with pytest.raises(D.DataError, match=message):
        D.load_dataset(f"multibench:{path}")


def test_multibench_bad_modalities(tmp_path):
    path = tmp_path / "m.pkl"
    path.write_bytes(pickle.dumps(_affect()))
    with pytest.raises(D.DataError, match="unknown modality"):
        D.load_dataset(f"multibench:{path}", modalities=("text", "smell"))


def test_pt_with_ragged_labels_is_refused_in_one_line(tmp_path):
    torch.save({"x1": torch.zeros(3, 2), "x2": torch.zeros(3, 2), "y": [[0, 1], [1], [0]]},
               tmp_path / "r.pt")
    with pytest.raises(D.DataError, match="'y' must hold integer class indices, got a list that "
                                          "is not a rectangular array"):
        D.load_dataset(f"pt:{tmp_path / 'r.pt'}")


# ---- loaders: odd but usable files, and files that must be refused ------------------------


def test_bool_split_is_read_as_true_for_test(tmp_path):
    split = np.arange(40) % 5 == 0
    path = _write_npz(tmp_path / "b.npz", x1=np.random.randn(40, 3), x2=np.random.randn(40, 2),
                      y=np.arange(40) % 2, split=split)
    d = D.load_dataset(f"npz:{path}")
    assert d.test_idx.tolist() == np.flatnonzero(split).tolist()
    assert d.train_idx.tolist() == np.flatnonzero(~split).tolist()


@pytest.mark.parametrize("shape", [(20, 0), (20, 0, 3), (20, 4, 0)])
def test_empty_feature_dimension_is_refused(tmp_path, shape):
    path = _write_npz(tmp_path / "e.npz", x1=np.zeros(shape), x2=np.random.randn(20, 2),
                      y=np.arange(20) % 2)
    with pytest.raises(D.DataError, match=r"x1 has shape \(20, .*\) with an empty dimension"):
        D.load_dataset(f"npz:{path}")


@pytest.mark.parametrize("y, message", [
    (np.where(np.arange(40) % 2 == 0, 2**40, 7),
     r"'y' has class index 1099511627776 out of range for 40 examples; .* 0..K-1"),
    (np.where(np.arange(40) % 2 == 0, 1e30, 7.0), r"'y' has class index 1e\+30 out of range"),
    (np.where(np.arange(40) % 2 == 0, np.nan, 1.0), r"'y' holds 20 NaN values"),
])
def test_labels_that_are_no_class_indices_are_refused(tmp_path, y, message):
    path = _write_npz(tmp_path / "y.npz", x1=np.random.randn(40, 3), x2=np.random.randn(40, 2),
                      y=y)
    with pytest.raises(D.DataError, match=message):
        D.load_dataset(f"npz:{path}")


def test_labels_with_gaps_stay_accepted(tmp_path):
    path = _write_npz(tmp_path / "g.npz", x1=np.random.randn(40, 3), x2=np.random.randn(40, 2),
                      y=np.where(np.arange(40) % 2 == 0, 3, 7))
    assert D.load_dataset(f"npz:{path}").num_classes == 8


def test_pt_of_numpy_arrays_loads_and_bad_pt_is_one_line(tmp_path):
    x1, x2, y = np.random.randn(30, 4), np.random.randn(30, 2, 3), np.arange(30) % 3
    torch.save({"x1": x1, "x2": x2, "y": y, "split": np.arange(30) % 3 == 0}, tmp_path / "n.pt")
    d = D.load_dataset(f"pt:{tmp_path / 'n.pt'}")
    assert torch.equal(d.x1, torch.tensor(x1).float()) and d.num_classes == 3
    assert d.test_idx.tolist() == list(range(0, 30, 3))

    from fractions import Fraction

    torch.save({"x1": Fraction(1, 3)}, tmp_path / "o.pt")  # objects stay refused
    with pytest.raises(D.DataError) as exc:
        D.load_dataset(f"pt:{tmp_path / 'o.pt'}")
    msg = str(exc.value)
    assert "\n" not in msg and "\x1b" not in msg and "weights_only" not in msg, msg
    assert msg.startswith("o.pt: cannot read the file") and "fractions.Fraction" in msg, msg


def _pickle(tmp_path, raw, name="m.pkl"):
    path = tmp_path / name
    path.write_bytes(pickle.dumps(raw))
    return f"multibench:{path}"


def _signed_affect():
    raw = _affect()
    for split, n in (("train", 6), ("valid", 2), ("test", 4)):
        raw[split]["labels"] = np.where(np.arange(n) % 2 == 0, 1.5, -1.0).reshape(n, 1, 1)
    return raw


@pytest.mark.parametrize("shape", [(-1,), (-1, 1), (-1, 1, 1)])
def test_affect_label_shapes_accepted(tmp_path, shape):
    raw = _signed_affect()  # MultiBench stores [N, 1, 1]; [N] and [N, 1] read the same
    for split, n in (("train", 6), ("valid", 2), ("test", 4)):
        raw[split]["labels"] = np.where(np.arange(n) % 2 == 0, 1, -1).reshape(shape)
    d = D.load_dataset(_pickle(tmp_path, raw))
    assert d.y.tolist() == [1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0]


@pytest.mark.parametrize("labels, message", [
    (np.array(["pos", "neg"] * 3), r"'train/labels' must hold real sentiment scores, got an "
                                   r"array of dtype <U3"),
    (np.float64(1.0), r"train/labels must have shape \[N\] \(one score per example\), got \(\)"),
    (np.array([1.0, np.nan, -1.0, np.nan, np.nan, 2.0]), "train/labels holds 3 NaN values"),
    (np.ones((6, 3)), r"train/labels must have shape \[N\] \(one score per example\), got "
                      r"\(6, 3\)"),
])
def test_affect_bad_labels_are_refused(tmp_path, labels, message):
    raw = _signed_affect()
    raw["train"]["labels"] = labels
    with pytest.raises(D.DataError, match=message):
        D.load_dataset(_pickle(tmp_path, raw))


def _mimic(n=30, icd=None):
    adm = np.zeros((n, 6))
    adm[::2, 1] = 1
    return {"adm_features_all": np.random.randn(n, 5), "ep_tdata": np.random.randn(n, 4, 3),
            "adm_labels_all": adm,
            "y_icd9": np.random.randint(0, 2, (n, 20)) if icd is None else icd}


def test_mimic_task_out_of_range_is_refused(tmp_path):
    spec = _pickle(tmp_path, _mimic())
    for task in (-2, -7):  # any negative task used to mean mortality
        with pytest.raises(D.DataError, match=f"task must be -1 .* got {task}"):
            D.load_dataset(spec, task=task)
    with pytest.raises(D.DataError, match=r"task < K, got \(30, 20\) and task 20"):
        D.load_dataset(spec, task=20)


def test_flags_of_the_other_multibench_layout_are_refused(tmp_path):
    with pytest.raises(D.DataError, match="modalities applies to MultiBench affect pickles only, "
                                          "not to a MIMIC pickle"):
        D.load_dataset(_pickle(tmp_path, _mimic(), "im.pk"), modalities=("text", "audio"))
    with pytest.raises(D.DataError, match="task applies to MultiBench MIMIC pickles only, not "
                                          "to an affect pickle"):
        D.load_dataset(_pickle(tmp_path, _signed_affect()), task=3)
    # the defaults are no choice: both layouts load with them
    D.load_dataset(_pickle(tmp_path, _mimic(), "im.pk"), modalities=("text", "vision"))
    D.load_dataset(_pickle(tmp_path, _signed_affect()), task=-1)


def test_mimic_mortality_labels_with_nan_are_refused(tmp_path):
    """A NaN in columns 1..5 of adm_labels_all compared as not positive: its example became
    class 0 (or a later positive column's class) without a word."""
    raw = _mimic()
    raw["adm_labels_all"][[3, 8], 2] = np.nan
    raw["adm_labels_all"][8, 5] = np.nan
    raw["adm_labels_all"][5, 0] = np.nan  # column 0 is not a mortality class: not read
    with pytest.raises(D.DataError, match=r"adm_labels_all holds 3 NaN values in columns 1\.\.5 "
                                          r"\(the mortality classes; 2 examples\)"):
        D.load_dataset(_pickle(tmp_path, raw))
    raw["adm_labels_all"][[3, 8], 2] = 0.0
    raw["adm_labels_all"][8, 5] = 1.0
    d = D.load_dataset(_pickle(tmp_path, raw))
    assert d.y[8] == 1 and d.y[3] == 0 and d.y[5] == 0


@pytest.mark.parametrize("column, message", [
    (np.where(np.arange(30) % 2 == 0, 0.5, 1.5), r"'y_icd9\[:, 3\]' must hold integer class "
                                                  r"indices, got 0.5"),
    (np.where(np.arange(30) % 2 == 0, np.nan, 1.0), r"'y_icd9\[:, 3\]' holds 15 NaN values"),
])
def test_mimic_icd9_labels_are_checked_before_conversion(tmp_path, column, message):
    icd = np.random.randint(0, 2, (30, 20)).astype(float)
    icd[:, 3] = column
    with pytest.raises(D.DataError, match=message):
        D.load_dataset(_pickle(tmp_path, _mimic(icd=icd)), task=3)


# ---- evaluation on small test splits ----------------------------------------------------------


def test_mi_estimates_on_too_small_test_splits_are_none():
    from factorcl import eval as E

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1200, 16, generator=g), torch.randn(1200, 16, generator=g)
    for n in (1, 2, 10, 16, 31):
        assert E.gaussian_mi(a[:n], b[:n]) is None, n
    assert E.gaussian_mi(a[:10, :1], b[:10, :1]) is not None  # 1-d: 10 examples are enough
    assert 0.0 <= E.gaussian_mi(a[:32], b[:32]) < 3.0
    assert 0.0 <= E.gaussian_mi(a, b) < 0.1
    assert E.infonce_mi_probe(a[:1], b[:1], a[1:3], b[1:3], steps=2, backend="reference") is None
    assert E.infonce_mi_probe(a[:2], b[:2], a[2:3], b[2:3], steps=2, backend="reference") is None
    assert E.infonce_mi_probe(a[:2], b[:2], a[2:4], b[2:4], steps=2,
                              backend="reference") is not None


def test_evaluate_on_a_one_example_test_split_writes_valid_json():
    import json

    from factorcl import eval as E
    from factorcl import models as M

    n = 41
    x1, x2 = torch.randn(n, 5), torch.randn(n, 4)
    y = torch.arange(n) % 2
    data = D.PairedData(x1, x2, y, torch.arange(1, n), torch.tensor([0]), 2, name="tiny")
    cfg = M.ModelConfig(embed_dim=4, backbone_hidden=8, critic_hidden=8,
                        critic_backend="reference")
    model = M.build_model("factorcl-ssl", (5,), (4,), 2, cfg)
    out = E.evaluate(model, data, mi_probe_steps=2, backend="reference")
    assert out["mi"] and all(v is None for v in out["mi"].values()), out["mi"]
    json.dumps(out, allow_nan=False)


def test_float64_features_keep_their_precision_for_float64_training(tmp_path):
    # every file was rounded to float32 on load, under --dtype float64 too: 1e6 + 0.01 * k
    # collapsed to one value (a float64 run trained on the rounded data)
    x1 = 1e6 + 0.01 * np.arange(40.0)[:, None]
    path = _write_npz(tmp_path / "f64.npz", x1=x1, x2=np.random.randn(40, 2), y=np.arange(40) % 2)
    d64 = D.load_dataset("npz:" + path, dtype=torch.float64)
    assert d64.x1.dtype == torch.float64 and torch.equal(d64.x1, torch.from_numpy(x1))
    d32 = D.load_dataset("npz:" + path)  # float32 training: as before
    assert d32.x1.dtype == torch.float32 and d32.x1.unique().numel() < 40
    # finite float64 values beyond float32's range: named, not "contains NaN or Inf"
    big = _write_npz(tmp_path / "big.npz", x1=np.full((10, 2), 1e39), x2=np.zeros((10, 2)),
                     y=np.arange(10) % 2)
    with pytest.raises(D.DataError, match=r"'x1' holds finite values beyond torch.float32's "
                                          r"range \(largest magnitude 1e\+39\).*--dtype float64"):
        D.load_dataset("npz:" + big)
    assert D.load_dataset("npz:" + big, dtype=torch.float64).x1.max() == 1e39


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.uint64])
def test_unsigned_features_and_labels_load(tmp_path, dtype):
    # uint8 loaded, the wider unsigned types were refused ("must hold real numeric features")
    x1 = (np.arange(80).reshape(40, 2) * 1000).astype(dtype)
    path = _write_npz(tmp_path / "u.npz", x1=x1, x2=np.random.randn(40, 2),
                      y=(np.arange(40) % 3).astype(dtype))
    d = D.load_dataset("npz:" + path)
    assert torch.equal(d.x1, torch.from_numpy(x1.astype(np.float32)))
    assert d.y.dtype == torch.long and d.y.tolist() == [i % 3 for i in range(40)]
    assert d.num_classes == 3
    bad = _write_npz(tmp_path / "ub.npz", x1=x1, x2=np.zeros((40, 2)),
                     y=np.full(40, 2**63 + 5, dtype=np.uint64) if dtype == np.uint64
                     else (np.arange(40) + 100).astype(dtype))
    with pytest.raises(D.DataError, match="out of range for 40 examples"):
        D.load_dataset("npz:" + bad)


def test_a_test_fraction_beside_a_split_key_is_refused(tmp_path):
    # the file's split was used and the fraction ignored without a word
    arrays = dict(x1=np.random.randn(40, 2), x2=np.random.randn(40, 2), y=np.arange(40) % 2)
    with_split = _write_npz(tmp_path / "s.npz", **arrays, split=(np.arange(40) % 5 == 0) * 1)
    with pytest.raises(D.DataError, match=r"s.npz: a test fraction \(0.5\) was given, but the "
                                          r"file's 'split' key decides the split"):
        D.load_dataset("npz:" + with_split, test_fraction=0.5)
    assert len(D.load_dataset("npz:" + with_split).test_idx) == 8
    without = _write_npz(tmp_path / "n.npz", **arrays)
    assert len(D.load_dataset("npz:" + without).test_idx) == 8  # the default 0.2
    assert len(D.load_dataset("npz:" + without, test_fraction=0.5).test_idx) == 20
