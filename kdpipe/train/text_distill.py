"""Distillation of text models with the transformer feature terms (issue 34): TinyBERT's hidden-state and attention
matching, DistilBERT's cosine (kdpipe/distill/transformer_losses.py, weighted by composite.py). The student and the
frozen teacher read the same token ids under the same mask; their hidden states (embeddings first, then each layer)
and attention probabilities go to the terms. Logit-only text distillation needs none of this: distiller.distill_loss
calls `model(ids)` as for images.
"""

from __future__ import annotations

import torch
from torch import nn

from kdpipe.config import DistillConfig
from kdpipe.distill import composite, transformer_losses
from kdpipe.train.objective import LossFn


def is_text(model: nn.Module) -> bool:
    return getattr(model, "modality", "image") == "text"


def make_projection(student: nn.Module, teacher: nn.Module, weights: dict[str, float]) -> nn.Module | None:
    """TinyBERT's W_h (student width → teacher width), trained with the student: for the hidden term, and for
    the cosine term when the widths differ (DistilBERT's equal widths need none)."""
    widths = student.hidden_width, teacher.hidden_width
    if weights.get("hidden", 0) > 0 or (weights.get("cos", 0) > 0 and widths[0] != widths[1]):
        return transformer_losses.make_hidden_projection(*widths)
    return None


def text_distill_loss(cfg: DistillConfig, teacher: nn.Module, *, weights: dict[str, float],
                      projection: nn.Module | None = None, label_smoothing: float = 0.0) -> LossFn:
    """The engine's loss for a text student whose terms read hidden states or attention maps (a live teacher:
    cached logits hold neither)."""

    def loss_fn(student, ids, y, idx):
        mask = ids != student.pad_id  # (B, L) True at tokens; the same for both: one tokenizer
        student_logits, student_hidden, student_attn = student.text_features(ids, mask)
        with torch.no_grad():  # not inference_mode: its tensors may not enter an autograd graph
            teacher_logits, teacher_hidden, teacher_attn = teacher.text_features(ids, mask)
        parts = composite.composite_loss(
            student_logits, y, teacher_logits=teacher_logits, weights=weights, temperature=cfg.temperature,
            focal_gamma=cfg.focal_gamma, label_smoothing=0.0 if cfg.focal_gamma is not None else label_smoothing,
            dkd_alpha=cfg.dkd_alpha, dkd_beta=cfg.dkd_beta, student_feats=student_hidden, teacher_feats=teacher_hidden,
            student_attentions=student_attn, teacher_attentions=teacher_attn, attention_mask=mask.long(),
            hidden_projection=projection)
        return student_logits, parts

    return loss_fn
