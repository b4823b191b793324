"""export: the shipped student and the teacher as ONNX, checked against PyTorch, timed, quantised, registered.

The student to ship is the distill seed with the best VALIDATION accuracy in metrics/distill.json (ties, common
on small validation splits, go to the lower validation loss, then the lower seed); the test split never
chooses. Both models are exported (self-contained, dynamic batch, float32 [0, 1] NCHW input, provenance in the
metadata) into a staging folder and compared with PyTorch on the whole test split; if either fails parity the
stage fails (exit 1, one line) with nothing moved into place and nothing registered, and its MLflow run is
marked FAILED. Then: onnxruntime CPU latency at batch 1 and 64, the scratch student's latency (for the
trade-off plot, exported to a temp dir), static int8, and, with export.registry, a registry version of each
model under the candidate/champion rule of kdpipe/registry.py.

Outputs: models/student.onnx, models/teacher.onnx, models/int8/student.int8.onnx (with export.int8),
metrics/export.json, reports/export/ (report.md, tradeoff.png). Registry versions are a side effect DVC cannot see.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kdpipe.config import Config

STAGE = "export"
# int8 lives in a folder of its own: a DVC output that exists (possibly empty) whether export.int8 is on or off.
FILES = {"teacher": "teacher.onnx", "student": "student.onnx", "int8": "int8/student.int8.onnx"}
EXAMPLE_IMAGES = 4  # test images logged as each registered version's input example
BIG_BATCH = 64


@dataclass
class Inputs:
    """What the earlier stages left for export, checked against the prepared data."""

    teacher: object
    teacher_ckpt: dict
    student: object
    student_ckpt: dict
    scratch: object
    seed: int
    seed_choice: dict
    evaluate: dict


# ---------------------------------------------------------------------------------------------------------
# Inputs


def read_metrics(cfg: Config, stage: str, digest: str) -> dict:
    """metrics/<stage>.json, made on this dataset; CheckpointError (a user error) when missing or stale."""
    from kdpipe.artifacts import CheckpointError

    path = Path(cfg.paths.metrics) / f"{stage}.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; run the {stage} stage first (dvc repro {stage})")
    metrics = json.loads(path.read_text())
    if metrics.get("dataset_digest") not in (None, digest):
        raise CheckpointError(f"{path}: made on another dataset (digest {metrics['dataset_digest'][:12]}, "
                              f"prepared data is {digest[:12]}); rerun the pipeline (dvc repro)")
    return metrics


def load_model(path: Path, digest: str):
    """(model, checkpoint) from a kdpipe checkpoint made on this dataset."""
    from kdpipe.artifacts import CheckpointError, build_from_checkpoint

    if not path.is_file():
        raise CheckpointError(f"{path}: not found; run the stage that writes it first (dvc repro)")
    model, ckpt = build_from_checkpoint(path)
    if ckpt.get("dataset_digest") not in (None, digest):
        raise CheckpointError(f"{path}: made for another dataset (digest {ckpt['dataset_digest'][:12]}, "
                              f"prepared data is {digest[:12]}); rerun the pipeline (dvc repro)")
    return model.cpu().eval(), ckpt


def choose_seed(per_seed: list[dict], val_loss) -> tuple[int, dict]:
    """The seed with the best validation accuracy; ties go to the lower validation loss (`val_loss(seed)`,
    computed only for the tied seeds), then to the lower seed. Returns (seed, how it was chosen)."""
    best = max(row["val_accuracy"] for row in per_seed)
    tied = sorted(row["seed"] for row in per_seed if row["val_accuracy"] == best)
    losses = {seed: val_loss(seed) for seed in tied} if len(tied) > 1 else {}
    seed = min(tied, key=lambda s: (losses.get(s, 0.0), s))
    rule = "best validation accuracy" + (", tie broken by validation loss" if losses else "")
    return seed, {"rule": rule, "val_accuracy": best, "tied_seeds": tied,
                  "val_loss": {str(s): v for s, v in losses.items()}}


def load_inputs(cfg: Config, prepared: dict, rt) -> Inputs:
    """Teacher, the shipped distilled student and its scratch twin; everything checked before any work."""
    from kdpipe.artifacts import CheckpointError
    from kdpipe.engine import Split, evaluate

    digest, models_dir = prepared["digest"], Path(cfg.paths.models)
    distill = read_metrics(cfg, "distill", digest)
    evaluated = read_metrics(cfg, "evaluate", digest)
    per_seed = [row for row in distill.get("per_seed", []) if row["seed"] in cfg.student.seeds]
    if sorted(row["seed"] for row in per_seed) != sorted(cfg.student.seeds):
        raise CheckpointError(f"{cfg.paths.metrics}/distill.json: has seeds {distill.get('seeds')}, params say "
                              f"{list(cfg.student.seeds)}; rerun the distill stage (dvc repro distill)")
    val = Split(prepared["val_x"], prepared["val_y"])

    def val_loss(seed: int) -> float:
        model, _ = load_model(models_dir / "distill" / f"seed{seed}.pt", digest)
        return evaluate(model.to(rt.device), val, rt)["loss"]

    seed, choice = choose_seed(per_seed, val_loss)
    teacher, teacher_ckpt = load_model(models_dir / "teacher.pt", digest)
    student, student_ckpt = load_model(models_dir / "distill" / f"seed{seed}.pt", digest)
    scratch, _ = load_model(models_dir / "scratch" / f"seed{seed}.pt", digest)
    return Inputs(teacher, teacher_ckpt, student, student_ckpt, scratch, seed, choice, evaluated)


# ---------------------------------------------------------------------------------------------------------
# ONNX files


def params_hash(params: dict) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of the params that produced a file."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def metadata(cfg: Config, prepared: dict, model, ckpt: dict, role: str, git: dict, extra: dict) -> dict[str, str]:
    """ONNX metadata_props: what a consumer needs (classes, input) and where the file came from.

    params_hash covers the params the checkpoint carries (the recipe that made the weights) and the opset.
    """
    c, h, w = prepared["image_shape"]
    return {
        "classes": json.dumps(list(prepared["classes"])), "input_size": f"{c}x{h}x{w}",
        "input_format": "float32 (N, C, H, W) in [0, 1] (uint8 / 255); dynamic batch; normalisation inside",
        "role": role, "model": model.name, "dataset": cfg.data.dataset, "dataset_digest": prepared["digest"],
        "params_hash": params_hash({"params": ckpt.get("params", {}), "opset": cfg.export.opset}),
        "git_commit": git["git_commit"], "git_dirty": git["git_dirty"],
        **{k: str(v) for k, v in extra.items()},
    }


@contextmanager
def staging(folder: Path):
    """A hidden temp folder beside the outputs: files are checked there and renamed into place only when
    every check passed (same filesystem, so each rename is atomic)."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=folder) as tmp:
        yield Path(tmp)


