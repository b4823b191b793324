"""Losses against hand values and independent numpy references, plus the properties they must have."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from kdpipe.distill import composite, feature_losses, losses, methods

# ---------------------------------------------------------------------------------------------------------
# Independent references (numpy, explicit formulas; never call the functions under test)


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_kl_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Σ_c p (log p − log q) per row, with 0·log 0 = 0."""
    out = np.zeros(p.shape[0])
    for i in range(p.shape[0]):
        for c in range(p.shape[1]):
            if p[i, c] > 0:
                out[i] += p[i, c] * (math.log(p[i, c]) - math.log(q[i, c]))
    return out


def np_kd(zs: np.ndarray, zt: np.ndarray, T: float) -> np.ndarray:
    """Per-sample T²·KL(softmax(zt/T) ‖ softmax(zs/T))."""
    return T**2 * np_kl_rows(np_softmax(zt / T), np_softmax(zs / T))


def np_dkd_parts(zs: np.ndarray, zt: np.ndarray, y: np.ndarray, T: float):
    """Per-sample TCKD, NCKD (both × T²) and the teacher's softened target probability, from the definitions:
    binary [p_y, 1 − p_y] and the renormalised distribution over non-target classes."""
    ps, pt = np_softmax(zs / T), np_softmax(zt / T)
    tckd, nckd, pt_y = [], [], []
    for i, label in enumerate(y):
        bs = np.array([ps[i, label], 1 - ps[i, label]])
        bt = np.array([pt[i, label], 1 - pt[i, label]])
        rest = [c for c in range(zs.shape[1]) if c != label]
        qs = ps[i, rest] / ps[i, rest].sum()
        qt = pt[i, rest] / pt[i, rest].sum()
        tckd.append(T**2 * np_kl_rows(bt[None], bs[None])[0])
        nckd.append(T**2 * np_kl_rows(qt[None], qs[None])[0])
        pt_y.append(pt[i, label])
    return np.array(tckd), np.array(nckd), np.array(pt_y)


def np_ce(z: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean([-math.log(np_softmax(z)[i, label]) for i, label in enumerate(y)]))


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(6, 5, generator=g, dtype=torch.float64) * 2
    zt = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 5, (6,), generator=g)
    return zs, zt, y


def close(tensor: torch.Tensor, value, tol=1e-10) -> bool:
    return np.allclose(tensor.detach().numpy(), value, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------------------
# cross-entropy and focal


def test_cross_entropy_matches_reference(batch):
    zs, _, y = batch
    assert close(losses.cross_entropy(zs, y), np_ce(zs.numpy(), y.numpy()))


def test_cross_entropy_label_smoothing_hand_value():
    # 2 classes, p = [3/4, 1/4], label 0, ε = 0.2 → q = [0.9, 0.1]
    z = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    expected = -(0.9 * math.log(0.75) + 0.1 * math.log(0.25))
    assert close(losses.cross_entropy(z, torch.tensor([0]), label_smoothing=0.2), expected)


def test_focal_gamma_zero_is_cross_entropy(batch):
    zs, _, y = batch
    assert close(losses.focal_loss(zs, y, gamma=0.0), losses.cross_entropy(zs, y).item())


def test_focal_hand_value():
    # p_t = 3/4 → −(1/4)² · log(3/4)
    z = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    assert close(losses.focal_loss(z, torch.tensor([0]), gamma=2.0), -(0.25**2) * math.log(0.75))


def test_focal_rejects_negative_gamma(batch):
    zs, _, y = batch
    with pytest.raises(ValueError, match="focal_gamma"):
        losses.focal_loss(zs, y, gamma=-1.0)


# ---------------------------------------------------------------------------------------------------------
# Hinton KD


def test_kd_zero_when_student_equals_teacher(batch):
    zs, _, _ = batch
    assert abs(losses.kd_kl(zs, zs.clone(), 4.0).item()) < 1e-12


def test_kd_two_class_hand_value():
    # T = 1: p_t = [3/4, 1/4], p_s = [1/2, 1/2]
    zt = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    zs = torch.zeros(1, 2, dtype=torch.float64)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert close(losses.kd_kl(zs, zt, 1.0), expected)
    # T = 2 with doubled teacher logits: same softened distributions, so exactly T² = 4 times the value
    assert close(losses.kd_kl(zs, 2 * zt, 2.0), 4 * expected)


def test_kd_direction_is_teacher_to_student():
    zt = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    zs = torch.zeros(1, 2, dtype=torch.float64)
    teacher_to_student = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    student_to_teacher = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert close(losses.kd_kl(zs, zt, 1.0), teacher_to_student)
    assert close(losses.kd_kl(zt, zs, 1.0), student_to_teacher)
    assert abs(teacher_to_student - student_to_teacher) > 1e-3


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0, 10.0])
def test_kd_matches_reference_with_t_squared(batch, T):
    zs, zt, _ = batch
    per_sample = np_kd(zs.numpy(), zt.numpy(), T)
    assert close(losses.kd_kl(zs, zt, T), per_sample.mean())
    assert close(losses.kd_kl(zs, zt, T, reduction="none"), per_sample)


