"""Transformer feature losses for text students: pure functions of hidden states and attention maps.

Conventions (those of kdpipe/distill/losses.py, plus the mask):
- `hidden_states` is a list of (B, L, H) tensors, the embedding output first, then each layer's output (as
  Hugging Face's `output_hidden_states` gives them); `attentions` a list of (B, heads, L, L) attention
  probabilities, one per layer (`output_attentions`);
- `attention_mask` is (B, L), 1 = token, 0 = pad: pad positions never count, so what a model computes there
  (a padded batch's garbage) cannot move a loss;
- student and teacher read the same token ids (same L); widths, depths and head counts may differ;
- inputs are cast to fp32 (fp64 stays fp64) and the teacher side is detached; each loss is a scalar.

The learned projection (`make_hidden_projection`) is the only trainable piece here: the distiller creates it
once per student and optimises it together with the student.
"""

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _fp32(x: Tensor) -> Tensor:
    """Upcast half/bf16 to fp32; keep fp64 so exactness tests stay exact."""
    return x if x.dtype == torch.float64 else x.float()


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """TinyBERT's uniform layer mapping n = g(m) (Jiao et al. 2020, §3.3 "Distillation Objective"):
    student layer m = 1..M learns from teacher layer

        g(m) = max(1, round(m·N / M))      (round half up; the paper's g(m) = m·N/M when M divides N)

    so the last student layer always learns from the last teacher layer, and the embedding layers (0) pair
    with each other (g(0) = 0, added by the callers). Returns [g(1), ..., g(M)], 1-based layer numbers."""
    if student_layers < 1 or teacher_layers < 1:
        raise ValueError(f"layer_map: needs >= 1 layer on each side, got student {student_layers}, "
                         f"teacher {teacher_layers}")
    return [max(1, (2 * m * teacher_layers + student_layers) // (2 * student_layers))
            for m in range(1, student_layers + 1)]


def make_hidden_projection(student_width: int, teacher_width: int) -> nn.Linear:
    """TinyBERT's W_h: a learned linear map (with bias, as TinyBERT's `fit_dense`) from the student's width to the
    teacher's, one for the embedding output and every mapped layer. Train it with the student."""
    return nn.Linear(student_width, teacher_width)


def _token_mask(attention_mask: Tensor, like: Tensor) -> Tensor:
    """(B, L) 1/0 mask → (B, L, 1) in `like`'s dtype, checked against `like`'s (B, L)."""
    if tuple(attention_mask.shape) != tuple(like.shape[:2]):
        raise ValueError(f"attention_mask: shape {tuple(attention_mask.shape)} does not fit hidden states "
                         f"{tuple(like.shape)} (B, L, H)")
    return attention_mask.to(like.dtype)[:, :, None]


def _check_same_tokens(student: Tensor, teacher: Tensor, what: str) -> None:
    if student.shape[:2] != teacher.shape[:2]:
        raise ValueError(f"{what}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must share "
                         f"(B, L): both read the same token ids")


def _masked_hidden_mse(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """Σ_{b,l} m_bl ‖h_s − h_t‖² / (Σ m · H): the MSE over real tokens only. (B, L, H) each."""
    m = _token_mask(mask, student)  # (B, L, 1)
    squared = (student - teacher).pow(2) * m  # (B, L, H), zero at pads
    return squared.sum() / (m.sum().clamp(min=1) * student.shape[-1])


def hidden_mse(
    student_hidden: Sequence[Tensor],
    teacher_hidden: Sequence[Tensor],
    attention_mask: Tensor,
    projection: Callable[[Tensor], Tensor],
) -> Tensor:
    """TinyBERT's embedding-layer and hidden-state distillation (Jiao et al. 2020, "TinyBERT: Distilling BERT
    for Natural Language Understanding", eqs. 8–9):

        L_hidn = Σ_{m=0..M} MSE(H_S^m W_h, H_T^{g(m)}),    g(0) = 0 (embeddings), g from `layer_map`

    with W_h the learned projection (student width → teacher width; one W_h for every layer, as TinyBERT's code
    applies one `fit_dense`) and the MSE the mean over real tokens and the teacher's H dimensions:
    Σ_{b,l} m_bl ‖H_S W_h − H_T‖²_bl / (Σ_{b,l} m_bl · H_T). TinyBERT's code averages over pads too; here pads
    never count. Both lists are embeddings first, then layers: M + 1 and N + 1 entries."""
    if len(student_hidden) < 2 or len(teacher_hidden) < 2:
        raise ValueError(f"hidden: needs the embedding output and >= 1 layer on each side, got "
                         f"{len(student_hidden)} student and {len(teacher_hidden)} teacher hidden states")
    pairs = [(0, 0), *enumerate(layer_map(len(student_hidden) - 1, len(teacher_hidden) - 1), start=1)]
    terms = []
    for i_s, i_t in pairs:
        target = _fp32(teacher_hidden[i_t]).detach()
        _check_same_tokens(student_hidden[i_s], target, "hidden")
        projected = _fp32(projection(_fp32(student_hidden[i_s])))  # (B, L, H_t)
        terms.append(_masked_hidden_mse(projected, target, attention_mask))
    return torch.stack(terms).sum()


def _heads_to_compare(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """(B, h_s, L, L) and (B, h_t, L, L) as they are when the head counts match, else both averaged over heads
    to (B, 1, L, L): head i of one model has no counterpart in the other then."""
    if student.shape[1] == teacher.shape[1]:
        return student, teacher
    return student.mean(dim=1, keepdim=True), teacher.mean(dim=1, keepdim=True)


def _masked_attention_mse(student: Tensor, teacher: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of (A_s − A_t)² over heads and the (query, key) pairs where both are real tokens."""
    m = attention_mask.to(student.dtype)
    pair = (m[:, :, None] * m[:, None, :])[:, None]  # (B, 1, L, L): query and key both tokens
    squared = (student - teacher).pow(2) * pair  # (B, h, L, L)
    return squared.sum() / (pair.sum().clamp(min=1) * student.shape[1])


def attention_mse(
    student_attentions: Sequence[Tensor], teacher_attentions: Sequence[Tensor], attention_mask: Tensor
) -> Tensor:
    """TinyBERT's attention-based distillation (Jiao et al. 2020, eq. 7):

        L_attn = Σ_{m=1..M} (1/h) Σ_{i=1..h} MSE(A_i^{S,m}, A_i^{T,g(m)}),    g from `layer_map`

    A the (L, L) attention map of head i, the MSE over the (query, key) pairs where both positions are real
    tokens. When the head counts differ, each side's heads are averaged to one map first. TinyBERT's code
    matches the pre-softmax scores; the maps here are the probabilities Hugging Face's `output_attentions`
    returns (rows sum to 1 over real keys), so the term is bounded and needs no score clipping."""
    if not student_attentions or not teacher_attentions:
        side = "student" if not student_attentions else "teacher"
        raise ValueError(f"attn: the {side} has no attention maps (a non-attention model such as text_cnn); "
                         f"use the hidden or cos terms")
    terms = []
    for i_s, g in enumerate(layer_map(len(student_attentions), len(teacher_attentions))):
        student, teacher = _fp32(student_attentions[i_s]), _fp32(teacher_attentions[g - 1]).detach()
        expected = (tuple(attention_mask.shape), (attention_mask.shape[-1],) * 2)  # (B, L), (L, L)
        if any((tuple(a.shape[:1] + a.shape[-1:]), tuple(a.shape[-2:])) != expected for a in (student, teacher)):
            raise ValueError(f"attn: maps {tuple(student.shape)} and {tuple(teacher.shape)} must both be "
                             f"(B, heads, L, L) with (B, L) = {tuple(attention_mask.shape)}, the mask's")
        terms.append(_masked_attention_mse(*_heads_to_compare(student, teacher), attention_mask))
    return torch.stack(terms).sum()


def hidden_cosine(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    attention_mask: Tensor,
    projection: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """DistilBERT's cosine embedding loss (Sanh et al. 2019, "DistilBERT, a distilled version of BERT", §3 and
    its training code's `loss_cos`), on one pair of (B, L, H) hidden states (the callers pass the last layer's):

        L_cos = Σ_{b,l} m_bl (1 − cos(h_s,bl, h_t,bl)) / Σ_{b,l} m_bl

    It aligns the directions of the student's and the teacher's token vectors, not their lengths. DistilBERT's
    student has the teacher's width; when the widths differ, the student's vectors go through `projection`
    (the learned W_h of `hidden_mse`) first."""
    student, teacher = _fp32(student_hidden), _fp32(teacher_hidden).detach()
    _check_same_tokens(student, teacher, "cos")
    if student.shape[-1] != teacher.shape[-1]:
        if projection is None:
            raise ValueError(f"cos: student width {student.shape[-1]} and teacher width {teacher.shape[-1]} "
                             f"differ; needs the hidden projection")
        student = _fp32(projection(student))
    m = _token_mask(attention_mask, student)[..., 0]  # (B, L)
    distance = 1 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)  # (B, L)
    return (distance * m).sum() / m.sum().clamp(min=1)