def check_parity(model, path: Path, prepared: dict, cfg: Config) -> dict:
    """onnxruntime vs PyTorch on the whole test split (export.parity)."""
    from kdpipe.export import parity

    return parity(model, path, prepared["test_x"], atol=cfg.export.parity_atol,
                  min_agreement=cfg.export.parity_min_agreement)


def parity_failure(role: str, path: Path, result: dict, cfg: Config) -> str:
    """The one line a failed parity check reports: which model, which numbers, which limits."""
    return (f"parity failed for the {role} ({path.name}): max |Δlogit| {result['parity_max_abs_diff']:.3g} "
            f"(limit {cfg.export.parity_atol:g}), argmax agreement {result['argmax_agreement']:.4f} "
            f"(limit {cfg.export.parity_min_agreement:g}) over {result['n_images']} test images; nothing registered")


def latency(path: Path, prepared: dict, cfg: Config) -> dict:
    """onnxruntime CPU ms per session.run at batch 1 and 64 (median after warm-up)."""
    from kdpipe.export import ort_latency_ms

    shape = tuple(prepared["image_shape"])
    return {f"b{n}": ort_latency_ms(path, shape, batch_size=n, repeats=cfg.export.latency_repeats,
                                    threads=cfg.export.latency_threads) for n in (1, BIG_BATCH)}


