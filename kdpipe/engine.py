"""One training loop for every stage: teacher, scratch student and distilled student.

The split tensors live on the training device as uint8 (whole-dataset-on-device, as airbench does), batches
are cut by index and augmented on the device; the loss is a pluggable function so distillation reuses the
same loop, schedule and early stopping as the scratch baseline.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.config import TrainConfig
from kdpipe.data import augment_batch, to_float
from kdpipe.runtime import Runtime

# (model, float images (B, C, H, W) augmented, labels (B,), train positions (B,)) -> (logits, parts incl. "loss")
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]]


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # uint8 (N, C, H, W), on the training device or on the host for streamed data
    y: torch.Tensor  # int64 (N,), same device as x

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)  # one row per epoch
    best_epoch: int = 0
    best_val_accuracy: float = 0.0
    epochs_run: int = 0
    stopped_early: bool = False


def cross_entropy_loss(label_smoothing: float = 0.0) -> LossFn:
    """The plain supervised loss, used by the teacher and the scratch student."""

    def loss_fn(model, x, y, idx):
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        return logits, {"loss": loss}

    return loss_fn


def lr_factor(progress: float, cfg: TrainConfig) -> float:
    """Learning-rate multiplier at `progress` epochs into the run (fractional): linear warm-up, then the
    schedule over the remaining epochs."""
    if progress < cfg.warmup_epochs:
        return (progress + 1e-3) / cfg.warmup_epochs
    if cfg.schedule == "constant":
        return 1.0
    frac = (progress - cfg.warmup_epochs) / max(cfg.epochs - cfg.warmup_epochs, 1e-9)
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
    return cfg.step_gamma ** sum(frac >= m for m in cfg.step_milestones)


def make_optimizer(params: Iterable[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    params = list(params)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
    )


def _batches(pool: torch.Tensor, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Shuffled index batches over `pool`; a trailing batch of one is dropped (BatchNorm cannot train on it)."""
    order = pool[torch.randperm(len(pool), generator=gen)]
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        if len(idx) > 1 or len(order) == 1:
            yield idx


