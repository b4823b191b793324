"""What a training run optimises beyond the plain recipe: the loss function, modules trained alongside the model,
the curriculum's pool per epoch and the augmentation (the recipe's own, pad_crop or resized_crop, unless replaced).

Labels reach the loss as class indices (N,), or as (N, K) probabilities where the augmentation mixed images
(mixup / cutmix): losses.cross_entropy takes either."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from kdpipe.config import TrainConfig
from kdpipe.data import photo_aug
from kdpipe.data.batches import augment_batch
from kdpipe.distill import losses

# (model, float images (B, C, H, W) augmented, labels (B,) or mixed (B, K), rows (B,)) -> (logits, parts incl.
# "loss"). rows are the batch's train positions, or what the objective's `augment` returned instead (the rows of
# cached views).
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]]


# (float images (B, C, H, W), uint8 for augment: resized_crop, train positions (B,), labels (B,), generator) ->
# (augmented float images, rows for the loss, labels: y itself, or (B, K) probabilities where images were mixed)
AugmentFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator],
                     tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass
class Objective:
    """What a stage adds to the plain recipe: the loss (default cross-entropy), modules trained alongside the
    model (a FitNets adapter), `epoch_pool(epoch)`, the train positions an epoch may draw from (the
    curriculum; default all), and `augment`, which replaces the recipe's random crop and flip (replayed
    teacher views; default none)."""

    loss_fn: LossFn | None = None
    extra_modules: list[nn.Module] = field(default_factory=list)
    epoch_pool: Callable[[int], torch.Tensor] | None = None
    augment: AugmentFn | None = None


def cross_entropy_loss(label_smoothing: float = 0.0) -> LossFn:
    """The plain supervised loss, used by the teacher and the scratch student."""

    def loss_fn(model, x, y, idx):
        logits = model(x)
        return logits, {"loss": losses.cross_entropy(logits, y, label_smoothing)}

    return loss_fn


def recipe_augment(cfg: TrainConfig, num_classes: int | None = None) -> AugmentFn:
    """The recipe's augmentation: pad_crop's random crop and flip, or resized_crop's photo views (kdpipe.data.
    photo_aug; mixing needs `num_classes` for the mixed labels). The loss gets the train positions."""

    def photo(x: torch.Tensor, idx: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
        x, y = photo_aug.augment(x, y, cfg, gen, num_classes, cfg.flip)
        return x, idx, y

    def augment(x: torch.Tensor, idx: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
        return augment_batch(x, cfg.crop_padding, cfg.flip, generator=gen), idx, y

    return photo if cfg.augment == "resized_crop" else augment