def calibration_images(prepared: dict, n: int, seed: int):
    """A seeded sample of n train images (all when there are fewer): int8 calibration data."""
    import torch

    order = torch.randperm(len(prepared["train_x"]), generator=torch.Generator().manual_seed(seed))
    return prepared["train_x"][order[:n]]


def export_all(cfg: Config, prepared: dict, inputs: Inputs, folder: Path, git: dict, run) -> dict:
    """Export, check and time everything into `folder`; raises ExportError on a failed parity check."""
    from kdpipe.export import ExportError, export_onnx, onnx_accuracy, quantize_int8

    shape = tuple(prepared["image_shape"])
    test_x, test_y = prepared["test_x"], prepared["test_y"]
    roles = {"teacher": (inputs.teacher, inputs.teacher_ckpt, {"teacher_source": teacher_source(inputs)}),
             "student": (inputs.student, inputs.student_ckpt,
                         {"student_seed": inputs.seed, "method": cfg.distill.method, "teacher": inputs.teacher.name})}
    out: dict = {"paths": {}, "parity": {}, "latency": {}, "accuracy": {}, "bytes": {}, "params_hash": {}}
    for role, (model, ckpt, extra) in roles.items():
        meta = metadata(cfg, prepared, model, ckpt, role, git, extra)
        path = export_onnx(model, folder / FILES[role], shape, opset=cfg.export.opset, metadata=meta)
        out["paths"][role], out["parity"][role] = path, check_parity(model, path, prepared, cfg)
        out["params_hash"][role] = meta["params_hash"]
    run.log_metrics({f"{role}/{k}": v for role, p in out["parity"].items() for k, v in p.items()})
    for role, result in out["parity"].items():
        if not result["passed"]:
            raise ExportError(parity_failure(role, out["paths"][role], result, cfg))
    with tempfile.TemporaryDirectory(prefix="kdpipe-scratch-") as tmp:  # not an output: the plot's third point
        scratch = export_onnx(inputs.scratch, Path(tmp) / "scratch.onnx", shape, opset=cfg.export.opset,
                              metadata={"role": "scratch"})
        out["latency"]["scratch"], out["bytes"]["scratch"] = latency(scratch, prepared, cfg), scratch.stat().st_size
    if cfg.export.int8:
        calibration = calibration_images(prepared, cfg.export.calibration_images, cfg.seed)
        (folder / FILES["int8"]).parent.mkdir(parents=True, exist_ok=True)
        out["paths"]["int8"] = quantize_int8(out["paths"]["student"], folder / FILES["int8"], calibration)
        out["params_hash"]["int8"] = out["params_hash"]["student"]  # the same metadata, copied by quantize_int8
    for role, path in out["paths"].items():
        out["accuracy"][role] = onnx_accuracy(path, test_x, test_y)
        out["latency"][role], out["bytes"][role] = latency(path, prepared, cfg), path.stat().st_size
    return out


def teacher_source(inputs: Inputs) -> str:
    """How the teacher was obtained (train, checkpoint, registry), as its checkpoint records it."""
    return str(inputs.teacher_ckpt.get("params", {}).get("teacher", {}).get("source", "unknown"))


def move_into_place(paths: dict[str, Path], models_dir: Path, int8: bool) -> dict[str, Path]:
    """Checked files from the staging folder to models/; a stale int8 file goes when int8 is off."""
    placed = {}
    (models_dir / FILES["int8"]).parent.mkdir(parents=True, exist_ok=True)
    for role, path in paths.items():
        placed[role] = models_dir / FILES[role]
        os.replace(path, placed[role])
    if not int8:
        (models_dir / FILES["int8"]).unlink(missing_ok=True)
    return placed


# ---------------------------------------------------------------------------------------------------------
# Registry


