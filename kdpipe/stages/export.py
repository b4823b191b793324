"""export: the shipped student and the teacher as ONNX, checked against PyTorch, timed, quantised, registered.

The student to ship is the distill seed the evaluate stage chose (`shipped` in metrics/evaluate.json: best
validation accuracy; the test split never chooses). Both models are exported (self-contained, dynamic batch,
float32 [0, 1] NCHW input, provenance in the metadata; a text model takes input_ids and attention_mask with a
dynamic sequence too, and carries the prepared tokenizer.json: kdpipe/ship/feeds.py) into a staging folder and
compared with PyTorch on the whole test split; if either fails parity the stage fails (exit 1, one line) with nothing moved into place and
nothing registered, and its MLflow run is marked FAILED. Then: onnxruntime CPU latency at batch 1 and 64, the
scratch student's latency and validation accuracy (the trade-off plot; the gate's baseline), int8 (static for
images, dynamic for text), and, with export.registry, a registry version of each model (a text model as a
pyfunc that takes raw strings) under the candidate/champion rule of kdpipe/ship/gate.py
(validation accuracy decides; export.promote: auto moves champion only outside a `dvc exp run`). The run is
tagged with the teacher, scratch and distill runs whose checkpoints it shipped (`teacher_run`, ...).

Outputs: models/student.onnx, models/teacher.onnx, models/int8/student.int8.onnx (with export.int8),
metrics/export.json, reports/export/ (report.md, tradeoff.png). Registry versions are a side effect DVC cannot see.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from kdpipe.config import Config

if TYPE_CHECKING:
    from kdpipe.run.stage import StageContext
    from kdpipe.ship.shipping import Models, Shipment

STAGE = "export"
OUTPUTS = ("models", "metrics", "reports")  # the paths.* folders it writes, checked before any work
REPORT, TRADEOFF = "report.md", "tradeoff.png"  # inside reports/export/


def run(cfg: Config) -> dict:
    """Inputs checked → ONNX exported and checked → measured → placed → registered → metrics, report, MLflow."""
    from kdpipe import tracking
    from kdpipe.data.prepared import tokenizer_file
    from kdpipe.files import write_json
    from kdpipe.run.stage import start
    from kdpipe.ship import shipping
    from kdpipe.ship.feeds import feed_for

    ctx = start(cfg, OUTPUTS, exact=True)  # it trains nothing: its PyTorch side is the fp32 reference
    feed = feed_for(ctx.prepared, tokenizer_file(ctx.paths.dataset))  # images or token ids
    models, evaluated = load_inputs(ctx)
    git = tracking.git_facts()
    with tracking.stage_run(STAGE, cfg, tags=ctx.tags(student_seed=models.seed, method=cfg.distill.method)) as run:
        if run.reaped:  # an export killed mid-way (SIGKILL): its registry versions say so
            from kdpipe.ship.registrations import tag_orphans

            orphans = tag_orphans(run.reaped, run.run_id)
            print(f"export: marked {len(run.reaped)} dead export run(s) KILLED; registry versions they left, tagged "
                  f"orphan: {', '.join(orphans) or 'none'}", file=sys.stderr)
        with shipping.staging(ctx.paths) as folder:
            exported = shipping.export_checked(cfg, ctx.prepared, models, ctx.paths, folder, git, feed)
            run.log_metrics(shipping.parity_metrics(exported))  # before the check: a FAILED run shows why
            shipping.require_parity(exported, cfg.export)
            measured = shipping.measure(cfg, models, exported, ctx.paths, folder, feed)
            shipment = shipping.place(measured, ctx.paths)
        lineage = shipped_from(ctx, models, run)  # run ids: MLflow tags, not DVC metrics (they differ every run)
        metrics = export_metrics(ctx, models, evaluated["shipped"], shipment)
        if cfg.export.registry:
            metrics = with_registry(metrics, register(ctx, models, shipment, metrics, git, lineage, feed))
        write_json(ctx.paths.metrics(STAGE), metrics)
        report = write_report(ctx, metrics, shipment, evaluated)
        log_outputs(run, metrics, report, ctx.paths.metrics(STAGE))
    print(summary(metrics), file=sys.stderr)
    return metrics


def load_inputs(ctx: StageContext) -> tuple[Models, dict]:
    """(shipping.Models, evaluate.json's dict): the seed the evaluate stage chose, its distilled and scratch
    students and the teacher, each checked against the prepared data before any work."""
    from kdpipe.models.checkpoint import load_trained
    from kdpipe.ship.shipping import Models

    evaluated = read_evaluated(ctx)
    seed, paths, digest = evaluated["shipped"]["seed"], ctx.paths, ctx.digest
    teacher, teacher_ckpt = load_trained(paths.teacher, digest, stage="teacher")
    student, student_ckpt = load_trained(paths.student("distill", seed), digest, stage="distill")
    scratch, _ = load_trained(paths.student("scratch", seed), digest, stage="scratch")
    if ctx.cfg.export.temperature_scale:
        from kdpipe.ship.shipping import TemperatureScaled

        student = TemperatureScaled(student, shipped_temperature(evaluated, seed))
    return Models(teacher, teacher_ckpt, student, student_ckpt, scratch, seed), evaluated


def shipped_temperature(evaluated: dict, seed: int) -> float:
    """The temperature evaluate fitted on validation for distilled seed `seed` (its calibration evidence)."""
    calibration = evaluated["evidence"]["calibration"]["distilled"]
    return calibration["per_seed"][evaluated["evidence"]["seeds"].index(seed)]["temperature"]


def read_evaluated(ctx: StageContext) -> dict:
    """metrics/evaluate.json, made on this dataset for these seeds; CheckpointError (a user error) otherwise."""
    from kdpipe.models.checkpoint import CheckpointError, require_same_data

    path, rerun = ctx.paths.metrics("evaluate"), "rerun the evaluate stage (dvc repro evaluate)"
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; run the evaluate stage first (dvc repro evaluate)")
    evaluated = json.loads(path.read_text())
    require_same_data(path, evaluated.get("dataset_digest"), ctx.digest, stage="evaluate")
    if evaluated.get("seeds") != list(ctx.cfg.student.seeds) or "shipped" not in evaluated:
        raise CheckpointError(f"{path}: has seeds {evaluated.get('seeds')} and shipped seed "
                              f"{evaluated.get('shipped', {}).get('seed')}, params say seeds "
                              f"{list(ctx.cfg.student.seeds)}; {rerun}")
    return evaluated


def shipped_from(ctx: StageContext, models: Models, run) -> dict[str, str]:
    """The lineage, also the export run's tags: the teacher, scratch and distill runs that wrote the checkpoints
    shipped (found by their md5: tracking.source_runs), this run, and the sha256 of the dvc.lock it started from
    (the upstream stages' entries; export's own is written after it; "none" outside a DVC workspace)."""
    import hashlib

    from kdpipe import tracking

    files = {"teacher": ctx.paths.teacher, "scratch": ctx.paths.student("scratch", models.seed),
             "distill": ctx.paths.student("distill", models.seed)}
    lock = Path("dvc.lock")
    lineage = {f"{stage}_run": run_id for stage, run_id in tracking.source_runs(ctx.cfg, files).items()}
    lineage |= {"export_run": run.run_id,
                "dvc_lock_sha256": hashlib.sha256(lock.read_bytes()).hexdigest() if lock.is_file() else "none"}
    run.set_tags(lineage)
    return lineage


def register(ctx: StageContext, models: Models, shipment: Shipment, metrics: dict, git: dict,
             lineage: dict[str, str], feed) -> dict:
    """Registry versions of the shipped files (int8 only within export.int8_max_accuracy_drop on validation),
    gated on validation accuracy against the validation split's chance level, promoted as export.promote says."""
    from kdpipe.metrics import chance_accuracy
    from kdpipe.ship.gate import promotion
    from kdpipe.ship.registrations import Release
    from kdpipe.ship.registrations import register as register_versions

    release = Release(ctx.cfg, ctx.digest, git["git_commit"], models, shipment,
                      chance_accuracy(ctx.prepared["val_y"]), promotion(ctx.cfg.export.promote), lineage, feed=feed)
    return register_versions(release, ctx.paths.teacher, int8=metrics["int8_registrable"])


def export_metrics(ctx: StageContext, models: Models, shipped: dict, shipment: Shipment) -> dict:
    """metrics/export.json without the registry fields (added once registration ran)."""
    cfg, drop, val_drop = ctx.cfg, shipment.int8_drop, shipment.int8_val_drop
    teacher, student, scratch, int8 = shipment.teacher, shipment.student, shipment.scratch, shipment.int8
    return {
        "student_seed": models.seed, "seed_choice": shipped, "student_model": models.student.name,
        "teacher_model": models.teacher.name,
        "parity_max_abs_diff": student.parity["parity_max_abs_diff"],
        "parity_max_rel_diff": student.parity["parity_max_rel_diff"],
        "argmax_agreement": student.parity["argmax_agreement"],
        "teacher_parity_max_abs_diff": teacher.parity["parity_max_abs_diff"],
        "teacher_argmax_agreement": teacher.parity["argmax_agreement"],
        "student_onnx_accuracy": student.accuracy, "teacher_onnx_accuracy": teacher.accuracy,
        "student_latency_ms_b1": student.latency.b1, "student_latency_ms_b64": student.latency.b64,
        "teacher_latency_ms_b1": teacher.latency.b1, "teacher_latency_ms_b64": teacher.latency.b64,
        "scratch_latency_ms_b1": scratch.latency.b1, "scratch_latency_ms_b64": scratch.latency.b64,
        "latency_ratio_b1": student.latency.b1 / teacher.latency.b1,
        "latency_ratio_b64": student.latency.b64 / teacher.latency.b64,
        "int8_accuracy": int8 and int8.accuracy, "int8_accuracy_drop": drop,
        "int8_latency_ms_b1": int8 and int8.latency.b1, "int8_latency_ms_b64": int8 and int8.latency.b64,
        "int8_val_accuracy_drop": val_drop, "int8_slower_than_fp32": shipment.int8_slower,
        "int8_registrable": val_drop is not None and val_drop <= cfg.export.int8_max_accuracy_drop,
        "student_onnx_val_accuracy": student.val_accuracy, "scratch_onnx_val_accuracy": scratch.val_accuracy,
        "onnx_bytes": {"scratch": scratch.size_bytes,
                       **{role: result.size_bytes for role, result in shipment.shipped().items()}},
        "latency_threads": cfg.export.latency_threads, **latency_by_length(shipment),
        "registered_version": None, "champion": False, "teacher_registered_version": None,
        "teacher_champion": False, "int8_registered_version": None, "registry": {},
        "dataset_digest": ctx.digest, "reproducible": ctx.rt.reproducible,
        "params": {"seed": cfg.seed, "student_seeds": list(cfg.student.seeds),
                   "distill_method": cfg.distill.method, "export": cfg.export.model_dump(mode="json")},
    }


def latency_by_length(shipment: Shipment) -> dict:
    """A text model's latencies at each length timed ({"student_latency_ms_by_length": {"16": {"b1": ms, "b64": ms},
    ...}, ...}, b1/b64 above being the max_length figures); nothing for images."""
    results = {"teacher": shipment.teacher, "student": shipment.student, "scratch": shipment.scratch,
               "int8": shipment.int8}
    return {f"{role}_latency_ms_by_length": {str(n): ms for n, ms in r.latency.by_length.items()}
            for role, r in results.items() if r is not None and r.latency.by_length}


def with_registry(metrics: dict, registered: dict) -> dict:
    """The metrics with each role's registry version and champion flag filled in."""
    student, teacher, int8 = registered.get("student"), registered.get("teacher"), registered.get("int8")
    return {**metrics, "registered_version": student and student["version"],
            "champion": bool(student and student["champion"]),
            "teacher_registered_version": teacher and teacher["version"],
            "teacher_champion": bool(teacher and teacher["champion"]),
            "int8_registered_version": int8 and int8["version"], "registry": registered}


def write_report(ctx: StageContext, metrics: dict, shipment: Shipment, evaluated: dict) -> Path:
    """reports/export/report.md, with tradeoff.png beside it."""
    from kdpipe.files import write_text
    from kdpipe.report.markdown import export_report, tradeoff_points
    from kdpipe.report.plots import tradeoff_png

    folder = ctx.paths.reports(STAGE)
    png = tradeoff_png(tradeoff_points(metrics, shipment, evaluated), folder / TRADEOFF)
    text = export_report(ctx.cfg, metrics, shipment, evaluated, n_test=len(ctx.prepared["test_y"]), png=png.name)
    return write_text(folder / REPORT, text)


def log_outputs(run, metrics: dict, report: Path, metrics_file: Path) -> None:
    """The numeric metrics, the report folder and metrics/export.json into the stage's MLflow run."""
    run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)})
    run.log_metrics({"champion": float(metrics["champion"])})
    for path in sorted(report.parent.glob("*")):
        run.log_artifact(path, artifact_path="report")
    run.log_artifact(metrics_file)


def summary(m: dict) -> str:
    """The stage's one-line result for the log."""
    registered = (f"registered v{m['registered_version']}{' (champion)' if m['champion'] else ' (candidate)'}"
                  if m["registered_version"] else "not registered")
    int8 = f", int8 {m['int8_accuracy']:.4f}" if m["int8_accuracy"] is not None else ""
    return (f"export: student seed {m['student_seed']} acc {m['student_onnx_accuracy']:.4f}{int8}, parity "
            f"{m['parity_max_abs_diff']:.1e}, {m['student_latency_ms_b1']:.3f} ms vs teacher "
            f"{m['teacher_latency_ms_b1']:.3f} ms at batch 1; {registered}")


def main(argv: list[str] | None = None) -> int:
    """Like every stage, plus: a failed export check (parity, checker, quantisation) is a stage failure,
    reported as one line with exit code 1 (user-input errors keep exit code 2)."""
    from kdpipe.run.stage import run_stage
    from kdpipe.ship.onnx_export import ExportError

    try:
        return run_stage(STAGE, run, argv)
    except ExportError as e:
        print(f"kdpipe {STAGE}: failed: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    from kdpipe.run.stage import exit_now

    exit_now(main())
