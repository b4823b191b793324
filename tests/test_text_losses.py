"""The transformer feature losses (kdpipe/distill/transformer_losses.py) against references computed by explicit
loops in numpy, their masks, their gradients, and their registration as loss terms."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kdpipe.distill import composite, methods
from kdpipe.distill import transformer_losses as tl

B, L = 3, 5
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])  # right-padded, as batches are


def hidden(n_layers: int, width: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, L, width, generator=g, dtype=torch.float64) for _ in range(n_layers + 1)]


def attentions(n_layers: int, heads: int, seed: int) -> list[torch.Tensor]:
    """Attention probabilities as a masked softmax gives them: rows over real keys only."""
    g = torch.Generator().manual_seed(seed)
    keys = MASK[:, None, None, :].bool()  # (B, 1, 1, L)
    scores = [torch.randn(B, heads, L, L, generator=g, dtype=torch.float64) for _ in range(n_layers)]
    return [s.masked_fill(~keys, float("-inf")).softmax(-1) for s in scores]


def projection(d_s: int, d_t: int, seed: int = 3) -> nn.Linear:
    torch.manual_seed(seed)
    return tl.make_hidden_projection(d_s, d_t).double()


def np_(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def ref_layer_map(m_layers: int, n_layers: int) -> list[int]:
    """g(m) = max(1, round-half-up(m·N/M)), written with floats."""
    return [max(1, int(np.floor(m * n_layers / m_layers + 0.5))) for m in range(1, m_layers + 1)]


def ref_hidden_mse(hs, ht, mask, proj: nn.Linear) -> float:
    w, b = np_(proj.weight), np_(proj.bias)
    pairs = [(0, 0)] + [(m, g) for m, g in enumerate(ref_layer_map(len(hs) - 1, len(ht) - 1), start=1)]
    total = 0.0
    for i_s, i_t in pairs:
        s, t = np_(hs[i_s]), np_(ht[i_t])
        acc, count = 0.0, 0
        for bi in range(B):
            for li in range(L):
                if mask[bi, li]:
                    acc += sum((w @ s[bi, li] + b - t[bi, li]) ** 2)
                    count += 1
        total += acc / (count * t.shape[-1])
    return total


def ref_attention_mse(as_, at, mask) -> float:
    total = 0.0
    for m, g in enumerate(ref_layer_map(len(as_), len(at))):
        s, t = np_(as_[m]), np_(at[g - 1])
        if s.shape[1] != t.shape[1]:
            s, t = s.mean(1, keepdims=True), t.mean(1, keepdims=True)
        acc, count = 0.0, 0
        for bi in range(B):
            for q in range(L):
                for k in range(L):
                    if mask[bi, q] and mask[bi, k]:
                        acc += sum((s[bi, h, q, k] - t[bi, h, q, k]) ** 2 for h in range(s.shape[1]))
                        count += s.shape[1]
        total += acc / count
    return total


def ref_cosine(s, t, mask) -> float:
    s, t = np_(s), np_(t)
    values = [1 - s[bi, li] @ t[bi, li] / (np.linalg.norm(s[bi, li]) * np.linalg.norm(t[bi, li]))
              for bi in range(B) for li in range(L) if mask[bi, li]]
    return float(np.mean(values))


# ---------------------------------------------------------------------------------------------------------
# Layer mapping


@pytest.mark.parametrize(("m", "n", "expected"), [(4, 12, [3, 6, 9, 12]), (2, 4, [2, 4]), (3, 3, [1, 2, 3]),
                                                  (2, 3, [2, 3]), (3, 2, [1, 1, 2]), (1, 6, [6])])
def test_layer_map_hand_values(m, n, expected):
    assert tl.layer_map(m, n) == expected


def test_layer_map_matches_the_formula_and_ends_on_the_last_layer():
    for m in range(1, 9):
        for n in range(1, 13):
            g = tl.layer_map(m, n)
            assert g == ref_layer_map(m, n) and g[-1] == n and g == sorted(g) and min(g) >= 1


def test_layer_map_refuses_no_layers():
    with pytest.raises(ValueError, match="^layer_map: needs >= 1 layer"):
        tl.layer_map(0, 4)


# ---------------------------------------------------------------------------------------------------------
# Reference values


@pytest.mark.parametrize(("m", "n", "d_s", "d_t"), [(2, 4, 4, 6), (2, 3, 6, 6), (3, 2, 5, 3)])
def test_hidden_mse_matches_loop_reference(m, n, d_s, d_t):
    hs, ht, proj = hidden(m, d_s, 0), hidden(n, d_t, 1), projection(d_s, d_t)
    value = tl.hidden_mse(hs, ht, MASK, proj)
    assert value.item() == pytest.approx(ref_hidden_mse(hs, ht, MASK, proj), rel=1e-12)


@pytest.mark.parametrize(("m", "n", "h_s", "h_t"), [(2, 4, 2, 2), (2, 2, 2, 4), (3, 2, 1, 3)])
def test_attention_mse_matches_loop_reference(m, n, h_s, h_t):
    as_, at = attentions(m, h_s, 0), attentions(n, h_t, 1)
    value = tl.attention_mse(as_, at, MASK)
    assert value.item() == pytest.approx(ref_attention_mse(as_, at, MASK), rel=1e-12)


def test_hidden_cosine_matches_loop_reference_with_and_without_projection():
    s, t = hidden(1, 6, 0)[-1], hidden(1, 6, 1)[-1]
    assert tl.hidden_cosine(s, t, MASK).item() == pytest.approx(ref_cosine(s, t, MASK), rel=1e-12)
    narrow, proj = hidden(1, 4, 2)[-1], projection(4, 6)
    value = tl.hidden_cosine(narrow, t, MASK, proj)
    assert value.item() == pytest.approx(ref_cosine(proj(narrow), t, MASK), rel=1e-12)


def test_zero_when_the_student_is_the_teacher():
    ht = hidden(2, 4, 1)
    identity = projection(4, 4)
    with torch.no_grad():
        identity.weight.copy_(torch.eye(4))
        identity.bias.zero_()
    assert tl.hidden_mse(ht, ht, MASK, identity).item() == 0
    at = attentions(2, 2, 1)
    assert tl.attention_mse(at, at, MASK).item() == 0
    assert tl.hidden_cosine(ht[-1], ht[-1], MASK).item() == pytest.approx(0, abs=1e-12)


def test_cosine_ignores_each_token_vector_length():
    s, t = hidden(1, 6, 0)[-1], hidden(1, 6, 1)[-1]
    scale = torch.rand(B, L, 1, dtype=torch.float64) * 5 + 0.1
    assert tl.hidden_cosine(s * scale, t, MASK).item() == pytest.approx(tl.hidden_cosine(s, t, MASK).item(), rel=1e-12)
    assert tl.hidden_cosine(-t, t, MASK).item() == pytest.approx(2.0)  # opposite directions: the maximum


# ---------------------------------------------------------------------------------------------------------
# Masks: what a model computes at a pad position never counts


def with_pads_changed(x: torch.Tensor, value: float) -> torch.Tensor:
    """x with every pad token's entries (dims 1 of (B, L, H), and both L dims of (B, h, L, L)) replaced."""
    pad = ~MASK.bool()
    x = x.clone()
    if x.dim() == 3:
        x[pad] = value
    else:
        x.masked_fill_(pad[:, None, :, None] | pad[:, None, None, :], value)
    return x


