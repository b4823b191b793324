"""The one place where loss terms are weighted and summed (`composite_loss`); it returns the parts for logging."""

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import Tensor

from kdpipe.distill.feature_losses import attention_transfer, hint_loss, pkt_loss, rkd_loss, sp_loss
from kdpipe.distill.losses import cross_entropy, dist_loss, dkd, focal_loss, kd_kl, logit_mse
from kdpipe.distill.methods import LOSSES, validate_weights
from kdpipe.distill.transformer_losses import attention_mse, hidden_cosine, hidden_mse

_T = TypeVar("_T")


def _require(value: _T | None, what: str, term: str) -> _T:
    """Return `value`, or raise naming the loss term that needs it."""
    if value is None:
        raise ValueError(f"{term}: needs {what}")
    return value


def composite_loss(
    student_logits: Tensor,
    labels: Tensor,
    *,
    teacher_logits: Tensor | None = None,
    weights: dict[str, float],
    temperature: float = 4.0,
    focal_gamma: float | None = None,
    label_smoothing: float = 0.0,
    student_feats: Sequence[Tensor] | None = None,
    teacher_feats: Sequence[Tensor] | None = None,
    hint_adapter: Callable[[Tensor], Tensor] | None = None,
    hint_index: int | tuple[int, int] = -1,
    dkd_alpha: float = 1.0,
    dkd_beta: float = 8.0,
    crd: Callable[[Tensor, Tensor], Tensor] | None = None,
    attention_mask: Tensor | None = None,
    student_attentions: Sequence[Tensor] | None = None,
    teacher_attentions: Sequence[Tensor] | None = None,
    hidden_projection: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """The one explicit weighted sum of the terms above:

        L = w_ce·CE + w_kd·T²·KL(p_t^T ‖ p_s^T) + w_mse·MSE + w_hint·Hint + w_at·AT + w_dkd·DKD
            + w_dist·DIST + w_rkd·RKD + w_pkt·PKT + w_sp·SP + w_crd·CRD
            + w_hidden·L_hidn + w_attn·L_attn + w_cos·L_cos

    Missing or zero weights are not computed. The seed article's "L = MSE + α·KL" is weights
    {"mse": 1, "kd": α}; Hinton's KD is {"ce": 1 − α, "kd": α}. CE becomes focal loss when `focal_gamma`
    is given (still logged as "ce"). Hint uses feature pair `hint_index` (an int indexes both lists, a pair
    (i_student, i_teacher) each); AT uses all pairs zipped from the deepest stage; DIST the logits; RKD, PKT,
    SP and CRD the deepest stage of each network. `crd(student_map, teacher_map)` is the batch's CRD head
    (kdpipe.distill.crd.CRDHead bound to the batch's train positions): it holds the memory banks, so it is state, not
    a pure function. The text terms (kdpipe.distill.transformer_losses) read `student_feats`/`teacher_feats` as
    the models' hidden states (embeddings first), the attention maps and the batch's `attention_mask`; hidden,
    and cos when the widths differ, go through `hidden_projection`; cos uses the last hidden states.

    Returns {"loss": L, <term>: unweighted value for each active term}, all fp32 scalars.
    """
    validate_weights(weights, temperature)
    if focal_gamma is not None and label_smoothing > 0:
        raise ValueError("label_smoothing: not supported together with focal_gamma")
    active = [name for name in LOSSES if weights.get(name, 0.0) > 0]
    parts: dict[str, Tensor] = {}
    if "ce" in active:
        parts["ce"] = (
            cross_entropy(student_logits, labels, label_smoothing)
            if focal_gamma is None
            else focal_loss(student_logits, labels, focal_gamma)
        )
    if "kd" in active:
        parts["kd"] = kd_kl(student_logits, _require(teacher_logits, "teacher_logits", "kd"), temperature)
    if "mse" in active:
        parts["mse"] = logit_mse(student_logits, _require(teacher_logits, "teacher_logits", "mse"))
    if "hint" in active:
        i_s, i_t = (hint_index, hint_index) if isinstance(hint_index, int) else hint_index
        parts["hint"] = hint_loss(
            _require(student_feats, "student_feats", "hint")[i_s],
            _require(teacher_feats, "teacher_feats", "hint")[i_t],
            _require(hint_adapter, "hint_adapter", "hint"),
        )
    if "at" in active:
        parts["at"] = attention_transfer(
            _require(student_feats, "student_feats", "at"), _require(teacher_feats, "teacher_feats", "at")
        )
    if "dkd" in active:
        teacher = _require(teacher_logits, "teacher_logits", "dkd")
        parts["dkd"] = dkd(student_logits, teacher, labels, dkd_alpha, dkd_beta, temperature)["loss"]
    if "dist" in active:
        parts["dist"] = dist_loss(student_logits, _require(teacher_logits, "teacher_logits", "dist"), temperature)
    for name, fn in (("rkd", rkd_loss), ("pkt", pkt_loss), ("sp", sp_loss)):
        if name in active:  # the deepest stage's maps of both networks
            parts[name] = fn(_require(student_feats, "student_feats", name)[-1],
                             _require(teacher_feats, "teacher_feats", name)[-1])
    if "crd" in active:
        parts["crd"] = _require(crd, "a CRD head", "crd")(_require(student_feats, "student_feats", "crd")[-1],
                                                           _require(teacher_feats, "teacher_feats", "crd")[-1])
    if "hidden" in active:
        parts["hidden"] = hidden_mse(_require(student_feats, "student_feats", "hidden"),
                                     _require(teacher_feats, "teacher_feats", "hidden"),
                                     _require(attention_mask, "attention_mask", "hidden"),
                                     _require(hidden_projection, "hidden_projection", "hidden"))
    if "attn" in active:
        parts["attn"] = attention_mse(_require(student_attentions, "student_attentions", "attn"),
                                      _require(teacher_attentions, "teacher_attentions", "attn"),
                                      _require(attention_mask, "attention_mask", "attn"))
    if "cos" in active:
        parts["cos"] = hidden_cosine(_require(student_feats, "student_feats", "cos")[-1],
                                     _require(teacher_feats, "teacher_feats", "cos")[-1],
                                     _require(attention_mask, "attention_mask", "cos"), hidden_projection)
    total = torch.stack([weights[name] * value for name, value in parts.items()]).sum()
    return {"loss": total, **parts}