def test_kd_high_temperature_limit_is_half_mse_of_centred_logits(batch):
    # Hinton et al. §2.1: for T ≫ |z|, T²·KL → (1/2C)·Σ_c (δz_s − δz_t)² with δ the zero-mean logits,
    # so the T²-scaled loss is T-independent in that limit.
    zs, zt, _ = batch
    centred = (zs - zs.mean(1, keepdim=True)) - (zt - zt.mean(1, keepdim=True))
    limit = 0.5 * centred.pow(2).mean().item()
    assert close(losses.kd_kl(zs, zt, 1000.0), limit, tol=1e-2)
    assert close(losses.kd_kl(zs, zt, 1000.0), losses.kd_kl(zs, zt, 2000.0).item(), tol=1e-2)


def test_logit_mse_hand_value():
    zs = torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    zt = torch.tensor([[1.0, 0.0], [1.0, -1.0]], dtype=torch.float64)
    assert close(losses.logit_mse(zs, zt), (0 + 4 + 1 + 1) / 4)


# ---------------------------------------------------------------------------------------------------------
# DKD


def test_dkd_matches_reference_and_weights(batch):
    zs, zt, y = batch
    tckd, nckd, _ = np_dkd_parts(zs.numpy(), zt.numpy(), y.numpy(), 4.0)
    out = losses.dkd(zs, zt, y, alpha=2.0, beta=8.0, temperature=4.0)
    assert close(out["tckd"], tckd.mean(), tol=1e-9)
    assert close(out["nckd"], nckd.mean(), tol=1e-9)
    assert close(out["loss"], 2.0 * tckd.mean() + 8.0 * nckd.mean(), tol=1e-9)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_dkd_decomposition_of_kd_per_sample(batch, T):
    # Zhao et al. 2022, eq. (7): KD = TCKD + (1 − p_y,t)·NCKD, per sample, T² on both sides.
    zs, zt, y = batch
    parts = losses.dkd(zs, zt, y, alpha=1.0, beta=1.0, temperature=T, reduction="none")
    p_teacher_y = torch.softmax(zt / T, dim=1).gather(1, y[:, None]).squeeze(1)
    rebuilt = parts["tckd"] + (1 - p_teacher_y) * parts["nckd"]
    assert close(rebuilt, np_kd(zs.numpy(), zt.numpy(), T), tol=1e-9)


def test_dkd_zero_when_student_equals_teacher(batch):
    _, zt, y = batch
    out = losses.dkd(zt, zt.clone(), y, alpha=1.0, beta=8.0, temperature=4.0)
    assert all(abs(v.item()) < 1e-12 for v in out.values())


# ---------------------------------------------------------------------------------------------------------
# FitNets hint


def scaling_adapter(scale: float) -> nn.Conv2d:
    conv = nn.Conv2d(1, 1, kernel_size=1, bias=False).double()
    with torch.no_grad():
        conv.weight.fill_(scale)
    return conv


def test_hint_zero_for_exact_adapter():
    student = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    conv = nn.Conv2d(3, 3, kernel_size=1, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
    assert feature_losses.hint_loss(student, student.clone(), conv).item() == 0.0


def test_hint_hand_value():
    student = torch.full((1, 1, 2, 2), 2.0, dtype=torch.float64)
    teacher = torch.full((1, 1, 2, 2), 5.0, dtype=torch.float64)
    assert close(feature_losses.hint_loss(student, teacher, scaling_adapter(2.0)), 1.0)  # (4 − 5)²


def test_hint_pools_the_larger_map():
    # a 4×4 student whose 2×2 block means equal the 2×2 teacher: zero loss after pooling, either way round
    teacher = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=torch.float64)
    student = teacher.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    student = student + torch.tensor([[0.5, -0.5], [-0.5, 0.5]], dtype=torch.float64).repeat(2, 2)
    assert abs(feature_losses.hint_loss(student, teacher, scaling_adapter(1.0)).item()) < 1e-12
    assert abs(feature_losses.hint_loss(teacher, student, scaling_adapter(1.0)).item()) < 1e-12
    assert feature_losses.hint_loss(student, teacher + 1, scaling_adapter(1.0)).item() == pytest.approx(1.0)


def test_make_hint_adapter_shapes():
    adapter = feature_losses.make_hint_adapter(3, 8)
    assert adapter(torch.randn(2, 3, 5, 5)).shape == (2, 8, 5, 5)


# ---------------------------------------------------------------------------------------------------------
# Attention transfer


