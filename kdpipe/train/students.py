"""One student per seed, with one recipe: the scratch baseline and the distilled student differ only in the
objective (loss, extra modules, curriculum), so a seed's two students start from the same weights and see
the same batches: a paired comparison. Results are summarised as mean ± std over seeds. `student_stage` is the
whole body of the scratch and distill stages (it lives here, not in kdpipe/run/stage.py, so that the other stages' code
deps do not include the student loop)."""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn

from kdpipe.config import StudentConfig
from kdpipe.data.batches import Split
from kdpipe.metrics import mean_std
from kdpipe.train.engine import FitResult, fit
from kdpipe.train.guards import check_learned
from kdpipe.train.inference import score
from kdpipe.train.objective import Objective

if TYPE_CHECKING:
    from kdpipe.run.stage import StageContext
    from kdpipe.train.resume import Resume

CURVE_KEYS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "train_samples")


@dataclass
class SeedRun:
    seed: int
    model: nn.Module
    result: FitResult
    val: dict  # inference.score of the restored best weights
    test: dict
    train_seconds: float
    alongside: dict = field(default_factory=dict)  # class name → state_dict of what trained with the student


def build_student(recipe: StudentConfig, prepared: dict, device) -> nn.Module:
    from kdpipe.models.text_nets import build_text_for
    from kdpipe.models.zoo import build_model

    if prepared.get("modality") == "text":
        from kdpipe.config import TextNetParams

        return build_text_for(recipe.model, recipe.text or TextNetParams(), prepared).to(device)
    c = prepared["image_shape"][0]
    return build_model(recipe.model, c, len(prepared["classes"]), mean=prepared["mean"],
                       std=prepared["std"]).to(device)


def train_seeds(recipe: StudentConfig, prepared: dict, rt, splits: tuple[Split, Split, Split], *, desc: str,
                objective_for: Callable[[nn.Module, int], Objective] | None = None,
                on_epoch: Callable[[dict, int], None] | None = None, resume: Resume | None = None) -> list[SeedRun]:
    """Train one student per seed in recipe.seeds; `objective_for(student, seed)` adds the stage's objective
    (it may train the student first, as FitNets' hint phase does). With `resume`, seeds an interrupted run
    finished are not trained again and the one it stopped in continues from its last complete epoch."""
    from kdpipe.run.runtime import seed_everything

    train, val, test = splits
    exact = rt.exact()  # reported scores: the fp32 weights that are saved, as evaluate and export see them
    runs = []
    for seed in recipe.seeds:
        seed_everything(seed)  # same seed → same init for scratch and distill
        model = rt.prepare(build_student(recipe, prepared, rt.device))
        done = resume.done(seed) if resume else None
        if done is not None:
            model.load_state_dict(done["model"])
            result, seconds, alongside = FitResult(**done["result"]), done["seconds"], done.get("alongside", {})
        else:
            result, seconds, alongside = _train_one(model, seed, recipe, rt, train, val, desc, objective_for,
                                                    on_epoch, resume)
        runs.append(SeedRun(seed, model, result, score(model, val, exact), score(model, test, exact), seconds,
                            alongside))
    return runs


def _train_one(model, seed, recipe, rt, train, val, desc, objective_for, on_epoch, resume):
    """fit() one seed (from where an interrupted run left it, with `resume`); (FitResult, seconds, the state of
    the modules trained alongside the student: a FitNets adapter, a CRD head with its memory banks)."""
    objective = objective_for(model, seed) if objective_for else Objective()
    if resume:
        resume.announce(seed)
    t0 = time.perf_counter()
    result = fit(model, train, val, recipe, rt, seed=seed, objective=objective, desc=f"{desc} seed {seed}",
                 on_epoch=(lambda row: on_epoch(row, seed)) if on_epoch else None,
                 state=resume.current(seed) if resume else None,
                 on_state=(lambda state: resume.save_epoch(seed, state)) if resume else None)
    seconds = time.perf_counter() - t0
    if recipe.chance_guard:  # before the seed counts as done or anything is written
        check_learned(result, val.y, recipe, stage=desc, seed=seed, section="student")
    alongside = {type(m).__name__: m.state_dict() for m in objective.extra_modules}
    if resume:
        resume.save_done(seed, {"model": model.state_dict(), "result": dataclasses.asdict(result),
                                "seconds": seconds, "alongside": alongside})
    return result, seconds, alongside


