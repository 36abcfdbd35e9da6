"""factorcl.models: every loss term has the right shape, is finite and carries the authors' sign
(each term equals the drop-in critic module on the same inputs); the gathered-column helpers
equal the modules in one process; the baselines equal factorcl_ext's SupConLoss; backbones."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from factorcl import models as M
from factorcl.models import Batch
from factorcl_ext.nn import CLUBInfoNCECritic, InfoNCECritic, SupConLoss

from conftest import assert_rel_close

F64 = torch.float64
CFG = M.ModelConfig(embed_dim=6, backbone_hidden=10, critic_hidden=9, critic_layers=1,
                    critic_backend="reference")


def _batch(n=7, d1=5, d2=4, classes=3, views=True, dtype=F64):
    x1, x2 = torch.randn(n, d1, dtype=dtype), torch.randn(n, d2, dtype=dtype)
    y = torch.arange(n) % classes
    if views:
        return Batch(x1, x2, y, x1 + 0.1 * torch.randn_like(x1), x2 + 0.1 * torch.randn_like(x2))
    return Batch(x1, x2, y)


@pytest.mark.parametrize("name", M.MODELS)
def test_losses_scalar_finite_and_differentiable(name):
    model = M.build_model(name, (5,), (4,), 3, CFG).double()
    b = _batch()
    loss, terms = model.training_loss(b)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert all(t.dim() == 0 and torch.isfinite(t) for t in terms.values())
    assert torch.allclose(loss, sum(terms.values()))
    loss.backward()
    grads = [p.grad for p in model.main_parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if name.startswith("factorcl"):
        assert set(terms) == set(M._FactorCL.TERMS)
        model.zero_grad()
        club = model.club_learning_loss(b)
        assert club.dim() == 0 and torch.isfinite(club)
        club.backward()
        assert all(p.grad is not None for p in model.club_parameters())
        # the NCE-CLUB learning loss runs the backbones and heads without a graph
        assert all(p.grad is None for p in model.main_parameters())


def _expected_terms(model, b):
    """Each FactorCL term from the drop-in modules called the authors' way."""
    e1, e2 = model.backbones[0](b.x1), model.backbones[1](b.x2)
    h, c = model.heads, model.critics
    out = {
        "infonce_x1x2": c["infonce_x1x2"](h["infonce_x1x2"][0](e1), h["infonce_x1x2"][1](e2)),
        "club_x1x2": c["club_x1x2"](h["club_x1x2"][0](e1), h["club_x1x2"][1](e2)),
    }
    if isinstance(model, M.FactorCLSUP):
        y = b.y.to(e1.dtype)[:, None]
        onehot = F.one_hot(b.y, model.num_classes).to(e1.dtype)
        out["infonce_x1y"] = c["infonce_x1y"](h["infonce_x1y"](e1), y)
        out["infonce_x2y"] = c["infonce_x2y"](h["infonce_x2y"](e2), y)
        for k in ("infonce_x1x2_cond", "club_x1x2_cond"):
            out[k] = c[k](torch.cat([h[k][0](e1), onehot], 1), h[k][1](e2))
    else:
        a1, a2 = model.backbones[0](b.x1_aug), model.backbones[1](b.x2_aug)
        out["infonce_x1y"] = c["infonce_x1y"](h["infonce_x1y"](e1), h["infonce_x1y"](a1))
        out["infonce_x2y"] = c["infonce_x2y"](h["infonce_x2y"](e2), h["infonce_x2y"](a2))
        for k in ("infonce_x1x2_cond", "club_x1x2_cond"):
            out[k] = c[k](torch.cat([h[k][0](e1), h[k][0](a1)], 1),
                          torch.cat([h[k][1](e2), h[k][1](a2)], 1))
    return out


@pytest.mark.parametrize("name", ["factorcl-sup", "factorcl-ssl"])
def test_each_term_is_the_authors_critic_with_its_sign(name):
    model = M.build_model(name, (5,), (4,), 3, CFG).double()
    b = _batch()
    _, terms = model.training_loss(b)
    expected = _expected_terms(model, b)
    for k, v in expected.items():
        assert_rel_close(terms[k], v, 1e-12, name=k)
    # Signs: InfoNCE terms are -I_NCE >= -log N; NCE-CLUB terms are +I_CLUB.
    n = b.x1.shape[0]
    for k in ("infonce_x1x2", "infonce_x1y", "infonce_x2y", "infonce_x1x2_cond"):
        assert terms[k] >= -math.log(n) - 1e-9
    # Training the InfoNCE heads raises I_NCE, i.e. lowers the term: one informative pair.
    critic = model.critics["infonce_x1x2"]
    x = torch.randn(n, 6, dtype=F64)
    informative = M.infonce_loss(critic, x, x)
    assert torch.isclose(informative, critic(x, x))
    assert torch.isclose(M.club_estimate(model.critics["club_x1x2"], x, x),
                         model.critics["club_x1x2"](x, x))