def test_pad_positions_change_nothing_and_real_ones_do():
    hs, ht, proj = hidden(2, 4, 0), hidden(4, 6, 1), projection(4, 6)
    as_, at = attentions(2, 2, 0), attentions(4, 2, 1)
    before = (tl.hidden_mse(hs, ht, MASK, proj), tl.attention_mse(as_, at, MASK),
              tl.hidden_cosine(hs[-1], ht[-1][..., :4], MASK))
    hs2, ht2 = [with_pads_changed(h, 7.0) for h in hs], [with_pads_changed(h, -3.0) for h in ht]
    as2, at2 = [with_pads_changed(a, 0.9) for a in as_], [with_pads_changed(a, 0.1) for a in at]
    after = (tl.hidden_mse(hs2, ht2, MASK, proj), tl.attention_mse(as2, at2, MASK),
             tl.hidden_cosine(hs2[-1], ht2[-1][..., :4], MASK))
    for b_, a_ in zip(before, after, strict=True):
        assert a_.item() == b_.item()
    hs2[-1][1, 1] += 1.0  # a real token of text 1
    as2[0][1, 0, 1, 2] += 0.5
    assert tl.hidden_mse(hs2, ht2, MASK, proj).item() != before[0].item()
    assert tl.attention_mse(as2, at2, MASK).item() != before[1].item()
    assert tl.hidden_cosine(hs2[-1], ht2[-1][..., :4], MASK).item() != before[2].item()