@torch.inference_mode()
def predict(model: nn.Module, x: torch.Tensor, rt: Runtime, batch_size: int = 512) -> torch.Tensor:
    """Logits (N, K) in fp32 on the host for uint8 images (N, C, H, W); the model is left in eval mode."""
    model.eval()
    out = []
    for start in range(0, len(x), batch_size):
        xb = to_float(x[start : start + batch_size].to(rt.device, non_blocking=True))
        with rt.autocast():
            out.append(model(xb).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def evaluate(model: nn.Module, split: Split, rt: Runtime) -> dict[str, float]:
    logits = predict(model, split.x, rt)
    y = split.y.cpu()
    return {
        "loss": F.cross_entropy(logits, y).item(),
        "accuracy": (logits.argmax(1) == y).float().mean().item(),
    }


def fit(
    model: nn.Module,
    train: Split,
    val: Split,
    cfg: TrainConfig,
    rt: Runtime,
    *,
    seed: int,
    loss_fn: LossFn | None = None,
    epoch_pool: Callable[[int], torch.Tensor] | None = None,
    extra_modules: Iterable[nn.Module] = (),
    on_epoch: Callable[[dict], None] | None = None,
    desc: str = "train",
    restore_best: bool = True,
) -> FitResult:
    """Train `model` in place with cfg's recipe; early-stop on val accuracy and restore the best weights.

    `epoch_pool(epoch)` returns the train positions an epoch may draw from (the curriculum); default all.
    `extra_modules` are trained alongside (e.g. a FitNets adapter). The test split is never seen here.
    `restore_best=False` keeps the last weights (a warm-up phase whose val accuracy means nothing).
    """
    loss_fn = loss_fn or cross_entropy_loss(cfg.label_smoothing)
    extra_modules = list(extra_modules)
    params = [p for m in [model, *extra_modules] for p in m.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg)
    shuffle_gen = torch.Generator().manual_seed(seed)
    aug_gen = rt.generator(seed + 1)
    all_idx = torch.arange(len(train))
    result, best_state, best_key = FitResult(), None, (-1.0, 0.0)
    bar = _progress(cfg.epochs, desc)
    for epoch in range(cfg.epochs):
        pool = epoch_pool(epoch) if epoch_pool else all_idx
        t0 = time.perf_counter()
        row = {"epoch": epoch + 1}
        row.update(_train_epoch(model, extra_modules, train, pool, cfg, rt, opt, loss_fn, epoch, shuffle_gen, aug_gen))
        val_metrics = evaluate(model, val, rt)
        row.update(val_loss=val_metrics["loss"], val_accuracy=val_metrics["accuracy"])
        row.update(seconds=time.perf_counter() - t0, train_samples=len(pool))
        result.history.append(row)
        result.epochs_run = epoch + 1
        key = (row["val_accuracy"], -row["val_loss"])
        if key > best_key:
            best_key, result.best_epoch, result.best_val_accuracy = key, epoch + 1, row["val_accuracy"]
            best_state = _snapshot(model, extra_modules)
        bar(row)
        if on_epoch:
            on_epoch(row)
        if cfg.patience and epoch + 1 - result.best_epoch >= cfg.patience:
            result.stopped_early = True
            break
    if restore_best:
        _restore(model, extra_modules, best_state)
    return result


def _train_epoch(model, extra_modules, train, pool, cfg, rt, opt, loss_fn, epoch, shuffle_gen, aug_gen) -> dict:
    """One pass over `pool`; returns the epoch's mean loss parts, train accuracy and last lr."""
    for m in [model, *extra_modules]:
        m.train()
    n_batches = max(1, math.ceil(len(pool) / cfg.batch_size))
    sums: dict[str, float] = {}
    correct = seen = 0
    for i, idx in enumerate(_batches(pool, cfg.batch_size, shuffle_gen)):
        lr = cfg.lr * lr_factor(epoch + i / n_batches, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        dev_idx = idx.to(train.x.device)
        x = to_float(train.x[dev_idx].to(rt.device, non_blocking=True))
        x = augment_batch(x, cfg.crop_padding, cfg.flip, generator=aug_gen)
        y = train.y[dev_idx].to(rt.device, non_blocking=True)
        with rt.autocast():
            logits, parts = loss_fn(model, x, y, idx)
        opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        opt.step()
        for name, value in parts.items():  # sums as tensors: one host sync per epoch, not per step
            sums[name] = sums.get(name, 0.0) + value.detach().float() * len(idx)
        correct += (logits.argmax(1) == y).sum()
        seen += len(idx)
    row = {f"train_{k}": (v / max(seen, 1)).item() for k, v in sums.items()}
    row["train_accuracy"] = float(correct) / max(seen, 1)
    row["lr"] = lr
    return row


def _snapshot(model: nn.Module, extra_modules: list[nn.Module]) -> list[dict]:
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in [model, *extra_modules]]


def _restore(model: nn.Module, extra_modules: list[nn.Module], state: list[dict] | None) -> None:
    if state is not None:
        for m, s in zip([model, *extra_modules], state, strict=True):
            m.load_state_dict(s)


def _progress(total: int, desc: str) -> Callable[[dict], None]:
    """A tqdm bar on a terminal; one plain line per epoch in logs (DVC, Prefect, CI)."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, unit="epoch", leave=True)

        def update(row: dict) -> None:
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_acc=f"{row['val_accuracy']:.4f}")
            bar.update(1)
            if row["epoch"] == total:
                bar.close()

        return update

    def line(row: dict) -> None:
        print(
            f"{desc} epoch {row['epoch']}/{total} loss {row['train_loss']:.4f} "
            f"train_acc {row['train_accuracy']:.4f} val_acc {row['val_accuracy']:.4f} ({row['seconds']:.1f}s)",
            file=sys.stderr,
            flush=True,
        )

    return line
