"""Curriculum by teacher difficulty: score, order, and pace the training set. Pure functions.

Curriculum learning (Bengio et al. 2009) shows easy examples first and grows the set over time. Here the
difficulty of a sample is the teacher's loss on it; the ordering is easy→hard (the curriculum),
hard→easy (the anti-curriculum) or random (the control with identical pacing, as in Wu et al. 2021,
"When Do Curricula Work?"). Pacing functions follow Hacohen & Weinshall 2019, "On the Power of Curriculum
Learning in Training Deep Networks": at each epoch the first `pacing(epoch)` fraction of the ordered set
is used.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from kdpipe.distill.methods import ORDERINGS, PACINGS


class Curriculum(Protocol):
    """What epoch_pools reads of params' curriculum section (config.CurriculumConfig has these fields): a
    protocol, so that this module never imports config and config never imports it."""

    ordering: str
    pacing: str
    start_fraction: float
    full_at: float
    steps: int


def difficulty_from_teacher(teacher_logits: Tensor, labels: Tensor) -> Tensor:
    """Per-sample teacher cross-entropy on the true label, −log softmax(z_t)_y, (N, C) → (N,); higher = harder."""
    return F.cross_entropy(teacher_logits.float(), labels, reduction="none")


def _check_pacing_args(kind: str, start_fraction: float, full_epoch: int, steps: int, epoch: int) -> None:
    if kind not in PACINGS:
        raise ValueError(f"pacing: unknown kind {kind!r}; known: {', '.join(PACINGS)}")
    if not 0 < start_fraction <= 1:
        raise ValueError(f"start_fraction: must be in (0, 1], got {start_fraction}")
    if full_epoch < 1:
        raise ValueError(f"full_epoch: must be ≥ 1, got {full_epoch}")
    if kind == "step" and steps < 2:
        raise ValueError(f"steps: must be ≥ 2, got {steps}")
    if epoch < 0:
        raise ValueError(f"epoch: must be ≥ 0, got {epoch}")


def pacing(epoch: int, *, kind: str, start_fraction: float, full_epoch: int, steps: int = 4) -> float:
    """Fraction of the ordered training set available at 0-based `epoch`.

    With s = start_fraction and progress u = min(epoch / full_epoch, 1):
        linear:    s + (1 − s)·u
        root:      s + (1 − s)·√u                    (fast early growth)
        step:      s + (1 − s)·⌊(steps − 1)·u⌋ / (steps − 1)   (a staircase of `steps` levels, s … 1)
        geometric: s^(1 − u)                         (exponential growth from s to 1)
    Every kind gives s at epoch 0, 1.0 from `full_epoch` on, and is non-decreasing in between.
    """
    _check_pacing_args(kind, start_fraction, full_epoch, steps, epoch)
    s, u = start_fraction, min(epoch / full_epoch, 1.0)
    if kind == "linear":
        fraction = s + (1 - s) * u
    elif kind == "root":
        fraction = s + (1 - s) * math.sqrt(u)
    elif kind == "step":
        fraction = s + (1 - s) * math.floor((steps - 1) * u) / (steps - 1)
    else:  # geometric
        fraction = s ** (1 - u)
    return min(max(fraction, s), 1.0)


def order(difficulty: Tensor, ordering: str, seed: int) -> Tensor:
    """Permutation of sample indices (LongTensor, (N,)) in which samples are shown.

    easy_to_hard: ascending difficulty; hard_to_easy: descending (both stable, ties keep index order);
    random: a permutation drawn from `seed` only (the difficulty values are ignored).
    """
    if ordering == "easy_to_hard":
        return torch.argsort(difficulty, stable=True)
    if ordering == "hard_to_easy":
        return torch.argsort(difficulty, descending=True, stable=True)
    if ordering == "random":
        generator = torch.Generator().manual_seed(seed)
        return torch.randperm(difficulty.shape[0], generator=generator)
    raise ValueError(f"ordering: unknown {ordering!r}; known: {', '.join(ORDERINGS)}")


def epoch_subset(ordered_idx: Tensor, fraction: float) -> Tensor:
    """The first ⌈fraction·N⌉ indices of `ordered_idx` (at least one)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction: must be in (0, 1], got {fraction}")
    n = len(ordered_idx)
    # Round first so that float noise (0.3·10 = 3.0000000000000004) does not add a sample.
    count = max(1, math.ceil(round(fraction * n, 9)))
    return ordered_idx[: min(count, n)]


def epoch_pools(cfg: Curriculum, difficulty: Tensor, epochs: int, seed: int) -> Callable[[int], Tensor]:
    """epoch → train positions available that epoch: the easiest (per `ordering`) fraction given by the
    pacing function, growing from `start_fraction` to all samples at epoch ceil(full_at · epochs)."""
    ordered = order(difficulty, cfg.ordering, seed)
    full_epoch = max(1, math.ceil(cfg.full_at * epochs))

    def pool(epoch: int) -> Tensor:
        fraction = pacing(epoch, kind=cfg.pacing, start_fraction=cfg.start_fraction, full_epoch=full_epoch,
                          steps=cfg.steps)
        return epoch_subset(ordered, fraction)

    return pool