def test_at_zero_for_identical_features():
    feats = [torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randn(2, 5, 4, 4, dtype=torch.float64)]
    assert abs(feature_losses.attention_transfer(feats, [f.clone() for f in feats]).item()) < 1e-12


def test_at_invariant_to_positive_scaling():
    s = [torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randn(2, 5, 4, 4, dtype=torch.float64)]
    t = [torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 6, 4, 4, dtype=torch.float64)]
    base = feature_losses.attention_transfer(s, t).item()
    assert base > 0
    assert feature_losses.attention_transfer([3.7 * x for x in s], [0.2 * x for x in t]).item() == pytest.approx(base)


def test_at_hand_value():
    # N = C = H = 1, W = 2: a_s = [1, 0], a_t = [1, 1]/√2 → mean((1 − 1/√2)², (1/√2)²) = 1 − 1/√2
    s = torch.tensor([[[[1.0, 0.0]]]], dtype=torch.float64)
    t = torch.tensor([[[[1.0, -1.0]]]], dtype=torch.float64)  # |F|² ignores the sign
    assert close(feature_losses.attention_transfer([s], [t]), 1 - 1 / math.sqrt(2))
    # two channels: the map is the channel mean of F², [(1+0)/2, (0+1)/2] ∝ [1, 1]
    s2 = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]], dtype=torch.float64)
    assert close(feature_losses.attention_transfer([s2], [s]), 1 - 1 / math.sqrt(2))
    # a sum over pairs
    assert close(feature_losses.attention_transfer([s, s], [t, t]), 2 * (1 - 1 / math.sqrt(2)))


def test_at_pairs_zip_from_deepest_and_pool_sizes():
    deep = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    mid = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    unmatched = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    assert abs(feature_losses.attention_transfer([unmatched, mid, deep], [mid, deep]).item()) < 1e-12
    # an 8×8 map pooled to 4×4 equals the teacher built from those pooled energies
    student = torch.rand(1, 1, 8, 8, dtype=torch.float64)
    pooled_energy = torch.nn.functional.avg_pool2d(student**2, 2)
    assert abs(feature_losses.attention_transfer([student], [pooled_energy.sqrt()]).item()) < 1e-12


# ---------------------------------------------------------------------------------------------------------
# Composite and validation


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_composite_hinton_form_reduces_to_pure_terms(batch, alpha):
    zs, zt, y = batch
    out = composite.composite_loss(zs, y, teacher_logits=zt, weights={"ce": 1 - alpha, "kd": alpha}, temperature=4.0)
    ce, kd = np_ce(zs.numpy(), y.numpy()), np_kd(zs.numpy(), zt.numpy(), 4.0).mean()
    assert close(out["loss"], (1 - alpha) * ce + alpha * kd)
    if alpha == 0.0:
        assert set(out) == {"loss", "ce"} and close(out["loss"], ce)
    if alpha == 1.0:
        assert set(out) == {"loss", "kd"} and close(out["loss"], kd)


def test_composite_seed_form(batch):
    zs, zt, y = batch
    out = composite.composite_loss(zs, y, teacher_logits=zt, weights={"mse": 1.0, "kd": 0.5}, temperature=2.0)
    mse = np.mean((zs.numpy() - zt.numpy()) ** 2)
    kd = np_kd(zs.numpy(), zt.numpy(), 2.0).mean()
    assert set(out) == {"loss", "mse", "kd"}
    assert close(out["mse"], mse) and close(out["kd"], kd)
    assert close(out["loss"], mse + 0.5 * kd)


def all_term_inputs():
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    y = torch.randint(0, 6, (4,), generator=g)
    s_feats = [torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 4, 4, 4, generator=g)]
    t_feats = [torch.randn(4, 5, 8, 8, generator=g), torch.randn(4, 7, 4, 4, generator=g)]
    from kdpipe.distill.crd import CRDHead

    head = CRDHead(4, 7, n_data=10, feat_dim=8, negatives=5)
    kwargs = dict(
        teacher_logits=zt,
        student_feats=s_feats,
        teacher_feats=t_feats,
        hint_adapter=feature_losses.make_hint_adapter(4, 7),
        crd=lambda fs, ft: head(fs, ft, torch.arange(4)),
    )
    return zs, y, kwargs


def test_composite_loss_is_weighted_sum_of_parts_and_skips_zero_weights():
    zs, y, kwargs = all_term_inputs()
    weights = {"ce": 0.5, "kd": 2.0, "mse": 0.0, "hint": 1.5, "at": 100.0, "dkd": 0.7}
    out = composite.composite_loss(zs, y, weights=weights, **kwargs)
    assert set(out) == {"loss", "ce", "kd", "hint", "at", "dkd"}
    expected = sum(weights[name] * out[name] for name in out if name != "loss")
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert out["dkd"].item() == pytest.approx(
        losses.dkd(zs, kwargs["teacher_logits"], y, 1.0, 8.0, 4.0)["loss"].item()
    )