def test_a_padded_batch_gives_the_loss_of_its_unpadded_texts():
    """Batch = one text padded to L: the same value as that text alone at its own length."""
    hs, ht, proj = hidden(2, 4, 0), hidden(2, 6, 1), projection(4, 6)
    row, n = 1, int(MASK[1].sum())
    alone = [h[row:row + 1, :n] for h in hs], [h[row:row + 1, :n] for h in ht], torch.ones(1, n)
    padded = [h[row:row + 1] for h in hs], [h[row:row + 1] for h in ht], MASK[row:row + 1]
    assert tl.hidden_mse(*alone[:2], alone[2], proj).item() == pytest.approx(
        tl.hidden_mse(*padded[:2], padded[2], proj).item(), rel=1e-12)


# ---------------------------------------------------------------------------------------------------------
# Gradients


def test_gradients_reach_the_projection_and_the_student_only_at_tokens():
    hs = [h.requires_grad_() for h in hidden(2, 4, 0)]
    ht = [h.requires_grad_() for h in hidden(4, 6, 1)]
    proj = projection(4, 6)
    (tl.hidden_mse(hs, ht, MASK, proj) + tl.hidden_cosine(hs[-1], ht[-1], MASK, proj)).backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0 and proj.bias.grad.abs().sum() > 0
    pad = ~MASK.bool()
    for h in hs:
        assert h.grad[pad].abs().sum() == 0 and h.grad[~pad].abs().sum() > 0
    assert all(h.grad is None for h in ht)  # the teacher side is detached
    a_s = [a.requires_grad_() for a in attentions(2, 2, 0)]
    tl.attention_mse(a_s, attentions(2, 2, 1), MASK).backward()
    assert all(a.grad.abs().sum() > 0 for a in a_s)


def test_bf16_inputs_give_fp32_losses():
    hs, ht = [h.bfloat16() for h in hidden(2, 4, 0)], [h.bfloat16() for h in hidden(2, 6, 1)]
    as_, at = [a.bfloat16() for a in attentions(2, 2, 0)], [a.bfloat16() for a in attentions(2, 2, 1)]
    proj = tl.make_hidden_projection(4, 6)
    for value in (tl.hidden_mse(hs, ht, MASK, proj), tl.attention_mse(as_, at, MASK),
                  tl.hidden_cosine(hs[-1], ht[-1], MASK, proj)):
        assert value.dtype == torch.float32 and value.dim() == 0 and torch.isfinite(value)


# ---------------------------------------------------------------------------------------------------------
# Bad inputs: one line naming the term


def test_bad_inputs_name_the_term():
    hs, ht = hidden(2, 4, 0), hidden(2, 6, 1)
    with pytest.raises(ValueError, match="^attn: the student has no attention maps"):
        tl.attention_mse([], attentions(2, 2, 1), MASK)
    with pytest.raises(ValueError, match="^cos: student width 4 and teacher width 6 differ"):
        tl.hidden_cosine(hs[-1], ht[-1], MASK)
    with pytest.raises(ValueError, match="^hidden: student .* and teacher .* must share"):
        tl.hidden_mse(hs, [h[:, :3] for h in ht], MASK, projection(4, 6))
    with pytest.raises(ValueError, match="^hidden: needs the embedding output"):
        tl.hidden_mse(hs[:1], ht, MASK, projection(4, 6))
    with pytest.raises(ValueError, match="^attention_mask: shape"):
        tl.hidden_cosine(ht[-1], ht[-1], MASK[:, :3])


# ---------------------------------------------------------------------------------------------------------
# Registration: composite sum, presets, names, models they fit


def text_inputs():
    g = torch.Generator().manual_seed(5)
    zs, zt = torch.randn(B, 4, generator=g), torch.randn(B, 4, generator=g)
    y = torch.randint(0, 4, (B,), generator=g)
    kwargs = dict(teacher_logits=zt, student_feats=[h.float() for h in hidden(2, 4, 0)],
                  teacher_feats=[h.float() for h in hidden(4, 6, 1)],
                  student_attentions=[a.float() for a in attentions(2, 2, 0)],
                  teacher_attentions=[a.float() for a in attentions(4, 4, 1)],
                  attention_mask=MASK, hidden_projection=tl.make_hidden_projection(4, 6))
    return zs, y, kwargs


