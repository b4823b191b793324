"""Guards on a training run: it stops, in one line naming the run and the figures, when its loss diverges.

A guard raises a UserError before anything is written, so a failed run never replaces an output.
"""

from __future__ import annotations

import torch

from kdpipe.errors import UserError

# A loss this many times its value over the first steps of a run has diverged (a bad learning rate: teacher.lr 10
# measured 4.7 → 1,115,076 in one epoch here), as has a non-finite one.
DIVERGENCE_FACTOR = 100.0


START_STEPS = 10  # the steps whose median loss is "the start" (a median: a blow-up among them does not move it)


class DivergedError(UserError):
    """Training diverged: the stage stops before anything is written."""


def start_of(loss: torch.Tensor) -> float:
    """A run's start loss: the median over its first START_STEPS steps."""
    return loss[:START_STEPS].nanmedian().item()


def check_divergence(steps: dict[str, torch.Tensor], start_loss: float | None, *, where: str, lr: float,
                     warmup: float) -> None:
    """DivergedError naming the first step whose loss is non-finite or DIVERGENCE_FACTOR times the run's start
    (a non-finite gradient shows one step later, as a non-finite loss). `steps`: each part, one value a step;
    `where` names the run and epoch ("distill: diverged at seed 1, epoch 3")."""
    loss = steps["loss"]
    limit = DIVERGENCE_FACTOR * max(abs(start_loss or 0.0), 1e-3)
    bad = (~torch.isfinite(loss) | (loss > limit)).nonzero()
    if len(bad):
        i = int(bad[0])
        parts = ", ".join(f"{k} {v[i].item():.4g}" for k, v in steps.items() if k != "loss")
        parts = f" ({parts})" if parts else ""
        raise DivergedError(
            f"{where}, step {i + 1}/{len(loss)}: loss {loss[i].item():.4g}{parts}, over {DIVERGENCE_FACTOR:g}x its "
            f"start {start_loss:.4g} or not finite; lower the lr ({lr:g}) or raise warmup_epochs ({warmup:g})")
