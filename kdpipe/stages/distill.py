"""distill: the student trained against the frozen teacher with the composite loss of distill.* params.

The teacher comes from models/teacher.pt (trained, or brought with teacher.source: checkpoint). Its
logits over the training split are read from models/teacher_outputs.pt when the student sees
un-augmented images and only logits are needed; otherwise it runs on each augmented batch. With
curriculum.enabled, each epoch draws from the easiest samples first, by the teacher's own loss.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kdpipe.config import Config

STAGE = "distill"
TEACHER_FILE = "teacher.pt"
TEACHER_OUTPUTS_FILE = "teacher_outputs.pt"


def load_teacher(cfg: Config, prepared: dict, rt):
    """The frozen teacher on the training device, checked against this dataset."""
    from kdpipe.artifacts import CheckpointError, build_from_checkpoint
    from kdpipe.kd import freeze

    path = Path(cfg.paths.models) / TEACHER_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: teacher not found; run the teacher stage first (dvc repro teacher)")
    teacher, ckpt = build_from_checkpoint(path)
    if ckpt.get("dataset_digest") not in (None, prepared["digest"]):
        raise CheckpointError(f"{path}: made for another dataset (digest {ckpt['dataset_digest'][:12]}, "
                              f"prepared data is {prepared['digest'][:12]}); rerun the teacher stage")
    return freeze(teacher.to(rt.device)), ckpt


def load_teacher_outputs(cfg: Config, prepared: dict) -> dict:
    import torch

    from kdpipe.artifacts import CheckpointError

    path = Path(cfg.paths.models) / TEACHER_OUTPUTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; run the teacher stage first (dvc repro teacher)")
    outputs = torch.load(path, map_location="cpu", weights_only=True)
    if outputs["train_logits"].shape[0] != len(prepared["train_y"]):
        raise CheckpointError(f"{path}: {outputs['train_logits'].shape[0]} rows, the train split has "
                              f"{len(prepared['train_y'])}; rerun the teacher stage")
    return outputs


def make_setup(cfg: Config):
    """Returns make_setup(prepared, rt, splits) for run_student_stage: teacher, cache and curriculum loaded once."""

    def prepare_all(prepared: dict, rt, splits):
        from kdpipe import kd
        from kdpipe.students import SeedSetup

        teacher, _ = load_teacher(cfg, prepared, rt)
        weights = cfg.distill.resolved_weights()
        use_cache = kd.can_use_cached_logits(cfg.student, weights)
        outputs = load_teacher_outputs(cfg, prepared) if use_cache or cfg.curriculum.enabled else None
        cached = outputs["train_logits"].to(rt.device) if use_cache else None

        def setup(student, seed: int) -> SeedSetup:
            adapter = kd.make_hint_adapter(student, teacher, cfg.distill)
            extra = [adapter.to(rt.device)] if adapter is not None else []
            if cfg.distill.hint_epochs:
                hint_phase(cfg, student, teacher, adapter, rt, seed, splits)
            loss_fn = kd.distill_loss(cfg.distill, teacher, weights=weights, cached_logits=cached,
                                      hint_adapter=adapter, label_smoothing=cfg.student.label_smoothing)
            pool = (kd.curriculum_pool(cfg.curriculum, outputs["difficulty"], cfg.student.epochs, seed)
                    if cfg.curriculum.enabled else None)
            return SeedSetup(loss_fn=loss_fn, extra_modules=extra, epoch_pool=pool)

        return setup

    return prepare_all


def hint_phase(cfg: Config, student, teacher, adapter, rt, seed: int, splits) -> None:
    """FitNets stage 1 (Romero et al. 2015): train the student up to its guided layer, with the adapter,
    on the hint loss alone, before the full distillation stage."""
    from kdpipe import kd
    from kdpipe.engine import fit

    recipe = cfg.student.model_copy(update={"epochs": cfg.distill.hint_epochs, "patience": 0, "warmup_epochs": 0})
    loss_fn = kd.distill_loss(cfg.distill, teacher, weights={"hint": 1.0}, hint_adapter=adapter)
    train, val, _ = splits
    fit(student, train, val, recipe, rt, seed=seed, loss_fn=loss_fn, extra_modules=[adapter],
        desc=f"{STAGE} hints seed {seed}", restore_best=False)


def run(cfg: Config) -> dict:
    from kdpipe.kd import can_use_cached_logits
    from kdpipe.students import run_student_stage

    weights = cfg.distill.resolved_weights()
    params = {"seed": cfg.seed, "data": cfg.data.model_dump(mode="json"),
              "student": cfg.student.model_dump(mode="json"), "distill": cfg.distill.model_dump(mode="json"),
              "curriculum": cfg.curriculum.model_dump(mode="json"), "teacher_model": cfg.teacher.model}
    cached = can_use_cached_logits(cfg.student, weights)
    tags = {"method": cfg.distill.method, "weights": json.dumps(weights), "teacher_model": cfg.teacher.model,
            "teacher_outputs": "cached" if cached else "live",
            "curriculum": cfg.curriculum.ordering if cfg.curriculum.enabled else "off"}
    return run_student_stage(STAGE, cfg, params=params, tags=tags, make_setup=make_setup(cfg),
                             extra_metrics={"method": cfg.distill.method, "weights": weights,
                                            "teacher_outputs": tags["teacher_outputs"]})


def main(argv: list[str] | None = None) -> int:
    from kdpipe.stagekit import run_stage

    return run_stage(STAGE, run, argv)


if __name__ == "__main__":
    sys.exit(main())
