"""evaluate: teacher, scratch student and distilled student side by side on the test split, and the choice of
the distilled seed to ship.

Per model: top-1 (top-5 with ≥ 10 classes), macro-F1, classification report, confusion matrix, parameters,
MACs per image and PyTorch CPU latency per image; students as mean ± std over their seeds. Headline:
gap_recovered = (distilled − scratch) / (teacher − scratch). The seed to ship (`shipped`) is chosen on the
validation split alone, by `choose_seed`; the export stage exports that seed. Nothing here trains.

Evidence (kdpipe/evidence.py): every model's test and validation logits are kept (models/predictions.npz), and
from them the paired comparisons (distilled vs scratch, each student vs the teacher: a two-level bootstrap over
seeds and test images, an exact McNemar test per seed pair), gap_recovered's interval, fidelity to the teacher,
calibration (ECE, NLL, Brier, the temperature fitted on validation) and the per-class changes; then the verdict,
one line, at the top of the report, at the end of the stage's output and in evaluate.json.
Outputs: metrics/evaluate.json, models/predictions.npz, reports/evaluate/ (evaluate.md with its PNGs, the
confusion and reliability CSVs that dvc.yaml declares as plots).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from kdpipe.config import Config

if TYPE_CHECKING:
    from kdpipe.run.stage import StageContext

STAGE = "evaluate"
OUTPUTS = ("metrics", "reports", "models")  # the paths.* folders it writes (predictions.npz), checked first
REPORT = "evaluate.md"  # inside reports/evaluate/
STUDENT_STAGES = {"scratch": "scratch", "distilled": "distill"}  # report label → stage that trained it


def load_models(ctx: StageContext) -> dict[str, list]:
    """label → [(seed or None, model)], each checkpoint checked against the prepared data. An ensemble teacher
    adds its members (by seed) and the ensemble itself (averaged logits) as rows of their own."""
    from kdpipe.models.checkpoint import ensemble_members, load_trained
    from kdpipe.models.zoo import Ensemble

    paths, digest = ctx.paths, ctx.digest
    teacher, ckpt = load_trained(paths.teacher, digest, stage="teacher")
    found = {"teacher": [(None, teacher)]}
    members = ensemble_members(teacher, ckpt)
    if len(members) > 1:
        seeds = [ctx.cfg.seed] + [int(m["seed"]) for m in ckpt["ensemble"]]
        found["teacher members"] = list(zip(seeds, members, strict=True))
        found["teacher ensemble"] = [(None, Ensemble(members))]
    for label, stage in STUDENT_STAGES.items():
        found[label] = [(seed, load_trained(paths.student(stage, seed), digest, stage=stage)[0])
                        for seed in ctx.cfg.student.seeds]
    return found


def choose_seed(val_scores: dict[int, dict]) -> dict:
    """The distilled seed to ship, from `val_scores`: seed → inference.score on the validation split.

    Best validation accuracy; ties (common on small validation splits) go to the lower validation loss, then
    to the lower seed. The test split never chooses. Returns {seed, rule, val_accuracy, tied_seeds, val_loss},
    val_loss holding the tied seeds' losses when the tie needed them.
    """
    best = max(score["accuracy"] for score in val_scores.values())
    tied = sorted(seed for seed, score in val_scores.items() if score["accuracy"] == best)
    losses = {seed: val_scores[seed]["loss"] for seed in tied} if len(tied) > 1 else {}
    seed = min(tied, key=lambda s: (losses.get(s, 0.0), s))
    rule = "best validation accuracy" + (", tie broken by validation loss" if losses else "")
    return {"seed": seed, "rule": rule, "val_accuracy": best, "tied_seeds": tied,
            "val_loss": {str(s): v for s, v in losses.items()}}


def model_logits(ctx: StageContext, models: dict[str, list]) -> dict[str, list[tuple]]:
    """label → [(seed, {"test": logits, "val": logits})]: each model's fp32 logits (torch, on the host) on the
    test and validation splits, computed once for every figure below."""
    from kdpipe.train.inference import predict

    def both(model) -> dict:
        model = ctx.rt.prepare(model)
        return {split: predict(model, ctx.prepared[f"{split}_x"], ctx.rt) for split in ("test", "val")}

    return {label: [(seed, both(model)) for seed, model in runs] for label, runs in models.items()}


def shipped_seed(ctx: StageContext, distilled: list[tuple]) -> dict:
    """choose_seed over the distilled students' validation logits, scored as the distill stage scored them when
    it trained them (inference.score: mean cross-entropy and accuracy), so the choice matches distill.json."""
    from kdpipe.distill.losses import cross_entropy

    val_y = ctx.prepared["val_y"].cpu()
    return choose_seed({seed: {"loss": cross_entropy(out["val"], val_y).item(),
                               "accuracy": (out["val"].argmax(1) == val_y).float().mean().item()}
                        for seed, out in distilled})


def score_logits(logits, prepared: dict) -> dict:
    """Test-split metrics of one model's test logits (no cost figures)."""
    from kdpipe.metrics import classification_metrics

    return classification_metrics(logits, prepared["test_y"], prepared["classes"])