def register_all(cfg: Config, prepared: dict, inputs: Inputs, result: dict, metrics: dict, git: dict) -> dict:
    """Teacher, student and (within export.int8_max_accuracy_drop) int8 as registry versions, gated."""
    from kdpipe.export import as_float01
    from kdpipe.registry import CHECKPOINT_TAG, Registration, log_checkpoint, register_onnx

    example = as_float01(prepared["test_x"][:EXAMPLE_IMAGES])  # (4, C, H, W) float32 [0, 1]
    common = {"git_commit": git["git_commit"], "dataset": cfg.data.dataset, "opset": cfg.export.opset,
              "method": cfg.distill.method}
    paths, lat, acc = result["paths"], result["latency"], result["accuracy"]

    def entry(role: str, name: str, artifact: str, tags: dict, description: str) -> Registration:
        tags = {**common, "role": role, "params_hash": result["params_hash"][role],
                "latency_ms_b1": f"{lat[role]['b1']:.4f}",
                "latency_ms_b64": f"{lat[role]['b64']:.4f}", **tags}
        return Registration(name=name, onnx_path=paths[role], artifact_name=artifact, test_accuracy=acc[role],
                            dataset_digest=prepared["digest"], tags={k: str(v) for k, v in tags.items()},
                            description=description)

    t, s, method, source = inputs.teacher.name, inputs.student.name, cfg.distill.method, teacher_source(inputs)
    checkpoint = log_checkpoint(Path(cfg.paths.models) / "teacher.pt", artifact_path="teacher_checkpoint")
    registered = {"teacher": register_onnx(entry(
        "teacher", cfg.export.teacher_registered_model, "teacher",
        {"model": t, "teacher_source": source, CHECKPOINT_TAG: checkpoint},
        f"kdpipe teacher {t} (teacher.source: {source}) on {cfg.data.dataset}; the teacher of "
        f"{method} distillation into {s}. The kdpipe checkpoint for reuse (teacher.source: registry) is "
        f"{checkpoint}."), example)}
    student_tags = {"model": s, "student_seed": inputs.seed, "teacher_model": t}
    registered["student"] = register_onnx(entry(
        "student", cfg.export.registered_model, "student", student_tags,
        f"kdpipe student {s} distilled from teacher {t} with method {method} on {cfg.data.dataset} (seed "
        f"{inputs.seed}, chosen by validation accuracy)."), example)
    if metrics["int8_registrable"]:
        registered["int8"] = register_onnx(entry(
            "int8", f"{cfg.export.registered_model}-int8", "student_int8",
            {**student_tags, "quantization": "static int8 (QDQ, MinMax)",
             "int8_accuracy_drop": f"{metrics['int8_accuracy_drop']:.6f}",
             "fp32_version": registered["student"]["version"]},
            f"int8 (static QDQ) of kdpipe student {s} distilled from teacher {t} with method {method} on "
            f"{cfg.data.dataset} (seed {inputs.seed}); fp32 version {registered['student']['version']}."), example)
    return registered


# ---------------------------------------------------------------------------------------------------------
# Metrics and report


def export_metrics(cfg: Config, prepared: dict, inputs: Inputs, result: dict) -> dict:
    """metrics/export.json without the registry fields (added once registration ran)."""
    lat, acc, par = result["latency"], result["accuracy"], result["parity"]
    int8 = "int8" in acc
    drop = acc["student"] - acc["int8"] if int8 else None
    return {
        "student_seed": inputs.seed, "seed_choice": inputs.seed_choice, "student_model": inputs.student.name,
        "teacher_model": inputs.teacher.name,
        "parity_max_abs_diff": par["student"]["parity_max_abs_diff"],
        "parity_max_rel_diff": par["student"]["parity_max_rel_diff"],
        "argmax_agreement": par["student"]["argmax_agreement"],
        "teacher_parity_max_abs_diff": par["teacher"]["parity_max_abs_diff"],
        "teacher_argmax_agreement": par["teacher"]["argmax_agreement"],
        "student_onnx_accuracy": acc["student"], "teacher_onnx_accuracy": acc["teacher"],
        "student_latency_ms_b1": lat["student"]["b1"], "student_latency_ms_b64": lat["student"]["b64"],
        "teacher_latency_ms_b1": lat["teacher"]["b1"], "teacher_latency_ms_b64": lat["teacher"]["b64"],
        "scratch_latency_ms_b1": lat["scratch"]["b1"], "scratch_latency_ms_b64": lat["scratch"]["b64"],
        "latency_ratio_b1": lat["student"]["b1"] / lat["teacher"]["b1"],
        "latency_ratio_b64": lat["student"]["b64"] / lat["teacher"]["b64"],
        "int8_accuracy": acc.get("int8"), "int8_accuracy_drop": drop,
        "int8_latency_ms_b1": lat["int8"]["b1"] if int8 else None,
        "int8_latency_ms_b64": lat["int8"]["b64"] if int8 else None,
        "int8_registrable": bool(int8 and drop <= cfg.export.int8_max_accuracy_drop),
        "onnx_bytes": result["bytes"], "latency_threads": cfg.export.latency_threads,
        "registered_version": None, "champion": False, "teacher_registered_version": None,
        "teacher_champion": False, "int8_registered_version": None, "registry": {},
        "dataset_digest": prepared["digest"],
        "params": {"seed": cfg.seed, "student_seeds": list(cfg.student.seeds), "distill_method": cfg.distill.method,
                   "export": cfg.export.model_dump(mode="json")},
    }


