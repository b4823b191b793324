"""Guards on a training run: it stops, in one line naming the run and the figures, when its loss diverges, and
a finished run fails the same way when it learned nothing.

A guard raises a UserError before anything is written, so a failed run never replaces an output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kdpipe.errors import UserError
from kdpipe.metrics import CHANCE_MARGIN, at_chance, chance_accuracy

if TYPE_CHECKING:
    from kdpipe.config import TrainConfig
    from kdpipe.train.engine import FitResult

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


class NotLearnedError(UserError):
    """Training learned nothing (val accuracy at chance, or a loss that never fell): the stage stops before
    anything is written, as after a divergence."""


def check_learned(result: FitResult, val_labels: torch.Tensor, recipe: TrainConfig, *, stage: str, seed: int,
                  section: str, from_scratch: bool = True) -> None:
    """NotLearnedError when a finished run's best val accuracy is at chance (metrics.at_chance: at most
    CHANCE_MARGIN above the majority class's share of val), or when, for a model trained from its initialisation,
    the loss never fell below its start in any epoch after the first (an epoch's mean against the median of the
    run's first START_STEPS steps; a one-epoch run is too short to tell). A brought teacher fine-tuned further may
    keep its low start loss, so only its accuracy is checked. `section` (teacher | student) names the params
    whose chance_guard turns this off."""
    where = f"{stage}: learned nothing at seed {seed} in {result.epochs_run} epochs"
    fix = (f"check the labels and the recipe ({section}.lr {recipe.lr:g}, batch_size {recipe.batch_size}), or set "
           f"{section}.chance_guard: false to keep such a run")
    chance = chance_accuracy(val_labels.cpu())
    if at_chance(result.best_val_accuracy, chance):
        raise NotLearnedError(f"{where}: best val accuracy {result.best_val_accuracy:.4f} is at chance ({chance:.4f}, "
                              f"the majority class's share of val, + {CHANCE_MARGIN:g}); {fix}")
    later = [row["train_loss"] for row in result.history[1:]]
    if from_scratch and later and result.start_loss is not None and min(later) >= result.start_loss:
        raise NotLearnedError(f"{where}: the loss never fell below its start {result.start_loss:.4g} (lowest epoch "
                              f"mean after the first: {min(later):.4g}); {fix}")
