"""scratch: the student trained with plain cross-entropy — the "before" of the comparison.

Exactly the distilled student's recipe (student.* params: epochs, optimizer, schedule, augmentation,
seeds) with no teacher, so the gap between the two is the effect of distillation alone.
"""

from __future__ import annotations

from kdpipe.config import Config

STAGE = "scratch"
OUTPUTS = ("models", "metrics", "plots")  # the paths.* folders it writes, checked before any work


def run(cfg: Config) -> dict:
    from kdpipe import tracking
    from kdpipe.run import stage
    from kdpipe.train import students

    ctx = stage.start(cfg, OUTPUTS)
    params = {"seed": cfg.seed, "data": cfg.data.model_dump(mode="json"), "runtime": cfg.runtime.model_dump(mode="json"),
              "student": cfg.student.model_dump(mode="json")}
    metrics = students.student_stage(STAGE, ctx, params=params, tags={"method": "ce"})
    tracking.record_checkpoints([ctx.paths.student(STAGE, seed) for seed in cfg.student.seeds])  # lineage
    return metrics


def main(argv: list[str] | None = None) -> int:
    from kdpipe.run.stage import run_stage

    return run_stage(STAGE, run, argv)


if __name__ == "__main__":
    from kdpipe.run.stage import exit_now

    exit_now(main())
