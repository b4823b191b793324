"""The student recipe, run once per seed: shared by the scratch baseline and the distilled student so
that the two differ only in the loss (and, for distillation, the curriculum).

Outputs per stage: models/<stage>/seed<N>.pt, metrics/<stage>.json (mean ± std over seeds and each seed),
plots/<stage>.csv (per-epoch curves averaged over seeds).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from kdpipe.config import Config
from kdpipe.engine import FitResult, evaluate, fit

CURVE_KEYS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "train_samples")


@dataclass
class SeedSetup:
    """What a stage adds to the plain recipe for one seed's student."""

    loss_fn: Callable | None = None
    extra_modules: list[nn.Module] = field(default_factory=list)
    epoch_pool: Callable | None = None


@dataclass
class SeedRun:
    seed: int
    model: nn.Module
    result: FitResult
    val: dict
    test: dict
    train_seconds: float


def build_student(cfg: Config, prepared: dict, rt) -> nn.Module:
    from kdpipe.models import build_model

    c = prepared["image_shape"][0]
    return build_model(cfg.student.model, c, len(prepared["classes"]), mean=prepared["mean"],
                       std=prepared["std"]).to(rt.device)


def train_seeds(cfg: Config, prepared: dict, rt, splits, *, stage: str,
                setup: Callable[[nn.Module, int], SeedSetup] = lambda model, seed: SeedSetup(),
                on_epoch: Callable[[dict, int], None] | None = None) -> list[SeedRun]:
    """Train one student per seed in cfg.student.seeds with the student recipe."""
    from kdpipe.runtime import seed_everything

    train, val, test = splits
    runs = []
    for seed in cfg.student.seeds:
        seed_everything(seed)  # same seed → same init for scratch and distill: a paired comparison
        model = build_student(cfg, prepared, rt)
        extra = setup(model, seed)
        t0 = time.perf_counter()
        result = fit(model, train, val, cfg.student, rt, seed=seed, loss_fn=extra.loss_fn,
                     epoch_pool=extra.epoch_pool, extra_modules=extra.extra_modules, desc=f"{stage} seed {seed}",
                     on_epoch=(lambda row, s=seed: on_epoch(row, s)) if on_epoch else None)
        seconds = time.perf_counter() - t0
        runs.append(SeedRun(seed, model, result, evaluate(model, val, rt), evaluate(model, test, rt), seconds))
    return runs


def summarise(runs: list[SeedRun]) -> dict:
    """Mean ± sample std over seeds (std 0 for one seed), plus each seed's numbers."""
    def stats(values: list[float]) -> tuple[float, float]:
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    val_mean, val_std = stats([r.val["accuracy"] for r in runs])
    test_mean, test_std = stats([r.test["accuracy"] for r in runs])
    return {
        "val_accuracy": val_mean, "val_accuracy_std": val_std,
        "test_accuracy": test_mean, "test_accuracy_std": test_std,
        "seeds": [r.seed for r in runs],
        "per_seed": [{"seed": r.seed, "val_accuracy": r.val["accuracy"], "test_accuracy": r.test["accuracy"],
                      "epochs_run": r.result.epochs_run, "best_epoch": r.result.best_epoch,
                      "train_seconds": round(r.train_seconds, 2)} for r in runs],
    }


def mean_curves(runs: list[SeedRun]) -> list[dict]:
    """Per-epoch curves averaged over the seeds still training at that epoch (early stopping varies)."""
    longest = max(r.result.epochs_run for r in runs)
    rows = []
    for epoch in range(1, longest + 1):
        present = [r.result.history[epoch - 1] for r in runs if r.result.epochs_run >= epoch]
        row = {"epoch": epoch, "seeds": len(present)}
        for key in CURVE_KEYS:
            values = [h[key] for h in present if key in h]
            if values:
                row[key] = statistics.fmean(values)
        rows.append(row)
    return rows


def write_outputs(stage: str, runs: list[SeedRun], cfg: Config, prepared: dict, params: dict,
                  extra_metrics: dict | None = None) -> dict:
    """Checkpoints per seed, the metrics JSON and the curves CSV; returns the metrics."""
    from kdpipe.artifacts import save_checkpoint, write_csv, write_json
    from kdpipe.models import count_parameters

    for r in runs:
        save_checkpoint(Path(cfg.paths.models) / stage / f"seed{r.seed}.pt", r.model, classes=prepared["classes"],
                        params=params, extra={"seed": r.seed, "dataset_digest": prepared["digest"]})
    metrics = {**summarise(runs), "model": cfg.student.model, "num_parameters": count_parameters(runs[0].model),
               **(extra_metrics or {}), "dataset_digest": prepared["digest"], "params": params}
    write_json(Path(cfg.paths.metrics) / f"{stage}.json", metrics)
    write_csv(Path(cfg.paths.plots) / f"{stage}.csv", mean_curves(runs))
    return metrics


def run_student_stage(stage: str, cfg: Config, *, params: dict, tags: dict | None = None,
                      make_setup: Callable | None = None, extra_metrics: dict | None = None) -> dict:
    """The body of the scratch and distill stages: data → per-seed students → outputs + MLflow run.

    `make_setup(prepared, rt, splits)` runs before the MLflow run opens, so a bad teacher or cache fails with
    nothing logged or written; it returns the per-seed `setup(model, seed) -> SeedSetup`.
    """
    import sys

    from kdpipe import runtime, tracking
    from kdpipe.artifacts import load_prepared
    from kdpipe.stagekit import place_splits

    rt = runtime.setup(cfg.seed)
    prepared = load_prepared(cfg.paths.prepared)
    splits = place_splits(prepared, rt, stream=cfg.data.dataset == "imagefolder")
    setup = make_setup(prepared, rt, splits) if make_setup else (lambda model, seed: SeedSetup())
    run_tags = {"dataset": cfg.data.dataset, "dataset_digest": prepared["digest"], "model": cfg.student.model,
                **runtime.device_facts(rt), **(tags or {})}
    with tracking.stage_run(stage, cfg, tags=run_tags) as run:
        runs = train_seeds(cfg, prepared, rt, splits, stage=stage, setup=setup,
                           on_epoch=lambda row, seed: run.log_epoch(row, prefix=f"seed{seed}/"))
        metrics = write_outputs(stage, runs, cfg, prepared, params, extra_metrics)
        run.log_metrics({k: metrics[k] for k in ("test_accuracy", "test_accuracy_std", "num_parameters")})
        run.log_metrics({"final_val_accuracy": metrics["val_accuracy"],
                         "final_val_accuracy_std": metrics["val_accuracy_std"]})
        run.log_artifact(Path(cfg.paths.metrics) / f"{stage}.json")
        run.log_artifact(Path(cfg.paths.plots) / f"{stage}.csv")
    print(f"{stage}: {cfg.student.model} test_acc {metrics['test_accuracy']:.4f} ± {metrics['test_accuracy_std']:.4f} "
          f"over seeds {metrics['seeds']}", file=sys.stderr)
    return metrics