def with_registry(metrics: dict, registered: dict) -> dict:
    student, teacher, int8 = registered.get("student"), registered.get("teacher"), registered.get("int8")
    return {**metrics, "registered_version": student and student["version"],
            "champion": bool(student and student["champion"]),
            "teacher_registered_version": teacher and teacher["version"],
            "teacher_champion": bool(teacher and teacher["champion"]),
            "int8_registered_version": int8 and int8["version"], "registry": registered}


def tradeoff_points(inputs: Inputs, metrics: dict, result: dict) -> list[dict]:
    """(label, batch-1 ms, test accuracy, ONNX bytes) per model; scratch is the mean over seeds (evaluate)."""
    lat, acc, size = result["latency"], result["accuracy"], result["bytes"]
    scratch = inputs.evaluate["scratch"]
    n = len(scratch.get("per_seed", [])) or 1
    points = [
        {"label": f"teacher ({inputs.teacher.name})", "ms": lat["teacher"]["b1"], "acc": acc["teacher"],
         "bytes": size["teacher"]},
        {"label": f"scratch student (mean of {n} seeds)", "ms": lat["scratch"]["b1"],
         "acc": scratch["test_accuracy"], "bytes": size["scratch"]},
        {"label": f"distilled student (seed {inputs.seed})", "ms": lat["student"]["b1"], "acc": acc["student"],
         "bytes": size["student"]},
    ]
    if "int8" in acc:
        points.append({"label": "int8 distilled student", "ms": lat["int8"]["b1"], "acc": acc["int8"],
                       "bytes": size["int8"]})
    return points


def tradeoff_png(points: list[dict], path: Path) -> Path:
    """Test accuracy against onnxruntime batch-1 latency; marker area ∝ ONNX file size."""
    from kdpipe.evaluate import pyplot, save_figure

    biggest = max(p["bytes"] for p in points)
    fig, ax = pyplot().subplots(figsize=(7.5, 5))
    for p in points:  # labelled in the legend: near-identical points (fp32 vs int8) would overlap as text
        ax.scatter(p["ms"], p["acc"] * 100, s=40 + 1500 * p["bytes"] / biggest, alpha=0.55, edgecolors="black",
                   label=f"{p['label']}: {p['acc'] * 100:.2f} %, {p['ms']:.3f} ms, {p['bytes'] / 1024:.0f} KiB")
    times = [p["ms"] for p in points]
    log_x = max(times) / min(times) > 10  # a log axis only when the latencies span more than a decade
    if log_x:
        ax.set_xscale("log")
    ax.set(xlabel=f"onnxruntime CPU latency, batch 1 (ms{', log scale' if log_x else ''})", ylabel="test accuracy (%)",
           title="accuracy vs latency (marker area ∝ ONNX file size)")
    ax.margins(x=0.2, y=0.25)
    ax.grid(alpha=0.3)
    legend = ax.legend(fontsize=8, loc="best")
    for handle in legend.legend_handles:
        handle.set_sizes([50])  # same-size legend markers; the axes show the sizes
    return save_figure(fig, path)


