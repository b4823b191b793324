"""distill: the student trained against the frozen teacher with the composite loss of distill.* params.

The teacher comes from models/teacher.pt (trained, or brought with teacher.source: checkpoint). Its
logits over the training split are read from models/teacher_outputs.pt when the student sees
un-augmented images and only logits are needed; otherwise it runs on each augmented batch. With
curriculum.enabled, each epoch draws from the easiest samples first, by the teacher's own loss.
How: kdpipe/train/distiller.py (teacher, cache policy, loss, hint phase), then kdpipe/train/engine.py (the loop).
"""

from __future__ import annotations

import json
from pathlib import Path

from kdpipe.config import Config

STAGE = "distill"
VIEWS_FILE = "teacher_views.pt"  # inside models/distill/, with distill.teacher_views
OUTPUTS = ("models", "metrics", "plots")  # the paths.* folders it writes, checked before any work


def run(cfg: Config) -> dict:
    from kdpipe import tracking
    from kdpipe.files import file_md5  # the same content hash `kdpipe verify` checks outputs with
    from kdpipe.run import stage
    from kdpipe.train import students
    from kdpipe.train.distiller import Distiller

    ctx = stage.start(cfg, OUTPUTS)
    distiller = Distiller.load(cfg, ctx.paths, ctx.prepared, ctx.rt)  # before any run opens or file is written
    views = {}
    if cfg.distill.teacher_views:
        views["views_seconds"] = round(distiller.label_views(ctx.prepared["train_x"]), 2)
        save_views(ctx.paths.students(STAGE) / VIEWS_FILE, distiller.views, ctx.digest, cfg)
    params = {"seed": cfg.seed, "data": cfg.data.model_dump(mode="json"), "runtime": cfg.runtime.model_dump(mode="json"),
              "student": cfg.student.model_dump(mode="json"), "distill": cfg.distill.model_dump(mode="json"),
              "curriculum": cfg.curriculum.model_dump(mode="json"), "teacher_model": cfg.teacher.model}
    tags = {"method": cfg.distill.method, "weights": json.dumps(distiller.weights), "teacher_model": cfg.teacher.model,
            "teacher_outputs": distiller.teacher_outputs,
            "curriculum": cfg.curriculum.ordering if cfg.curriculum.enabled else "off"}
    metrics = students.student_stage(
        STAGE, ctx, params=params, tags=tags,
        objective_for=lambda student, seed: distiller.objective(student, seed, ctx.splits),
        extra_metrics={"method": cfg.distill.method, "weights": distiller.weights,
                       "teacher_outputs": distiller.teacher_outputs, **views},
        resume_key=(file_md5(ctx.paths.teacher),))  # another teacher: another run, not a resumable one
    tracking.record_checkpoints([ctx.paths.student(STAGE, seed) for seed in cfg.student.seeds])  # lineage
    return metrics


def save_views(path: Path, views, digest: str, cfg: Config) -> None:
    """The labelled views beside the students (what they were taught with), with the params that made them."""
    from kdpipe.files import save_torch

    save_torch(path, {**views.state(), "dataset_digest": digest, "seed": cfg.seed,
                      "teacher_views": cfg.distill.teacher_views, "teacher_model": cfg.teacher.model})


def main(argv: list[str] | None = None) -> int:
    from kdpipe.run.stage import run_stage

    return run_stage(STAGE, run, argv)


if __name__ == "__main__":
    from kdpipe.run.stage import exit_now

    exit_now(main())