def array_name(label: str) -> str:
    """A model label as a predictions.npz key part: "teacher members" → "teacher_members"."""
    return label.replace(" ", "_")


def write_predictions(ctx: StageContext, logits: dict[str, list[tuple]]) -> dict:
    """models/predictions.npz: labels, classes, seeds, and per model and split the logits stacked over seeds,
    `<split>_logits_<label>` (S, N, K) float32 with `<label>_seeds` (S,) (-1 for a model trained once). Returns
    the arrays written: what findings.load_predictions reads back from the file."""
    import numpy as np

    from kdpipe.files import write_npz

    prepared = ctx.prepared
    arrays = {"test_labels": prepared["test_y"].numpy(), "val_labels": prepared["val_y"].numpy(),
              "classes": np.array(list(prepared["classes"]), dtype=str)}
    for label, runs in logits.items():
        arrays[f"{array_name(label)}_seeds"] = np.array([-1 if s is None else s for s, _ in runs], dtype=np.int64)
        for split in ("test", "val"):
            arrays[f"{split}_logits_{array_name(label)}"] = np.stack([out[split].numpy() for _, out in runs])
    write_npz(ctx.paths.predictions, arrays)
    return arrays


def cost(model, shape, example=None) -> dict:
    """Size and speed of one model: parameters, MACs per image (or per `example`: a typical text's ids), PyTorch
    CPU ms per image (text)."""
    from kdpipe.metrics import count_macs, cpu_latency_ms
    from kdpipe.models.zoo import count_parameters

    return {"model": model.name, "num_parameters": count_parameters(model),
            "macs": count_macs(model, shape, example=example),
            "latency_ms": cpu_latency_ms(model, shape, batch_size=1, example=example)}