def summarise(runs: list[SeedRun]) -> dict:
    """Mean ± sample std over seeds (std 0 for one seed), plus each seed's numbers."""
    val = mean_std([r.val["accuracy"] for r in runs])
    test = mean_std([r.test["accuracy"] for r in runs])
    return {
        "val_accuracy": val["mean"], "val_accuracy_std": val["std"],
        "test_accuracy": test["mean"], "test_accuracy_std": test["std"],
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


def student_stage(stage: str, ctx: StageContext, *, params: dict, tags: dict | None = None,
                  objective_for=None, extra_metrics: dict | None = None, resume_key: tuple = ()) -> dict:
    """The body of the scratch and distill stages: one student per seed → checkpoints, metrics, curves, and
    one MLflow run. `objective_for(student, seed) -> objective.Objective` is the stage's addition to the plain
    recipe (None: cross-entropy). Whatever can fail on bad input is loaded before this is called, so a bad
    teacher or cache fails with nothing logged or written."""
    from kdpipe import tracking
    from kdpipe.train.resume import Resume, run_key

    cfg = ctx.cfg
    resume = Resume.open(stage, cfg.paths.resume, run_key(stage, params, ctx.digest, *resume_key))
    with tracking.stage_run(stage, cfg, tags=ctx.tags(model=cfg.student.model, **(tags or {}))) as run:
        runs = train_seeds(cfg.student, ctx.prepared, ctx.rt, ctx.splits, desc=stage, objective_for=objective_for,
                           on_epoch=lambda row, seed: run.log_epoch(row, prefix=f"seed{seed}/"), resume=resume)
        metrics = write_student_outputs(stage, ctx, runs, params, extra_metrics)
        resume.remove()  # the outputs are written: nothing left to resume
        run.log_metrics({k: metrics[k] for k in ("test_accuracy", "test_accuracy_std", "num_parameters")})
        run.log_metrics({"final_val_accuracy": metrics["val_accuracy"],
                         "final_val_accuracy_std": metrics["val_accuracy_std"]})
        run.log_artifact(ctx.paths.metrics(stage))
        run.log_artifact(ctx.paths.curves(stage))
    print(f"{stage}: {cfg.student.model} test_acc {metrics['test_accuracy']:.4f} ± {metrics['test_accuracy_std']:.4f} "
          f"over seeds {metrics['seeds']}", file=sys.stderr)
    return metrics


def write_student_outputs(stage: str, ctx: StageContext, runs: list[SeedRun], params: dict,
                          extra_metrics: dict | None = None) -> dict:
    """Checkpoints per seed, the metrics JSON and the curves CSV; returns the metrics."""
    from kdpipe.files import save_torch, write_csv, write_json
    from kdpipe.models.checkpoint import save_checkpoint
    from kdpipe.models.zoo import count_parameters

    for r in runs:
        save_checkpoint(ctx.paths.student(stage, r.seed), r.model, classes=ctx.prepared["classes"], params=params,
                        extra={"seed": r.seed, "dataset_digest": ctx.digest})
        if r.alongside:  # beside the student, not inside it: a CRD bank holds an embedding per training image
            save_torch(ctx.paths.alongside(stage, r.seed), {"modules": r.alongside, "seed": r.seed,
                                                           "dataset_digest": ctx.digest, "params": params})
    metrics = {**summarise(runs), "model": ctx.cfg.student.model, "num_parameters": count_parameters(runs[0].model),
               **(extra_metrics or {}), "precision": ctx.rt.precision, "reproducible": ctx.rt.reproducible,
               "dataset_digest": ctx.digest,
               "params": params}
    write_json(ctx.paths.metrics(stage), metrics)
    write_csv(ctx.paths.curves(stage), mean_curves(runs))
    return metrics