@pytest.mark.parametrize("method", ["tinybert", "distilbert"])
def test_text_presets_are_weighted_sums_of_the_pure_terms(method):
    zs, y, kwargs = text_inputs()
    weights = methods.PRESETS[method]
    out = composite.composite_loss(zs, y, weights=weights, temperature=2.0, **kwargs)
    assert set(out) == {"loss", *weights}
    expected = {"hidden": tl.hidden_mse(kwargs["student_feats"], kwargs["teacher_feats"], MASK,
                                        kwargs["hidden_projection"]),
                "attn": tl.attention_mse(kwargs["student_attentions"], kwargs["teacher_attentions"], MASK),
                "cos": tl.hidden_cosine(kwargs["student_feats"][-1], kwargs["teacher_feats"][-1], MASK,
                                        kwargs["hidden_projection"])}
    for name in set(weights) & set(expected):
        assert out[name].item() == pytest.approx(expected[name].item(), rel=1e-6)
    total = sum(weights[name] * out[name] for name in weights)
    assert out["loss"].item() == pytest.approx(total.item(), rel=1e-6)
    out["loss"].backward()
    assert kwargs["hidden_projection"].weight.grad.abs().sum() > 0


def test_composite_names_the_missing_text_input():
    zs, y, kwargs = text_inputs()
    del kwargs["attention_mask"]
    with pytest.raises(ValueError, match="^hidden: needs attention_mask$"):
        composite.composite_loss(zs, y, weights={"hidden": 1.0}, **kwargs)
    zs, y, kwargs = text_inputs()
    del kwargs["hidden_projection"]
    with pytest.raises(ValueError, match="^hidden: needs hidden_projection$"):
        composite.composite_loss(zs, y, weights={"hidden": 1.0}, **kwargs)


def test_text_terms_are_listed_need_features_and_validate():
    for term in methods.TEXT_FEATURE_TERMS:
        assert term in methods.LOSSES and term in methods.FEATURE_TERMS
        assert "20" in methods.LOSSES[term]  # the paper's year is on the `kdpipe list losses` line
    for method in ("tinybert", "distilbert"):
        methods.validate_weights(methods.PRESETS[method], 4.0)
        assert methods.needs_features(methods.PRESETS[method])  # a live teacher: no cache holds hidden states


def test_kdpipe_list_losses_shows_the_text_terms(capsys):
    from kdpipe.cli import list_losses

    assert list_losses() == 0
    out = capsys.readouterr().out
    for name in ("hidden", "attn", "cos", "tinybert", "distilbert"):
        assert f"  {name} " in out


@pytest.mark.parametrize(("weights", "text", "attention", "message"), [
    ({"ce": 1.0, "hidden": 1.0}, False, True, r"^distill: the hidden term reads token hidden states .* image models lack"),
    ({"ce": 1.0, "cos": 1.0}, False, True, r"^distill: the cos term reads token hidden states"),
    ({"ce": 1.0, "hint": 1.0}, True, True, r"^distill: the hint term reads \(N, C, H, W\) .* text models lack"),
    ({"ce": 1.0, "attn": 1.0}, True, False, r"^distill: the attn term reads attention maps, which the student lacks"),
])
def test_terms_that_do_not_fit_the_models_are_refused_in_one_line(weights, text, attention, message):
    with pytest.raises(ValueError, match=message) as info:
        methods.check_terms_fit_model(weights, text, attention)
    assert "\n" not in str(info.value)


def test_terms_that_fit_pass():
    methods.check_terms_fit_model(methods.PRESETS["tinybert"], text=True)
    methods.check_terms_fit_model({"kd": 1.0, "hidden": 1.0, "attn": 0.0}, text=True, attention=False)
    methods.check_terms_fit_model(methods.PRESETS["fitnet"], text=False)
    methods.check_terms_fit_model(methods.PRESETS["kd"], text=False)


@pytest.mark.parametrize(("distill", "term"), [({"method": "tinybert"}, "hidden"), ({"method": "distilbert"}, "cos"),
                                               ({"method": "kd", "weights": {"attn": 1.0}}, "attn")])
def test_params_weighting_a_text_term_for_an_image_model_fail_in_one_line(tmp_path, capsys, distill, term):
    import yaml

    from kdpipe import cli
    from kdpipe.errors import EXIT_USER_ERROR

    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())  # the image pipeline
    params["distill"] = distill
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    assert cli.main(["check-params", str(path)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"the {term} term reads token hidden states" in err[0] and "image models" in err[0], err
