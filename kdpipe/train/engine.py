"""One training loop for every stage: teacher, scratch student and distilled student.

Splits that fit live on the training device as uint8 (whole-dataset-on-device, as airbench does) and batches are
cut by index; larger splits stay on disk and the same index batches are read through a DataLoader
(kdpipe.data.ondisk: workers read ahead on a GPU). Either way batches are augmented on the device. The loss is a pluggable function so
distillation reuses the same loop, schedule and early stopping as the scratch baseline.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from kdpipe.config import TrainConfig
from kdpipe.data import text_batches
from kdpipe.data.batches import Split, to_float
from kdpipe.errors import Interrupted
from kdpipe.run import distributed, signals
from kdpipe.run.runtime import Runtime
from kdpipe.train import guards, precise_bn
from kdpipe.train.inference import score
from kdpipe.train.objective import AugmentFn, LossFn, Objective, cross_entropy_loss, recipe_augment
from kdpipe.train.progress import progress_bar


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)  # one row per epoch
    best_epoch: int = 0
    best_val_accuracy: float = 0.0
    epochs_run: int = 0
    stopped_early: bool = False
    start_loss: float | None = None  # median loss over the run's first guards.START_STEPS steps


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


def fit(
    model: nn.Module,
    train: Split,
    val: Split,
    cfg: TrainConfig,
    rt: Runtime,
    *,
    seed: int,
    objective: Objective | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    desc: str = "train",
    restore_best: bool = True,
    state: dict | None = None,
    on_state: Callable[[dict], None] | None = None,
) -> FitResult:
    """Train `model` in place with cfg's recipe; early-stop on val accuracy and restore the best weights.

    The test split is never seen here. `restore_best=False` keeps the last weights (a warm-up phase whose
    val accuracy means nothing). `on_state(state)` gets, after every epoch but the last, everything the rest of
    the run depends on (plain tensors and numbers); `state=` continues from such a state exactly as the
    uninterrupted run would have (kdpipe.train.resume keeps it on disk).
    """
    objective = objective or Objective()
    # where a rerun resumes (1-based): the epoch in progress, until its end state is saved
    at = {"seed": seed, "epoch": (state["epoch"] if state is not None else 0) + 1}
    with _interrupted_at(at):
        trainer = _Trainer.build(model, cfg, rt, seed, objective, desc, train)
        all_idx = torch.arange(len(train))
        result, best_state, best_key, start = FitResult(), None, (-1.0, 0.0), 0
        if state is not None:
            result, best_state, best_key, start = trainer.load_state(state)
        bar = progress_bar(cfg.epochs, desc)
        for epoch in range(start, cfg.epochs):
            at["epoch"] = epoch + 1
            pool = objective.epoch_pool(epoch) if objective.epoch_pool else all_idx
            t0 = time.perf_counter()
            row = {"epoch": epoch + 1, **trainer.train_epoch(train, pool, epoch)}
            if cfg.bn_recalibrate:  # BatchNorm statistics of these weights, not the training's running ones
                precise_bn.recalibrate(model, train, cfg.bn_recalibrate, rt, trainer.read)
            val_metrics = score(model, val, rt)
            row.update(val_loss=val_metrics["loss"], val_accuracy=val_metrics["accuracy"])
            row.update(seconds=time.perf_counter() - t0, train_samples=len(pool))
            result.history.append(row)
            result.epochs_run = epoch + 1
            key = (row["val_accuracy"], -row["val_loss"])
            if key > best_key:
                best_key, result.best_epoch, result.best_val_accuracy = key, epoch + 1, row["val_accuracy"]
                best_state = _snapshot(trainer.modules)
            bar(row)
            if on_epoch:
                on_epoch(row)
            if cfg.patience and epoch + 1 - result.best_epoch >= cfg.patience:
                result.stopped_early = True
                break
            if on_state and epoch + 1 < cfg.epochs:
                on_state(trainer.state(epoch + 1, result, best_state, best_key))
                at["epoch"] = epoch + 2
    result.start_loss = trainer.start_loss
    if restore_best:
        _restore(trainer.modules, best_state)
    return result


@contextmanager
def _interrupted_at(at: dict) -> Iterator[None]:
    """A SIGINT or SIGTERM (errors.Interrupted, raised by the stage's handler) learns where it struck, for the
    stage's one line: `at`'s seed and epoch (1-based) as the loop leaves them, the epoch a rerun resumes at."""
    try:
        yield
    except Interrupted as e:
        if not hasattr(e, "at"):
            e.at = f"seed {at['seed']}, epoch {at['epoch']}"
        raise


@dataclass
class _Trainer:
    """What one fit() carries from step to step: the modules, their optimizer, the loss and the generators."""

    modules: list[nn.Module]  # the model first, then the objective's extra modules
    opt: torch.optim.Optimizer
    loss_fn: LossFn
    augment: AugmentFn
    cfg: TrainConfig
    rt: Runtime
    shuffle_gen: torch.Generator  # on the host: the batch order
    aug_gen: torch.Generator  # on the training device: crops and flips
    scaler: torch.amp.GradScaler | None  # fp16 only
    read: Callable[[Split, Iterable[torch.Tensor]], Iterator[tuple]]  # index batches → (idx, uint8 x, y)
    net: nn.Module  # the model the loss calls: itself, or under DDP in a data-parallel run
    seed: int = 0
    desc: str = "train"  # names the run in errors ("distill seed 1")
    start_loss: float | None = None  # median loss over the run's first guards.START_STEPS steps

    @classmethod
    def build(cls, model: nn.Module, cfg: TrainConfig, rt: Runtime, seed: int, objective: Objective,
              desc: str = "train", train: Split | None = None) -> _Trainer:
        modules = [model, *objective.extra_modules]
        params = [p for m in modules for p in m.parameters() if p.requires_grad]
        return cls(modules, make_optimizer(params, cfg), objective.loss_fn or cross_entropy_loss(cfg.label_smoothing),
                   objective.augment or recipe_augment(cfg, getattr(model, "num_classes", None)), cfg, rt,
                   torch.Generator().manual_seed(seed),
                   rt.generator(seed + 1), rt.grad_scaler(), _reader(train, rt),
                   distributed.wrap(model, rt.device, rt.sync_batchnorm), seed, desc)

    def train_epoch(self, train: Split, pool: torch.Tensor, epoch: int) -> dict:
        """One pass over `pool`; returns the epoch's mean loss parts, train accuracy and last lr."""
        for m in self.modules:
            m.train()
        cfg = self.cfg
        n_batches = max(1, math.ceil(len(pool) / cfg.batch_size))
        sums: dict[str, torch.Tensor] = {}
        steps: dict[str, list[torch.Tensor]] = {}  # each step's loss parts, checked once the epoch is done
        correct = seen = 0
        batches = (text_batches.length_batches(pool, train.lengths, cfg.batch_size, self.shuffle_gen) if train.is_text
                   else _batches(pool, cfg.batch_size, self.shuffle_gen))
        for i, (idx, xb, yb) in enumerate(self.read(train, batches)):
            signals.check()  # a SIGINT/SIGTERM whose exception was swallowed (in a weakref callback) ends it here
            lr = cfg.lr * lr_factor(epoch + i / n_batches, cfg)
            logits, y, parts = self.step(idx, xb, yb, lr)
            for name, value in parts.items():  # sums as tensors: one host sync per epoch, not per step
                sums[name] = sums.get(name, 0.0) + value.detach().float() * len(y)
                steps.setdefault(name, []).append(value.detach().float())
            correct += (logits.argmax(1) == (y if y.dim() == 1 else y.argmax(1))).sum()  # mixed: the larger share
            seen += len(y)
        # Ranks train on shards of each batch: the epoch's figures (and the divergence verdict) are their mean.
        self.check_divergence({name: distributed.average(torch.stack(values)).cpu() for name, values in steps.items()},
                              epoch)
        row = {f"train_{k}": distributed.average(v / max(seen, 1)).item() for k, v in sums.items()}
        row["train_accuracy"] = distributed.average(torch.tensor(float(correct) / max(seen, 1))).item()
        row["lr"] = lr
        distributed.sync_buffers(self.modules[0])  # BatchNorm statistics: rank 0's, so every rank scores alike
        return row

    def state(self, epochs_done: int, result: FitResult, best_state: list | None, best_key: tuple) -> dict:
        """What fit() needs to continue after `epochs_done` epochs, as tensors, numbers and lists (a
        weights_only load reads it back)."""
        return {"epoch": epochs_done, "modules": [m.state_dict() for m in self.modules], "opt": self.opt.state_dict(),
                "shuffle": self.shuffle_gen.get_state(), "aug": self.aug_gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(self.rt.device) if self.rt.device.type == "cuda" else None,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "start_loss": self.start_loss, "result": dataclasses.asdict(result), "best_key": list(best_key),
                "best_state": best_state or []}

    def load_state(self, state: dict) -> tuple[FitResult, list | None, tuple, int]:
        """Put the trainer back where state() was taken; (result so far, best weights, best key, next epoch)."""
        for module, saved in zip(self.modules, state["modules"], strict=True):
            module.load_state_dict(saved)
        self.opt.load_state_dict(state["opt"])
        self.shuffle_gen.set_state(state["shuffle"])
        self.aug_gen.set_state(state["aug"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], self.rt.device)
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.start_loss = state["start_loss"]
        return FitResult(**state["result"]), state["best_state"] or None, tuple(state["best_key"]), state["epoch"]

    def check_divergence(self, steps: dict[str, torch.Tensor], epoch: int) -> None:
        """guards.check_divergence for this run; the run's start loss is taken from its first epoch."""
        if self.start_loss is None and len(steps["loss"]):
            self.start_loss = guards.start_of(steps["loss"])
        guards.check_divergence(steps, self.start_loss, where=f"{self.desc}: diverged at seed {self.seed}, "
                                f"epoch {epoch + 1}", lr=self.cfg.lr, warmup=self.cfg.warmup_epochs)

    def step(self, idx: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor, lr: float
             ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """One optimizer step on the batch (uint8 images xb, labels yb) at train positions `idx`, augmented on the
        device."""
        for group in self.opt.param_groups:
            group["lr"] = lr
        xb = xb.to(self.rt.device, non_blocking=True)
        # Token ids (text_batches.trim) stay ids; photo recipes render the uint8 batch themselves (photo_aug.render:
        # uint8 until the resized crop, float only at the output size).
        x = xb if xb.dtype == torch.int64 or self.cfg.augment == "resized_crop" else to_float(xb)
        # Every rank augments the whole batch with the same generator, then trains on its shard: the views and the
        # random stream are those of one process (shard is the identity there).
        x, rows, y = self.augment(x, idx, yb.to(self.rt.device, non_blocking=True), self.aug_gen)
        x, rows, y = distributed.shard(x), distributed.shard(rows), distributed.shard(y)
        with self.rt.autocast():
            logits, parts = self.loss_fn(self.net, self.rt.layout(x), y, rows)
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is None:
            parts["loss"].backward()
            distributed.average_gradients(self.modules[1:])
            self.opt.step()
        else:  # fp16: scale the loss up so small gradients survive, unscale before the step, skip on inf
            self.scaler.scale(parts["loss"]).backward()
            distributed.average_gradients(self.modules[1:])
            self.scaler.step(self.opt)
            self.scaler.update()
        return logits, y, parts


def _reader(train: Split | None, rt: Runtime):
    """How a training pass reads its index batches: cut from the tensors on the device, or, for a split on disk,
    read through a DataLoader (one stream per fit: its workers, if any, persist across epochs)."""
    if train is not None and train.streamed:
        from kdpipe.data.ondisk import BatchStream

        stream = BatchStream(train, train.workers, pin=rt.device.type == "cuda")
        return lambda split, batches: stream(batches)
    return _gather


def _gather(train: Split, batches: Iterable[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    for idx in batches:
        dev_idx = idx.to(train.x.device)
        if train.is_text:  # padded to the batch's longest text, not to max_length
            yield idx, text_batches.trim(train.x[dev_idx], train.lengths[idx]), train.y[dev_idx]
        else:
            yield idx, train.x[dev_idx], train.y[dev_idx]


def _snapshot(modules: list[nn.Module]) -> list[dict]:
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in modules]


def _restore(modules: list[nn.Module], state: list[dict] | None) -> None:
    if state is not None:
        for m, s in zip(modules, state, strict=True):
            m.load_state_dict(s)