def headline(evaluated: dict) -> str:
    """The evaluate stage's headline table, rebuilt from metrics/evaluate.json (a declared dependency)."""
    from kdpipe.evaluate import gap_line, headline_table

    rows = {}
    for label in ("teacher", "scratch", "distilled"):
        row = dict(evaluated[label])
        for key in ("test_accuracy", "macro_f1", "top5_accuracy"):
            if f"{key}_std" in row:
                row[key] = {"mean": row[key], "std": row[f"{key}_std"], "n": len(row["per_seed"])}
        rows[label] = row
    return headline_table(rows) + "\n\n" + gap_line(evaluated.get("gap_recovered"))


def onnx_table(metrics: dict, result: dict, inputs: Inputs, cfg: Config) -> str:
    from kdpipe.evaluate import fmt_number, fmt_percent, markdown_row

    par, lat, acc, size = result["parity"], result["latency"], result["accuracy"], result["bytes"]
    rows = [markdown_row(["model", "file", "KiB", "test acc (ORT)", "max abs logit diff", "argmax agreement",
                          "ms batch 1", "ms batch 64"]), markdown_row(["---", "---"] + ["---:"] * 6)]
    names = {"teacher": f"teacher ({inputs.teacher.name})", "student": f"distilled student (seed {inputs.seed})",
             "int8": "int8 distilled student", "scratch": "scratch student (not shipped; accuracy: PyTorch, mean of seeds)"}
    acc = {**acc, "scratch": inputs.evaluate["scratch"]["test_accuracy"]}
    for role in ("teacher", "student", "int8", "scratch"):
        if role not in lat:
            continue
        p = par.get(role, {})
        rows.append(markdown_row([
            names[role], f"`{cfg.paths.models}/{FILES[role]}`" if role in FILES else "–",
            f"{size[role] / 1024:.0f}", fmt_percent(acc.get(role)), fmt_number(p.get("parity_max_abs_diff"), "{:.2e}"),
            fmt_number(p.get("argmax_agreement"), "{:.4f}"), f"{lat[role]['b1']:.3f}", f"{lat[role]['b64']:.3f}"]))
    return "\n".join(rows)


def registry_lines(metrics: dict, cfg: Config) -> list[str]:
    if not cfg.export.registry:
        return ["Registry off (`export.registry: false`): nothing registered."]
    names = {"teacher": cfg.export.teacher_registered_model, "student": cfg.export.registered_model,
             "int8": f"{cfg.export.registered_model}-int8"}
    lines = [f"- `{names[role]}` version {r['version']}: aliases {', '.join(r['aliases']) or '–'} ({r['reason']})"
             for role, r in metrics["registry"].items()]
    if cfg.export.int8 and not metrics["int8_registrable"]:
        lines.append(f"- int8 not registered: accuracy drop {metrics['int8_accuracy_drop'] * 100:.2f} points > "
                     f"limit {cfg.export.int8_max_accuracy_drop * 100:.2f}")
    return lines


