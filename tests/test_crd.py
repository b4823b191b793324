"""CRD: reference values from independent numpy implementations of RepDistiller's ContrastLoss, ContrastMemory and
CRDLoss on fixed tensors, and the properties the distill stage relies on (gradients, buffers, Z, resume)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from kdpipe.distill.crd import CRDHead, crd_nce_loss, crd_scores

EPS = 1e-7


def _fixed(*shape, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).normal(size=shape)).double()


def _unit(x, axis=-1):
    return x / np.linalg.norm(x, axis=axis, keepdims=True)


def _np_nce(p, n_data):
    """ContrastLoss written out sample by sample, column by column."""
    m, total = p.shape[1] - 1, 0.0
    for row in p:
        total += math.log(row[0] / (row[0] + m / n_data + EPS))
        for k in range(1, m + 1):
            total += math.log((m / n_data) / (row[k] + m / n_data + EPS))
    return -total / len(p)


def _np_scores(anchor, bank_rows, temperature):
    return np.exp(np.einsum("bkd,bd->bk", bank_rows, anchor) / temperature)


def _head(seed=3, **kw):
    args = dict(student_dim=5, teacher_dim=7, n_data=20, feat_dim=8, negatives=6, seed=seed) | kw
    return CRDHead(**args).double()


def _inputs():
    return _fixed(4, 5, 2, 2, seed=1), _fixed(4, 7, 3, 3, seed=2), torch.tensor([3, 0, 17, 9])


def _gen(seed=11):
    return torch.Generator().manual_seed(seed)


def test_nce_loss_matches_the_formula():
    p = torch.from_numpy(np.random.default_rng(4).uniform(1e-3, 2.0, size=(4, 6)))
    assert crd_nce_loss(p, 50).item() == pytest.approx(_np_nce(p.numpy(), 50), rel=1e-12)
    assert crd_nce_loss(p, 50).dtype == torch.float64  # fp64 stays fp64
    assert crd_nce_loss(p.half(), 50).dtype == torch.float32


def test_scores_match_the_formula():
    anchor = torch.from_numpy(_unit(_fixed(3, 4).numpy()))
    bank = _fixed(3, 5, 4, seed=1)
    got = crd_scores(anchor, bank, 0.5)
    assert got.shape == (3, 5)
    np.testing.assert_allclose(got.numpy(), _np_scores(anchor.numpy(), bank.numpy(), 0.5), rtol=1e-12)


def test_head_forward_matches_repdistiller():
    head = _head()
    f_s, f_t, rows = _inputs()
    n, k, t, mom = 20, 6, head.temperature, head.momentum
    w_s, b_s = head.embed_s.linear.weight.detach().numpy(), head.embed_s.linear.bias.detach().numpy()
    w_t, b_t = head.embed_t.linear.weight.detach().numpy(), head.embed_t.linear.bias.detach().numpy()
    mem_s, mem_t = head.memory_s.numpy().copy(), head.memory_t.numpy().copy()
    negatives = torch.randint(0, n, (4, k), generator=_gen()).numpy()  # what the head draws from the same seed

    loss = head(f_s, f_t, rows, generator=_gen()).item()

    r = rows.numpy()
    v_s = _unit(f_s.numpy().mean(axis=(2, 3)) @ w_s.T + b_s)
    v_t = _unit(f_t.numpy().mean(axis=(2, 3)) @ w_t.T + b_t)
    idx = np.concatenate([r[:, None], negatives], axis=1)
    out_t = _np_scores(v_t, mem_s[idx], t)  # ContrastMemory's out_v2: teacher against the student bank
    out_s = _np_scores(v_s, mem_t[idx], t)  # out_v1: student against the teacher bank
    z_s, z_t = out_s.mean() * n, out_t.mean() * n
    expected = _np_nce(out_s / z_s, n) + _np_nce(out_t / z_t, n)
    assert loss == pytest.approx(expected, rel=1e-10)
    assert head.z_s.item() == pytest.approx(z_s, rel=1e-12) and head.z_t.item() == pytest.approx(z_t, rel=1e-12)

    new_s, new_t = mem_s.copy(), mem_t.copy()
    for b, row in enumerate(r):
        new_s[row] = _unit(mom * mem_s[row] + (1 - mom) * v_s[b])
        new_t[row] = _unit(mom * mem_t[row] + (1 - mom) * v_t[b])
    np.testing.assert_allclose(head.memory_s.numpy(), new_s, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(head.memory_t.numpy(), new_t, rtol=1e-12, atol=1e-14)
    untouched = np.setdiff1d(np.arange(n), r)
    assert np.array_equal(head.memory_s.numpy()[untouched], mem_s[untouched])  # bit for bit
    assert np.array_equal(head.memory_t.numpy()[untouched], mem_t[untouched])
    assert not np.allclose(head.memory_s.numpy()[r], mem_s[r])  # the batch's rows did move


def test_gradients_reach_the_student_and_both_embeddings_but_not_the_teacher_or_banks():
    head = _head()
    f_s, f_t, rows = _inputs()
    f_s.requires_grad_()
    f_t.requires_grad_()
    head(f_s, f_t, rows, generator=_gen()).backward()
    assert f_s.grad is not None and torch.isfinite(f_s.grad).all() and f_s.grad.abs().sum() > 0
    assert f_t.grad is None
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    params = {name for name, _ in head.named_parameters()}
    assert {"memory_s", "memory_t", "z_s", "z_t"} <= set(head.state_dict()) and not params & {"memory_s", "memory_t"}
    assert {name.split(".")[0] for name in params} == {"embed_s", "embed_t"}
    assert not head.memory_s.requires_grad and not head.memory_t.requires_grad


def test_two_steps_before_one_backward_still_backpropagate():
    head = _head()
    f_s, f_t, rows = _inputs()
    f_s.requires_grad_()
    (head(f_s, f_t, rows, generator=_gen()) + head(f_s, f_t, rows + 1, generator=_gen(12))).backward()
    assert f_s.grad is not None and torch.isfinite(f_s.grad).all()


def test_a_well_separated_positive_gives_a_smaller_loss():
    anchor = torch.from_numpy(_unit(_fixed(4, 8).numpy()))
    bank = torch.from_numpy(_unit(_fixed(4, 6, 8, seed=1).numpy()))
    aligned, opposed = bank.clone(), bank.clone()
    aligned[:, 0], opposed[:, 0] = anchor, -anchor  # the positive is the anchor itself, or its antipode
    n_data, inv_z = 100, 1.0 / 100  # any fixed 1/Z: the comparison is at equal normalisation
    good = crd_nce_loss(crd_scores(anchor, aligned, 0.07) * inv_z, n_data)
    bad = crd_nce_loss(crd_scores(anchor, opposed, 0.07) * inv_z, n_data)
    assert good < bad
    # and directly on the scores: raising only the positive column lowers the loss
    p = torch.full((4, 6), 0.05, dtype=torch.float64)
    high = p.clone()
    high[:, 0] = 5.0
    assert crd_nce_loss(high, n_data) < crd_nce_loss(p, n_data)


def test_z_is_set_by_the_first_batch_then_fixed():
    head = _head()
    assert head.z_s.item() == -1.0 and head.z_t.item() == -1.0
    f_s, f_t, rows = _inputs()
    head(f_s, f_t, rows, generator=_gen())
    z_s, z_t = head.z_s.clone(), head.z_t.clone()
    assert z_s > 0 and z_t > 0
    head(_fixed(4, 5, 2, 2, seed=8), _fixed(4, 7, 3, 3, seed=9), torch.tensor([1, 2, 4, 19]), generator=_gen(5))
    assert torch.equal(head.z_s, z_s) and torch.equal(head.z_t, z_t)


@pytest.mark.parametrize("bad", [20, -1])
def test_rows_out_of_range_are_refused(bad):
    head = _head()
    f_s, f_t, _ = _inputs()
    with pytest.raises(ValueError, match=rf"row {bad} .*n_data=20"):
        head(f_s, f_t, torch.tensor([0, 1, bad, 2]))


def test_state_dict_round_trip_gives_the_same_loss():
    first = _head(seed=3)
    f_s, f_t, rows = _inputs()
    first(f_s, f_t, rows, generator=_gen())  # Z set, banks moved: the state worth resuming
    torch.manual_seed(123)  # a different embedding init, and a different bank seed, for the resumed head
    resumed = _head(seed=9)
    resumed.load_state_dict(first.state_dict())
    batch = (_fixed(4, 5, 2, 2, seed=5), _fixed(4, 7, 3, 3, seed=6), torch.tensor([7, 3, 12, 0]))
    assert first(*batch, generator=_gen(2)).item() == resumed(*batch, generator=_gen(2)).item()
    assert torch.equal(first.memory_s, resumed.memory_s) and torch.equal(first.memory_t, resumed.memory_t)


def test_same_seed_same_banks_and_repdistillers_init_range():
    a, b, c = (CRDHead(4, 4, 30, feat_dim=12, seed=seed) for seed in (5, 5, 6))
    assert torch.equal(a.memory_s, b.memory_s) and torch.equal(a.memory_t, b.memory_t)
    assert not torch.equal(a.memory_s, c.memory_s) and not torch.equal(a.memory_s, a.memory_t)
    stdv = 1 / math.sqrt(12 / 3)
    assert a.memory_s.abs().max() <= stdv and a.memory_s.abs().max() > 0.9 * stdv
    assert a.memory_s.shape == (30, 12) and a.memory_s.dtype == torch.float32


def test_pooled_vectors_equal_maps_and_negatives_are_clamped_to_the_data():
    head = _head(n_data=5, negatives=4096)
    assert head.negatives == 4
    f_s, f_t, _ = _inputs()
    rows = torch.tensor([0, 4, 2, 1])
    twin = copy.deepcopy(head)
    from_maps = head(f_s, f_t, rows, generator=_gen())
    from_vectors = twin(f_s.mean(dim=(2, 3)), f_t.mean(dim=(2, 3)), rows, generator=_gen())
    assert from_maps.item() == pytest.approx(from_vectors.item(), rel=1e-12)


def test_autocast_inputs_give_an_fp32_loss_computed_in_full_precision():
    head = CRDHead(5, 7, n_data=20, feat_dim=8, negatives=6)
    twin = copy.deepcopy(head)
    f_s, f_t, rows = _inputs()
    f_s, f_t = f_s.bfloat16(), f_t.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = head(f_s, f_t, rows, generator=_gen())
    plain = twin(f_s.float(), f_t.float(), rows, generator=_gen())
    assert under_autocast.dtype == torch.float32 and head.memory_s.dtype == torch.float32
    assert under_autocast.item() == plain.item()


def test_distill_stage_with_crd_saves_the_bank_beside_each_student(tiny_pipeline, tmp_path, monkeypatch):
    """method crd through the real distill stage: the head trains with the student, and its memory banks, one row
    per training image (validation and test images have no row), are saved beside the student it taught."""
    from kdpipe import config
    from kdpipe.data.prepared import load_prepared
    from kdpipe.stages import distill

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = tiny_pipeline.workspace(tmp_path, distill__method="crd", distill__crd_negatives=64)
    params["student"].update(seeds=[0])
    metrics = distill.run(config.from_dict(params))
    assert metrics["weights"] == {"ce": 1.0, "crd": 0.8} and 0.0 <= metrics["test_accuracy"] <= 1.0
    saved = torch.load(tmp_path / "models/distill/seed0_alongside.pt", weights_only=True)
    head = saved["modules"]["CRDHead"]
    n_train = len(load_prepared(tiny_pipeline.work / "data/prepared/dataset.pt")["train_y"])
    assert head["memory_s"].shape == head["memory_t"].shape == (n_train, 128)
    assert head["z_s"].item() > 0 and head["z_t"].item() > 0  # set by the first batch
    norms = head["memory_s"].norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)  # every row was updated: unit length
    assert saved["seed"] == 0 and saved["params"]["distill"]["method"] == "crd"
