"""DIST, RKD, PKT and SP: reference values from independent numpy implementations of each paper's formula on fixed
tensors, the properties the papers rely on, and their wiring into composite_loss and a real student."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdpipe import config
from kdpipe.distill import feature_losses, losses, methods
from kdpipe.models.zoo import build_model
from kdpipe.train import distiller as kd


def _fixed(*shape, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).normal(size=shape)).double()


def _softmax(z, axis=1):
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _pearson(a, b):
    a, b = a - a.mean(), b - b.mean()
    return (a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b))


def _huber(a, b):
    d = np.abs(a - b)
    return np.where(d < 1, 0.5 * d**2, d - 0.5).mean()


def test_dist_matches_the_formula():
    s, t, tau = _fixed(6, 5), _fixed(6, 5, seed=1), 4.0
    p_s, p_t = _softmax(s.numpy() / tau), _softmax(t.numpy() / tau)
    inter = 1 - np.mean([_pearson(p_s[i], p_t[i]) for i in range(6)])
    intra = 1 - np.mean([_pearson(p_s[:, c], p_t[:, c]) for c in range(5)])
    assert losses.dist_loss(s, t, tau).item() == pytest.approx(tau**2 * (inter + intra), rel=1e-6)


def test_rkd_matches_the_formula():
    s, t = _fixed(5, 7), _fixed(5, 3, seed=1)  # different widths: only relations are compared

    def dist(e):
        d = np.linalg.norm(e[:, None] - e[None, :], axis=2)
        return d / d[d > 0].mean()

    def angles(e):
        out = []
        for i in range(len(e)):  # anchor i: cosines between (e_j - e_i) and (e_k - e_i)
            v = e - e[i]
            n = np.linalg.norm(v, axis=1, keepdims=True)
            v = np.divide(v, np.maximum(n, 1e-12))
            out.append(v @ v.T)
        return np.stack(out).reshape(-1)

    s_np, t_np = s.numpy(), t.numpy()
    expected = 25 * _huber(dist(s_np), dist(t_np)) + 50 * _huber(angles(s_np), angles(t_np))
    assert feature_losses.rkd_loss(s, t).item() == pytest.approx(expected, rel=1e-5)


def test_pkt_matches_the_formula():
    s, t, eps = _fixed(6, 4), _fixed(6, 9, seed=1), 1e-7

    def affinities(e):
        e = e / (np.linalg.norm(e, axis=1, keepdims=True) + eps)
        k = (e @ e.T + 1) / 2
        return k / k.sum(axis=1, keepdims=True)

    p_s, p_t = affinities(s.numpy()), affinities(t.numpy())
    expected = np.mean(p_t * np.log((p_t + eps) / (p_s + eps)))
    assert feature_losses.pkt_loss(s, t).item() == pytest.approx(expected, rel=1e-6)


def test_sp_matches_the_formula():
    s, t = _fixed(4, 3, 2, 2), _fixed(4, 5, 3, 3, seed=1)  # maps of different shapes

    def gram(f):
        f = f.reshape(len(f), -1)
        g = f @ f.T
        return g / np.linalg.norm(g, axis=1, keepdims=True)

    expected = ((gram(t.numpy()) - gram(s.numpy())) ** 2).sum() / 16
    assert feature_losses.sp_loss(s, t).item() == pytest.approx(expected, rel=1e-6)


def test_each_is_zero_when_the_student_matches_the_teacher_and_positive_otherwise():
    logits, feats = _fixed(8, 10), _fixed(8, 6, 3, 3)
    # 0 up to the eps = 1e-8 of the official code in the Pearson denominators (products of ~1e-2 norms)
    assert losses.dist_loss(logits, logits.clone(), 1.0).item() == pytest.approx(0, abs=1e-5)
    for fn in (feature_losses.rkd_loss, feature_losses.pkt_loss, feature_losses.sp_loss):
        assert fn(feats, 3.0 * feats).item() == pytest.approx(0, abs=1e-9), fn.__name__  # scale-invariant
        assert fn(feats, _fixed(8, 6, 3, 3, seed=5)).item() > 1e-6, fn.__name__
    assert losses.dist_loss(logits, _fixed(8, 10, seed=5), 4.0).item() > 1e-3


def test_gradients_reach_the_student_only():
    s = _fixed(6, 4, 2, 2).requires_grad_()
    t = _fixed(6, 8, 2, 2, seed=1).requires_grad_()
    for fn in (feature_losses.rkd_loss, feature_losses.pkt_loss, feature_losses.sp_loss):
        s.grad = t.grad = None
        fn(s, t).backward()
        assert s.grad is not None and torch.isfinite(s.grad).all() and t.grad is None, fn.__name__


@pytest.mark.parametrize("method", ["dist", "rkd", "pkt", "sp"])
def test_presets_train_a_real_student_and_list_their_papers(method):
    cfg = config.DistillConfig(method=method)
    weights = cfg.resolved_weights()
    assert methods.needs_features(weights) == (method != "dist")  # no cached logits for relational terms
    teacher = kd.freeze(build_model("small_cnn", 1, 10))
    student = build_model("tiny_cnn", 1, 10)
    loss_fn = kd.distill_loss(cfg, teacher)
    _, parts = loss_fn(student, torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,)), torch.arange(6))
    parts["loss"].backward()
    assert set(parts) == {"loss", "ce", method} and torch.isfinite(parts["loss"])
    assert all(p.grad is not None for p in student.parameters())
    assert "20" in methods.LOSSES[method]  # the line `kdpipe list losses` prints names the paper's year