def write_report(cfg: Config, prepared: dict, inputs: Inputs, metrics: dict, result: dict) -> Path:
    """reports/export/report.md (+ tradeoff.png beside it)."""
    from kdpipe.artifacts import write_text

    folder = Path(cfg.paths.reports) / STAGE
    png = tradeoff_png(tradeoff_points(inputs, metrics, result), folder / "tradeoff.png")
    choice = inputs.seed_choice
    int8 = (f"int8: test accuracy {metrics['int8_accuracy'] * 100:.2f} % (drop {metrics['int8_accuracy_drop'] * 100:.2f} "
            f"points, limit {cfg.export.int8_max_accuracy_drop * 100:.2f}), {metrics['int8_latency_ms_b1']:.3f} ms "
            f"at batch 1." if metrics["int8_accuracy"] is not None else "int8: off (`export.int8: false`).")
    parts = [
        "# kdpipe export",
        f"**Dataset:** {cfg.data.dataset} (digest `{prepared['digest'][:12]}`, {len(prepared['test_y'])} test images). "
        f"**Shipped student:** distill seed {inputs.seed} of {list(cfg.student.seeds)} — {choice['rule']} "
        f"({choice['val_accuracy'] * 100:.2f} %); the test split played no part in the choice.",
        "## Headline (evaluate stage, PyTorch)", headline(inputs.evaluate),
        "## ONNX (onnxruntime, CPU)",
        f"Parity over the whole test split: limits max |Δlogit| ≤ {cfg.export.parity_atol:g} and argmax agreement "
        f"≥ {cfg.export.parity_min_agreement:g}. Latency: median of {cfg.export.latency_repeats} runs after warm-up, "
        f"{cfg.export.latency_threads} thread(s), per batch (not per image).",
        onnx_table(metrics, result, inputs, cfg),
        f"Student / teacher latency: {metrics['latency_ratio_b1']:.3f}× at batch 1, "
        f"{metrics['latency_ratio_b64']:.3f}× at batch {BIG_BATCH}. {int8}",
        "## Registry", "\n".join(registry_lines(metrics, cfg)),
        "## Trade-off",
        "Test accuracy against batch-1 latency; marker area ∝ ONNX file size. Teacher, distilled and int8 "
        "accuracies are onnxruntime's on the test split; scratch is the evaluate stage's mean over seeds.",
        f"![accuracy vs latency]({png.name})",
    ]
    return write_text(folder / "report.md", "\n\n".join(parts) + "\n")


# ---------------------------------------------------------------------------------------------------------
# The stage


def run(cfg: Config) -> dict:
    from kdpipe import runtime, tracking
    from kdpipe.artifacts import load_prepared, write_json

    rt = runtime.setup(cfg.seed)
    prepared = load_prepared(cfg.paths.prepared)
    inputs = load_inputs(cfg, prepared, rt)
    git = tracking.git_facts()
    models_dir = Path(cfg.paths.models)
    tags = {"dataset": cfg.data.dataset, "dataset_digest": prepared["digest"], "student_seed": str(inputs.seed),
            "method": cfg.distill.method, **runtime.device_facts(rt)}
    with tracking.stage_run(STAGE, cfg, tags=tags) as run:
        with staging(models_dir) as folder:
            result = export_all(cfg, prepared, inputs, folder, git, run)
            result["paths"] = move_into_place(result["paths"], models_dir, cfg.export.int8)
        metrics = export_metrics(cfg, prepared, inputs, result)
        if cfg.export.registry:
            metrics = with_registry(metrics, register_all(cfg, prepared, inputs, result, metrics, git))
        write_json(Path(cfg.paths.metrics) / f"{STAGE}.json", metrics)
        report = write_report(cfg, prepared, inputs, metrics, result)
        run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)})
        run.log_metrics({"champion": float(metrics["champion"])})
        for path in sorted(report.parent.glob("*")):
            run.log_artifact(path, artifact_path="report")
        run.log_artifact(Path(cfg.paths.metrics) / f"{STAGE}.json")
    print(summary(metrics), file=sys.stderr)
    return metrics


def summary(m: dict) -> str:
    registered = (f"registered v{m['registered_version']}{' (champion)' if m['champion'] else ' (candidate)'}"
                  if m["registered_version"] else "not registered")
    int8 = f", int8 {m['int8_accuracy']:.4f}" if m["int8_accuracy"] is not None else ""
    return (f"export: student seed {m['student_seed']} acc {m['student_onnx_accuracy']:.4f}{int8}, parity "
            f"{m['parity_max_abs_diff']:.1e}, {m['student_latency_ms_b1']:.3f} ms vs teacher "
            f"{m['teacher_latency_ms_b1']:.3f} ms at batch 1; {registered}")


def main(argv: list[str] | None = None) -> int:
    """Like every stage, plus: a failed export check (parity, checker, quantisation) is a stage failure,
    reported as one line with exit code 1 (user-input errors keep exit code 2)."""
    from kdpipe.export import ExportError
    from kdpipe.stagekit import run_stage

    try:
        return run_stage(STAGE, run, argv)
    except ExportError as e:
        print(f"kdpipe {STAGE}: failed: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