def typical_text(prepared: dict):
    """The ids (1, L) of the test text of median length: what a text model's cost is measured on."""
    import torch

    lengths = prepared["test_lengths"]
    i = int(torch.argsort(lengths, stable=True)[len(lengths) // 2])
    return prepared["test_x"][i : i + 1, : int(lengths[i])].long()


def summarise(scored: list[tuple], costs: dict) -> dict:
    """One row of evaluate.json: a single model's numbers, or mean ± std over a student's seeds."""
    from kdpipe.metrics import mean_std

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


def write_report(ctx: StageContext, results: dict, scored: dict) -> Path:
    """reports/evaluate/evaluate.md: the verdict, the headline table, the evidence, classification reports,
    confusion matrices, reliability diagrams and curves."""
    from kdpipe.files import write_text
    from kdpipe.report.evidence_text import evidence_sections
    from kdpipe.report.markdown import evaluate_table, markdown_report
    from kdpipe.report.plots import confusion_csv, confusion_png, curves_png, reliability_csv, reliability_png

    cfg, prepared, reports, evidence = ctx.cfg, ctx.prepared, ctx.paths.reports(STAGE), results["evidence"]
    images, sections = {}, {}
    for label, runs in scored.items():
        seed, metrics = runs[0]
        which = f"{label} (seed {seed})" if seed is not None else label
        name = label.replace(" ", "_")
        png = confusion_png(metrics["confusion"], prepared["classes"], reports / f"confusion_{name}.png",
                            title=f"{which}: test confusion matrix")
        images[f"confusion matrix, {which}"] = png.name
        confusion_csv(metrics["confusion"], prepared["classes"], reports / f"confusion_{name}.csv")  # dvc plots
        sections[f"Classification report: {which}"] = metrics["report_text"]
    for label, calib in evidence["calibration"].items():
        title = f"{label.replace('_', ' ')}: reliability on test (all seeds), ECE {calib['ece'] * 100:.2f} %"
        images[f"reliability diagram, {label}"] = reliability_png(calib["bins"], reports / f"reliability_{label}.png",
                                                                  title=title).name
        reliability_csv(calib["bins"], reports / f"reliability_{label}.csv")  # dvc plots
    curves = {label: _read_curve(ctx.paths.curves(stage)) for label, stage in STUDENT_STAGES.items()}
    images["validation accuracy per epoch (mean over seeds)"] = curves_png(
        curves, reports / "curves_val_accuracy.png", metric="val_accuracy", title="scratch vs distilled").name
    from kdpipe.data.prepared import is_text

    unit = "texts" if is_text(prepared) else "images"
    dataset = f"{cfg.data.dataset} ({len(prepared['test_y'])} test {unit}, student seeds {list(cfg.student.seeds)})"
    text = markdown_report(title="kdpipe evaluation", dataset=dataset, table=evaluate_table(results),
                           gap=results["gap_recovered"], sections=sections, images=images,
                           verdict=evidence["verdict_line"], evidence=evidence_sections(evidence, unit))
    return write_text(reports / REPORT, text)


def _read_curve(path: Path) -> list[dict]:
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


def evaluate(ctx: StageContext, models: dict[str, list]) -> tuple[dict, dict]:
    """(evaluate.json's dict, label → [(seed, test metrics)]) for the loaded models; writes predictions.npz,
    from which the evidence is computed."""
    from kdpipe.data.prepared import is_text
    from kdpipe.metrics import gap_recovered
    from kdpipe.report import findings as evidence

    text = is_text(ctx.prepared)
    cfg, shape = ctx.cfg, () if text else tuple(ctx.prepared["image_shape"])
    example = typical_text(ctx.prepared) if text else None
    logits = model_logits(ctx, models)
    scored = {label: [(seed, score_logits(out["test"], ctx.prepared)) for seed, out in runs]
              for label, runs in logits.items()}
    results = {label: summarise(scored[label], cost(models[label][0][1], shape, example)) for label in models}
    gap = gap_recovered(*(results[k]["test_accuracy"] for k in ("teacher", "scratch", "distilled")))
    shipped = shipped_seed(ctx, logits["distilled"])
    opts = cfg.evaluate
    found = evidence.evaluate_evidence(write_predictions(ctx, logits), shipped["seed"],
                                       samples=opts.bootstrap_samples, seed=opts.bootstrap_seed,
                                       confidence=opts.confidence, bins=opts.calibration_bins)
    results.update(gap_recovered=gap, dataset=cfg.data.dataset, dataset_digest=ctx.digest,
                   reproducible=ctx.rt.reproducible, seeds=list(cfg.student.seeds), method=cfg.distill.method,
                   shipped=shipped, verdict=found["verdict"], verdict_line=found["verdict_line"], evidence=found)
    return results, scored


def evidence_metrics(found: dict) -> dict[str, float]:
    """The evidence's scalars as MLflow metrics: intervals, seed counts, McNemar p range, fidelity, calibration."""
    out = {}
    for key in ("distilled_vs_scratch", "distilled_vs_teacher", "scratch_vs_teacher"):
        pooled, comparison = found[key]["pooled"], found[key]
        out |= {f"{key}/difference": pooled["difference"], f"{key}/ci_low": pooled["low"],
                f"{key}/ci_high": pooled["high"], f"{key}/seeds_better": comparison["better"],
                f"{key}/mcnemar_p_max": comparison["p_max"], f"{key}/mcnemar_p_min": comparison["p_min"]}
    gap = found["gap_recovered"]
    out |= {f"gap_recovered/{k}": gap[k] for k in ("low", "high") if gap[k] == gap[k]}  # NaN: no interval
    for name, fid in found["fidelity"].items():
        out |= {f"fidelity/{name}/agreement": fid["agreement"], f"fidelity/{name}/kl": fid["kl"]}
    for name, cal in found["calibration"].items():
        out |= {f"calibration/{name}/{k}": cal[k] for k in ("ece", "nll", "brier", "temperature", "ece_at_temperature")}
    out["verdict_helped"] = {"helped": 1.0, "no evidence": 0.0, "hurt": -1.0}[found["verdict"]]
    return out


def run(cfg: Config) -> dict:
    """Load and check every model → logits → score, cost, evidence → choose the seed to ship → metrics, report,
    MLflow; the verdict is the last line of the stage's output."""
    from kdpipe import tracking
    from kdpipe.files import write_json
    from kdpipe.run.stage import start

    ctx = start(cfg, OUTPUTS, exact=True)  # fp32: the scores of the weights that ship (ONNX)
    models = load_models(ctx)
    results, scored = evaluate(ctx, models)
    with tracking.stage_run(STAGE, cfg, tags=ctx.tags()) as run:
        write_json(ctx.paths.metrics(STAGE), results)
        report = write_report(ctx, results, scored)
        for label in models:
            numbers = {k: v for k, v in results[label].items() if isinstance(v, int | float)}
            run.log_metrics(numbers, prefix=f"{label}/")
        if results["gap_recovered"] is not None:
            run.log_metrics({"gap_recovered": results["gap_recovered"]})
        run.log_metrics(evidence_metrics(results["evidence"]), prefix="evidence/")
        run.set_tags({"verdict": results["verdict"], "verdict_line": results["verdict_line"][:5000]})
        for path in sorted(report.parent.glob("*")):
            run.log_artifact(path, artifact_path="report")
        run.log_artifact(ctx.paths.metrics(STAGE))
        run.log_artifact(ctx.paths.predictions)
    print(report.read_text().split("## ", 2)[1].strip(), file=sys.stderr)  # the headline table, in the log
    print(f"evaluate: {results['verdict_line']}", file=sys.stderr)
    return results


def main(argv: list[str] | None = None) -> int:
    """python -m kdpipe.stages.evaluate [--params FILE]; exit 2 with one line on a user error."""
    from kdpipe.run.stage import run_stage

    return run_stage(STAGE, run, argv)


if __name__ == "__main__":
    from kdpipe.run.stage import exit_now

    exit_now(main())