def test_composite_focal_replaces_ce(batch):
    zs, _, y = batch
    out = composite.composite_loss(zs, y, weights={"ce": 1.0}, focal_gamma=2.0)
    assert close(out["ce"], losses.focal_loss(zs, y, 2.0).item())


def test_composite_hint_index_pair():
    zs, y, kwargs = all_term_inputs()
    kwargs["hint_adapter"] = feature_losses.make_hint_adapter(3, 7)
    out = composite.composite_loss(zs, y, weights={"hint": 1.0}, hint_index=(0, 1), **kwargs)
    expected = feature_losses.hint_loss(kwargs["student_feats"][0], kwargs["teacher_feats"][1], kwargs["hint_adapter"])
    assert out["hint"].item() == pytest.approx(expected.item())


def test_composite_names_missing_inputs(batch):
    zs, _, y = batch
    with pytest.raises(ValueError, match="^kd: needs teacher_logits"):
        composite.composite_loss(zs, y, weights={"kd": 1.0})
    with pytest.raises(ValueError, match="^at: needs student_feats"):
        composite.composite_loss(zs, y, weights={"at": 1.0})


@pytest.mark.parametrize(
    ("weights", "temperature", "message"),
    [
        ({"ce": 1.0, "kd": -0.5}, 4.0, "^kd: weight must be ≥ 0, got -0.5$"),
        ({"ce": 1.0, "kd": float("nan")}, 4.0, "^kd: weight must be ≥ 0"),
        ({"ce": 1.0, "at": float("inf")}, 4.0, "^at: weight must be finite"),
        ({"ce": 1.0}, 0, "^temperature: must be > 0, got 0$"),
        ({"ce": 1.0}, -2.0, "^temperature: must be > 0"),
        ({"ce": 0.0, "kd": 0.0}, 4.0, "^all loss weights are zero$"),
        ({}, 4.0, "^all loss weights are zero$"),
        ({"ce": 1.0, "foo": 1.0}, 4.0, "^unknown loss term 'foo'; known: ce, kd, mse, hint, at, dkd, dist, rkd, pkt, sp, crd, hidden, attn, cos$"),
    ],
)
def test_validate_weights_names_the_key(weights, temperature, message):
    with pytest.raises(ValueError, match=message):
        methods.validate_weights(weights, temperature)


def test_presets_and_descriptions_are_valid():
    assert set(methods.LOSSES) == {"ce", "kd", "mse", "hint", "at", "dkd", "dist", "rkd", "pkt", "sp", "crd",
                                   *methods.TEXT_FEATURE_TERMS}  # the text terms: tests/test_text_losses.py
    for weights in methods.PRESETS.values():
        methods.validate_weights(weights, 4.0)
    assert methods.PRESETS["kd"] == {"ce": 0.1, "kd": 0.9}
    assert methods.PRESETS["seed"] == {"mse": 1.0, "kd": 0.5}


# ---------------------------------------------------------------------------------------------------------
# Precision


def test_every_loss_returns_fp32_for_bf16_inputs():
    zs, y, kwargs = all_term_inputs()
    zt = kwargs["teacher_logits"].bfloat16()
    zs = zs.bfloat16()
    s_feats = [f.bfloat16() for f in kwargs["student_feats"]]
    t_feats = [f.bfloat16() for f in kwargs["teacher_feats"]]
    results = [
        losses.cross_entropy(zs, y, 0.1),
        losses.focal_loss(zs, y),
        losses.kd_kl(zs, zt, 4.0),
        losses.logit_mse(zs, zt),
        feature_losses.hint_loss(s_feats[1], t_feats[1], kwargs["hint_adapter"]),
        feature_losses.attention_transfer(s_feats, t_feats),
        *losses.dkd(zs, zt, y, 1.0, 8.0, 4.0).values(),
        losses.dist_loss(zs, zt, 4.0),
        feature_losses.rkd_loss(s_feats[-1], t_feats[-1]),
        feature_losses.pkt_loss(s_feats[-1], t_feats[-1]),
        feature_losses.sp_loss(s_feats[-1], t_feats[-1]),
        *composite.composite_loss(
            zs,
            y,
            teacher_logits=zt,
            student_feats=s_feats,
            teacher_feats=t_feats,
            hint_adapter=kwargs["hint_adapter"],
            crd=kwargs["crd"],
            weights={name: 1.0 for name in methods.LOSSES if name not in methods.TEXT_FEATURE_TERMS},
        ).values(),
    ]
    for value in results:
        assert value.dtype == torch.float32 and value.dim() == 0 and torch.isfinite(value)
