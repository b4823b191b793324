"""evaluate: teacher, scratch student and distilled student side by side on the test split.

Per model: top-1 (top-5 with ≥ 10 classes), macro-F1, classification report, confusion matrix, parameters,
MACs per image and PyTorch CPU latency per image; students as mean ± std over their seeds. Headline:
gap_recovered = (distilled − scratch) / (teacher − scratch). Nothing here trains or chooses anything.
Outputs: metrics/evaluate.json, reports/evaluate.md with its PNGs.
"""

from __future__ import annotations

import sys
from pathlib import Path

from kdpipe.config import Config

STAGE = "evaluate"
STUDENT_STAGES = {"scratch": "scratch", "distilled": "distill"}  # report label → stage that trained it


def load_models(cfg: Config) -> dict[str, list]:
    """label → [(seed or None, model)], from the checkpoints the earlier stages wrote."""
    from kdpipe.artifacts import CheckpointError, build_from_checkpoint

    models_dir = Path(cfg.paths.models)
    found = {"teacher": [(None, build_from_checkpoint(models_dir / "teacher.pt")[0])]}
    for label, stage in STUDENT_STAGES.items():
        paths = [models_dir / stage / f"seed{s}.pt" for s in cfg.student.seeds]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise CheckpointError(f"{missing[0]}: not found; run the {stage} stage first (dvc repro {stage})")
        found[label] = [(s, build_from_checkpoint(p)[0]) for s, p in zip(cfg.student.seeds, paths, strict=True)]
    return found


def score_model(model, prepared: dict, rt) -> dict:
    """Test-split metrics of one model (no cost figures)."""
    from kdpipe.engine import predict
    from kdpipe.evaluate import classification_metrics

    logits = predict(model.to(rt.device), prepared["test_x"], rt)
    return classification_metrics(logits, prepared["test_y"], prepared["classes"])


def cost(model, shape) -> dict:
    from kdpipe.evaluate import count_macs, cpu_latency_ms
    from kdpipe.models import count_parameters

    return {"model": model.name, "num_parameters": count_parameters(model), "macs": count_macs(model, shape),
            "latency_ms": cpu_latency_ms(model, shape, batch_size=1)}


def summarise(label: str, scored: list[tuple], costs: dict) -> dict:
    """One row of evaluate.json: a single model's numbers, or mean ± std over a student's seeds."""
    from kdpipe.evaluate import mean_std

    keys = ["test_accuracy", "macro_f1"] + (["top5_accuracy"] if "top5_accuracy" in scored[0][1] else [])
    row = {**costs}
    for key in keys:
        values = [m[key] for _, m in scored]
        if len(scored) == 1 and scored[0][0] is None:
            row[key] = values[0]
        else:
            stats = mean_std(values)
            row[key], row[f"{key}_std"] = stats["mean"], stats["std"]
    if scored[0][0] is not None:
        row["per_seed"] = [{"seed": s, **{k: m[k] for k in keys}} for s, m in scored]
    return row


def write_report(cfg: Config, prepared: dict, results: dict, scored: dict, gap) -> Path:
    """reports/evaluate.md with the headline table, classification reports, confusion matrices, curves."""
    from kdpipe.artifacts import write_text
    from kdpipe.evaluate import confusion_png, curves_png, headline_table, markdown_report

    reports = Path(cfg.paths.reports) / STAGE
    images, sections = {}, {}
    for label, runs in scored.items():
        seed, metrics = runs[0]
        which = f"{label} (seed {seed})" if seed is not None else label
        png = confusion_png(metrics["confusion"], prepared["classes"], reports / f"confusion_{label}.png",
                            title=f"{which}: test confusion matrix")
        images[f"confusion matrix, {which}"] = png.name
        sections[f"Classification report: {which}"] = metrics["report_text"]
    curves = {label: _read_curve(Path(cfg.paths.plots) / f"{stage}.csv") for label, stage in STUDENT_STAGES.items()}
    images["validation accuracy per epoch (mean over seeds)"] = curves_png(
        curves, reports / "curves_val_accuracy.png", metric="val_accuracy", title="scratch vs distilled").name
    table = headline_table({label: _table_row(results[label]) for label in scored})
    text = markdown_report(title="kdpipe evaluation", dataset=f"{cfg.data.dataset} ({len(prepared['test_y'])} test "
                           f"images, student seeds {list(cfg.student.seeds)})", table=table, gap=gap,
                           sections=sections, images=images)
    return write_text(reports / "evaluate.md", text)


def _table_row(row: dict) -> dict:
    out = dict(row)
    for key in ("test_accuracy", "macro_f1", "top5_accuracy"):
        if f"{key}_std" in row:
            out[key] = {"mean": row[key], "std": row[f"{key}_std"], "n": len(row["per_seed"])}
    return out


def _read_curve(path: Path) -> list[dict]:
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


def run(cfg: Config) -> dict:
    from kdpipe import runtime, tracking
    from kdpipe.artifacts import load_prepared, write_json
    from kdpipe.evaluate import gap_recovered

    rt = runtime.setup(cfg.seed)
    prepared = load_prepared(cfg.paths.prepared)
    models = load_models(cfg)
    shape = tuple(prepared["image_shape"])
    scored = {label: [(seed, score_model(m, prepared, rt)) for seed, m in runs] for label, runs in models.items()}
    results = {label: summarise(label, scored[label], cost(models[label][0][1], shape)) for label in models}
    gap = gap_recovered(*(results[k]["test_accuracy"] for k in ("teacher", "scratch", "distilled")))
    results.update(gap_recovered=gap, dataset=cfg.data.dataset, dataset_digest=prepared["digest"],
                   seeds=list(cfg.student.seeds), method=cfg.distill.method)
    with tracking.stage_run(STAGE, cfg, tags={"dataset": cfg.data.dataset, "dataset_digest": prepared["digest"],
                                              **runtime.device_facts(rt)}) as run:
        write_json(Path(cfg.paths.metrics) / "evaluate.json", results)
        report = write_report(cfg, prepared, results, scored, gap)
        for label in models:
            run.log_metrics({k: v for k, v in results[label].items() if isinstance(v, int | float)}, prefix=f"{label}/")
        if gap is not None:
            run.log_metrics({"gap_recovered": gap})
        for path in sorted(report.parent.glob("*")):
            run.log_artifact(path, artifact_path="report")
        run.log_artifact(Path(cfg.paths.metrics) / "evaluate.json")
    print(report.read_text().split("## ", 2)[1].strip(), file=sys.stderr)  # the headline table, in the log
    return results


def main(argv: list[str] | None = None) -> int:
    from kdpipe.stagekit import run_stage

    return run_stage(STAGE, run, argv)


if __name__ == "__main__":
    sys.exit(main())
