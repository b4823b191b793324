"""Distillation wiring: a frozen teacher, the loss the engine calls, the curriculum's sample pools.

The loss itself lives in `losses` (pure functions); this module only decides where the teacher's outputs
come from: a cached tensor over the training split (computed once by the teacher stage, valid only when
the student sees un-augmented images and needs logits alone), or a live teacher forward on the very
augmented batch the student sees.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kdpipe import curriculum, losses
from kdpipe.config import CurriculumConfig, DistillConfig, StudentConfig
from kdpipe.engine import LossFn

FEATURE_TERMS = ("hint", "at")


def freeze(teacher: nn.Module) -> nn.Module:
    """Eval mode (BatchNorm uses its running statistics) and no gradients, for good."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def needs_features(weights: dict[str, float]) -> bool:
    return any(weights.get(term, 0) > 0 for term in FEATURE_TERMS)


def can_use_cached_logits(student: StudentConfig, weights: dict[str, float]) -> bool:
    """Cached teacher logits describe the un-augmented images; they are right only when the student
    sees exactly those, and when no term needs the teacher's intermediate features."""
    return student.crop_padding == 0 and not student.flip and not needs_features(weights)


def make_hint_adapter(student: nn.Module, teacher: nn.Module, cfg: DistillConfig) -> nn.Module | None:
    """FitNets' regressor from the student's guided layer to the teacher's hint layer (trained with the student)."""
    if not cfg.resolved_weights().get("hint"):
        return None
    return losses.make_hint_adapter(student.feature_channels[cfg.hint_layer], teacher.feature_channels[cfg.hint_layer])


def distill_loss(
    cfg: DistillConfig,
    teacher: nn.Module,
    *,
    weights: dict[str, float] | None = None,
    cached_logits: torch.Tensor | None = None,
    hint_adapter: nn.Module | None = None,
    label_smoothing: float = 0.0,
) -> LossFn:
    """The engine's loss for a distilled student; `cached_logits` (N_train, K) replaces the teacher forward."""
    weights = weights or cfg.resolved_weights()
    with_feats = needs_features(weights)

    def loss_fn(student, x, y, idx):
        if with_feats:
            student_logits, student_feats = student.forward_features(x)
        else:
            student_logits, student_feats = student(x), None
        teacher_feats = None
        with torch.no_grad():  # not inference_mode: its tensors may not enter an autograd graph
            if cached_logits is not None:
                teacher_logits = cached_logits[idx.to(cached_logits.device)].to(x.device)
            elif with_feats:
                teacher_logits, teacher_feats = teacher.forward_features(x)
            else:
                teacher_logits = teacher(x)
        parts = losses.composite_loss(
            student_logits, y, teacher_logits=teacher_logits, weights=weights, temperature=cfg.temperature,
            focal_gamma=cfg.focal_gamma, label_smoothing=0.0 if cfg.focal_gamma is not None else label_smoothing,
            student_feats=student_feats, teacher_feats=teacher_feats, hint_adapter=hint_adapter,
            hint_index=cfg.hint_layer, dkd_alpha=cfg.dkd_alpha, dkd_beta=cfg.dkd_beta,
        )
        return student_logits, parts

    return loss_fn


def curriculum_pool(cfg: CurriculumConfig, difficulty: torch.Tensor, epochs: int, seed: int):
    """epoch → train positions available that epoch: the easiest (per `ordering`) fraction given by the
    pacing function, growing from `start_fraction` to all samples at epoch ceil(full_at · epochs)."""
    ordered = curriculum.order(difficulty, cfg.ordering, seed)
    full_epoch = max(1, math.ceil(cfg.full_at * epochs))

    def pool(epoch: int) -> torch.Tensor:
        fraction = curriculum.pacing(epoch, kind=cfg.pacing, start_fraction=cfg.start_fraction,
                                     full_epoch=full_epoch, steps=cfg.steps)
        return curriculum.epoch_subset(ordered, fraction)

    return pool