def test_ssl_conditional_club_uses_the_augmented_views():
    # (The authors' synthetic code feeds x1 twice to this critic.)
    model = M.build_model("factorcl-ssl", (5,), (4,), 3, CFG).double()
    b = _batch()
    e1, e2 = model.backbones[0](b.x1), model.backbones[1](b.x2)
    x, y = model._cond_pairs("club_x1x2_cond", e1, e2, b, model._views(b))
    ha, hb = model.heads["club_x1x2_cond"]
    assert torch.equal(x, torch.cat([ha(e1), ha(model.backbones[0](b.x1_aug))], 1))
    assert torch.equal(y, torch.cat([hb(e2), hb(model.backbones[1](b.x2_aug))], 1))
    c = model.critics
    hc1, hc2 = model.heads["club_x1x2"]
    a1 = model.backbones[0](b.x1_aug)
    a2 = model.backbones[1](b.x2_aug)
    expected = (c["club_x1x2"].learning_loss(hc1(e1), hc2(e2))
                + c["club_x1x2_cond"].learning_loss(torch.cat([ha(e1), ha(a1)], 1),
                                                    torch.cat([hb(e2), hb(a2)], 1)))
    assert_rel_close(model.club_learning_loss(b), expected, 1e-12)
    with pytest.raises(ValueError, match="augmented views"):
        model.training_loss(Batch(b.x1, b.x2, b.y))


def test_helpers_equal_modules():
    torch.manual_seed(0)
    x, y = torch.randn(6, 4, dtype=F64), torch.randn(6, 3, dtype=F64)
    inf = InfoNCECritic(4, 3, 8, 1, "relu", backend="reference").double()
    club = CLUBInfoNCECritic(4, 3, 8, 0, "tanh", backend="reference").double()
    assert_rel_close(M.infonce_loss(inf, x, y), inf(x, y), 1e-12)
    assert_rel_close(M.club_estimate(club, x, y), club(x, y), 1e-12)
    assert_rel_close(M.club_learning_loss(club, x, y), club.learning_loss(x, y), 1e-12)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("labels", [False, True])
def test_separable_loss_equals_supconloss(labels, normalize):
    n, d = 9, 5
    z1 = torch.randn(n, d, dtype=F64, requires_grad=True)
    z2 = torch.randn(n, d, dtype=F64, requires_grad=True)
    y = torch.arange(n) % 3
    ours = M.separable_contrastive_loss(z1, z2, y if labels else None, 3, 0.2, 0.2, "reference",
                                        normalize=normalize)
    # SimCLR / SupCon normalise the projections; the FactorCL authors' baselines do not
    feats = (torch.stack([F.normalize(z1, dim=1), F.normalize(z2, dim=1)], 1) if normalize
             else torch.stack([z1, z2], 1))
    ref = SupConLoss(temperature=0.2, base_temperature=0.2, backend="reference")(
        feats, y if labels else None)
    assert_rel_close(ours, ref, 1e-12)
    g_ours = torch.autograd.grad(ours, [z1, z2])
    g_ref = torch.autograd.grad(ref, [z1, z2])
    for a, b in zip(g_ours, g_ref):
        assert_rel_close(a, b, 1e-10)


@pytest.mark.parametrize("name", ["simclr", "supcon"])
def test_baselines_normalise_their_projections_unless_told_not_to(name):
    b = _batch(views=False)
    for normalize in (True, False):
        cfg = M.ModelConfig(**{**CFG.__dict__, "normalize_projections": normalize})
        model = M.build_model(name, (5,), (4,), 3, cfg).double()
        z1 = model.projections[0](model.backbones[0](b.x1))
        z2 = model.projections[1](model.backbones[1](b.x2))
        if normalize:
            z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
        expected = SupConLoss(temperature=cfg.temperature, base_temperature=cfg.temperature,
                              backend="reference")(torch.stack([z1, z2], 1),
                                                   b.y if name == "supcon" else None)
        assert_rel_close(model.training_loss(b)[0], expected, 1e-12)


def test_representations():
    b = _batch(views=False)
    reps = M.build_model("factorcl-sup", (5,), (4,), 3, CFG).double().representations(b.x1, b.x2)
    e = CFG.embed_dim
    assert reps["S"].shape == (7, 4 * e) and reps["U1"].shape == (7, 3 * e)
    assert reps["S+U1+U2"].shape == (7, 10 * e) and reps["backbone"].shape == (7, 2 * CFG.embed_dim)
    base = M.build_model("simclr", (5,), (4,), 3, CFG).double().representations(b.x1, b.x2)
    assert base["backbone"].shape == (7, 2 * e)


@pytest.mark.parametrize("kind", ["mlp", "gru", "transformer"])
def test_backbones_on_sequences(kind):
    x = torch.randn(3, 6, 4)
    net = M.make_backbone(kind, (6, 4), 8, 5, 1)
    assert net(x).shape == (3, 5)
    assert M.make_backbone("auto", (6, 4), 8, 5, 1).__class__ is M.GRUBackbone
    assert M.make_backbone("auto", (4,), 8, 5, 1).__class__ is M.MLPBackbone


def test_sequence_model_trains_a_step():
    cfg = M.ModelConfig(embed_dim=4, backbone_hidden=6, critic_hidden=5,
                        critic_backend="reference", backbone="transformer")
    model = M.build_model("factorcl-ssl", (5, 3), (4,), 2, cfg)
    x1, x2 = torch.randn(6, 5, 3), torch.randn(6, 4)
    loss, _ = model.training_loss(Batch(x1, x2, torch.arange(6) % 2, x1 * 0.9, x2 * 0.9))
    loss.backward()
    assert torch.isfinite(loss)


def test_bad_model_and_backbone():
    with pytest.raises(ValueError, match="model must be one of"):
        M.build_model("clip", (3,), (3,), 2)
    with pytest.raises(ValueError, match="vectors"):
        M.make_backbone("gru", (3, 4, 5), 4, 4, 1)
    assert isinstance(M.make_backbone("gru", (3,), 4, 4, 1), M.MLPBackbone)
