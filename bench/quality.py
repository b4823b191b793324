"""Fashion-MNIST quality benchmark: does distillation beat the scratch student, by how much, over 3 seeds?

Runs the real stage workers (prepare → teacher → scratch → distill → evaluate) in-process on
bench/quality.yaml, in bench/work/quality/, and writes bench/results/quality.json. With --curriculum it then
reruns distill with the curriculum on (easy→hard, random, hard→easy) over the same teacher and seeds and
writes bench/results/curriculum.json; with --views it distills augmented students from a live teacher and from
the teacher's cached views (K = 4, 8, 16) and writes bench/results/views.json (--views-more-seeds after it: live
and K = 16 with seeds 3-5, compared over six seeds, bench/results/views_six_seeds.json); with --methods it distills
with every method's preset and from an ensemble of 3 teachers and writes bench/results/methods.json; with
--recipes it trains scratch and distilled students under four recipes (augmented or not, 15 or 30 epochs) and
writes bench/results/recipes.json; with --augment it trains scratch and distilled students with the photo
recipe's `resized_crop` against `pad_crop` (3 seeds each, quality.yaml's schedule, the teacher's cached views) and
writes bench/results/augment_quality.json (training the teacher first if quality() has not). `--precision fp32`
runs the benchmark in fp32 (bench/results/quality_fp32.json). `--quick` shrinks everything (1,000 images, one
seed, one epoch) into bench/work/quality_quick/, results untouched: a smoke test of a mode. Run from the repo
root: `make bench-quality` / `make bench-curriculum` / `make bench-augment`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent
WORK = BENCH / "work" / "quality"
RESULTS = BENCH / "results"
QUICK: dict = {}  # --quick: overrides of every config (see QUICK_OVERRIDES), set by main()
QUICK_OVERRIDES = {
    "data": {"train_subset": 1000},
    "teacher": {"model": "small_cnn", "epochs": 2, "ensemble": 1, "warmup_epochs": 0, "patience": 0},
    "student": {"epochs": 3, "batch_size": 32, "seeds": [0], "warmup_epochs": 0},
}


def bench_config(overrides: dict | None = None):
    """bench/quality.yaml with every path under bench/work/quality/."""
    from kdpipe.config import from_dict

    raw = yaml.safe_load((BENCH / "quality.yaml").read_text())
    raw["paths"] = {k: str(WORK / v) for k, v in {"raw": "raw", "downloads": "downloads", "prepared": "prepared",
                    "models": "models", "metrics": "metrics", "plots": "plots", "reports": "reports"}.items()}
    if QUICK:  # a smoke run logs to its own store, not the repo's
        raw["tracking"] = {**raw.get("tracking", {}), "uri": f"sqlite:///{WORK / 'mlflow.db'}"}
    for overrides_now in (QUICK, overrides or {}):
        for section, values in overrides_now.items():
            raw[section] = {**raw.get(section, {}), **values}
    return from_dict(raw)


def timed(label: str, fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    seconds = time.perf_counter() - t0
    print(f"[bench] {label}: {seconds:.0f} s", file=sys.stderr, flush=True)
    return out, seconds


def stats(metrics: dict) -> dict:
    per_seed = [s["test_accuracy"] for s in metrics.get("per_seed", [])] or [metrics["test_accuracy"]]
    return {"mean": metrics["test_accuracy"], "std": metrics.get("test_accuracy_std", 0.0), "n": len(per_seed),
            "values": per_seed, "val_mean": metrics["val_accuracy"]}


def machine() -> dict:
    import torch

    return {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available()}


def quality(overrides: dict | None = None) -> dict:
    from kdpipe.stages import distill, evaluate, prepare, scratch, teacher

    cfg = bench_config(overrides)
    seconds = {}
    for name, stage in (("prepare", prepare), ("teacher", teacher), ("scratch", scratch), ("distill", distill),
                        ("evaluate", evaluate)):
        _, seconds[name] = timed(name, stage.run, cfg)
    metrics = {name: json.loads((WORK / "metrics" / f"{name}.json").read_text())
               for name in ("teacher", "scratch", "distill", "evaluate")}
    result = {
        "dataset": cfg.data.dataset, "train_subset": cfg.data.train_subset, "seeds": list(cfg.student.seeds),
        "teacher_model": cfg.teacher.model, "student_model": cfg.student.model, "method": cfg.distill.method,
        "precision": metrics["distill"]["precision"], "channels_last": cfg.runtime.channels_last,
        "teacher": stats(metrics["teacher"]), "scratch": stats(metrics["scratch"]),
        "distilled": stats(metrics["distill"]), "gap_recovered": metrics["evaluate"]["gap_recovered"],
        "seconds": {k: round(v, 1) for k, v in seconds.items()}, "total_seconds": round(sum(seconds.values()), 1),
        "machine": machine(), "params": cfg.model_dump(mode="json", exclude={"paths", "tracking"}),
    }
    result["evidence"] = evidence_summary(metrics["evaluate"]["evidence"])
    return result


def evidence_summary(found: dict) -> dict:
    """The evaluate stage's evidence as the benchmark reports it: the verdict, each paired difference with its
    interval (points), gap recovered's interval, fidelity and calibration (kdpipe/report/findings.py)."""
    def points(c: dict) -> dict:
        return {k: round(100 * c[k], 3) for k in ("difference", "low", "high")}

    return {"verdict": found["verdict"], "verdict_line": found["verdict_line"], "confidence": found["confidence"],
            "test_images": found["test_images"],
            **{key: {**points(found[key]["pooled"]), "seeds_better": found[key]["better"],
                     "mcnemar_p": [s["mcnemar"]["p"] for s in found[key]["per_seed"]]}
               for key in ("distilled_vs_scratch", "distilled_vs_teacher", "scratch_vs_teacher")},
            "gap_recovered": {k: found["gap_recovered"][k] for k in ("value", "low", "high")},
            "fidelity": {name: {k: f[k] for k in ("agreement", "kl")} for name, f in found["fidelity"].items()},
            "calibration": {name: {k: c[k] for k in ("ece", "nll", "brier", "temperature")}
                            for name, c in found["calibration"].items()}}


def paired_against(predictions: dict, baseline: dict, confidence: float = 0.95) -> dict:
    """A side's distilled students against a baseline side's on the same test images, seed paired with seed
    (kdpipe/report/findings.compare): the difference in points with its two-level interval, seeds better."""
    from kdpipe.evidence import correct
    from kdpipe.report.findings import compare

    labels = predictions["test_labels"]
    found = compare(correct(predictions["test_logits_distilled"], labels),
                    correct(baseline["test_logits_distilled"], labels),
                    [int(s) for s in predictions["distilled_seeds"]], confidence=confidence)
    pooled = found["pooled"]
    return {**{k: round(100 * pooled[k], 3) for k in ("difference", "low", "high")}, "seeds_better": found["better"],
            "seeds_worse": found["worse"], "mcnemar_p": [s["mcnemar"]["p"] for s in found["per_seed"]]}


def curriculum_ablation() -> dict:
    """Distill again with the curriculum on, per ordering; data, teacher and seeds as in quality()."""
    import shutil

    from kdpipe.stages import distill

    if not (WORK / "models" / "teacher_outputs.pt").is_file():
        sys.exit("bench: run the quality benchmark first (it trains the teacher this ablation reuses)")
    result = {"dataset": "fashion_mnist", "off": stats(json.loads((WORK / "metrics" / "distill.json").read_text())),
              "seconds": {}}
    for ordering in ("easy_to_hard", "random", "hard_to_easy"):
        out = WORK / f"curriculum_{ordering}"
        (out / "models").mkdir(parents=True, exist_ok=True)
        for name in ("teacher.pt", "teacher_outputs.pt"):  # the same teacher; its own student checkpoints
            shutil.copy2(WORK / "models" / name, out / "models" / name)
        cfg = bench_config({"curriculum": {"enabled": True, "ordering": ordering},
                            "paths": {"models": str(out / "models"), "metrics": str(out / "metrics"),
                                      "plots": str(out / "plots")}})
        _, result["seconds"][ordering] = timed(f"distill, curriculum {ordering}", distill.run, cfg)
        result[ordering] = stats(json.loads((out / "metrics" / "distill.json").read_text()))
    result["curriculum"] = cfg.curriculum.model_dump(mode="json")
    return result


# The student's augmentation for the views ablation: the teacher's own crop and flip (bench/quality.yaml).
AUGMENTED = {"crop_padding": 2, "flip": True}
VIEW_COUNTS = (4, 8, 16)
NON_INFERIOR_POINTS = -0.3  # views are as good as live when their interval's lower bound is above this


def folder_paths(out: Path) -> dict:
    """paths overrides putting a run's models, metrics, plots and reports under `out`."""
    return {name: str(out / name) for name in ("models", "metrics", "plots", "reports")}


def distill_folder(out: Path, scratch_from: Path) -> dict:
    """folder_paths(out) for a distill + evaluate run on quality()'s teacher, with the scratch students (and their
    curves) of the run in `scratch_from` copied in for evaluate to show."""
    import shutil

    (out / "models").mkdir(parents=True, exist_ok=True)
    shutil.copy2(WORK / "models" / "teacher.pt", out / "models" / "teacher.pt")
    shutil.copytree(scratch_from / "models" / "scratch", out / "models" / "scratch", dirs_exist_ok=True)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    shutil.copy2(scratch_from / "plots" / "scratch.csv", out / "plots" / "scratch.csv")
    return folder_paths(out)


def views_ablation() -> dict:
    """Distill with the student augmented (crop + flip): a live teacher on every batch, then the teacher's
    cached views (FKD) with K = 4, 8, 16 views per image; the teacher and seeds of quality(). Each side is then
    evaluated (its predictions.npz), and each views side compared with live on the same 10,000 test images,
    seed paired with seed: non-inferior when the interval's lower bound is above NON_INFERIOR_POINTS."""
    from kdpipe.report.findings import load_predictions
    from kdpipe.stages import distill, evaluate

    if not (WORK / "models" / "teacher.pt").is_file():
        sys.exit("bench: run the quality benchmark first (it trains the teacher this ablation reuses)")
    result = {"dataset": "fashion_mnist", "student_augmentation": AUGMENTED, "seconds": {},
              "non_inferior_above_points": NON_INFERIOR_POINTS}
    predictions = {}
    for k in (0, *VIEW_COUNTS):
        label = f"views{k}" if k else "live"
        out = WORK / f"views_{label}"
        paths = distill_folder(out, WORK)
        cfg = bench_config({"student": AUGMENTED, "distill": {"teacher_views": k}, "paths": paths})
        _, result["seconds"][label] = timed(f"distill, {label}", distill.run, cfg)
        timed(f"evaluate, {label}", evaluate.run, cfg)
        metrics = json.loads((out / "metrics" / "distill.json").read_text())
        predictions[label] = load_predictions(out / "models" / "predictions.npz")
        result[label] = {**stats(metrics), "views_seconds": metrics.get("views_seconds", 0.0),
                         "precision": metrics["precision"]}
        if k:
            vs = paired_against(predictions[label], predictions["live"])
            result[label]["minus_live_points"] = {**vs, "non_inferior": vs["low"] > NON_INFERIOR_POINTS}
    result["machine"] = machine()
    return result


MORE_SEEDS = (3, 4, 5)  # --views-more-seeds: student seeds beside views.json's 0, 1, 2
MORE_SEEDS_K = 16  # the view count closest to live in views.json


def views_more_seeds() -> dict:
    """views.json's live and K = 16 sides again with student seeds MORE_SEEDS (same teacher, data, recipe and
    views), then each paired comparison over all six seeds: the new runs' predictions beside views.json's (its
    folders' predictions.npz). Scratch students of those seeds are trained first, only because evaluate shows them."""

    import numpy as np

    from kdpipe.report.findings import load_predictions
    from kdpipe.stages import distill, evaluate, scratch

    seeds = {"seeds": list(MORE_SEEDS)}
    tag = f"seeds{MORE_SEEDS[0]}-{MORE_SEEDS[-1]}"
    labels = ("live", f"views{MORE_SEEDS_K}")
    for label in labels:
        if not (WORK / f"views_{label}" / "models" / "predictions.npz").is_file():
            sys.exit(f"bench: run --views first (views_{label}'s predictions are missing)")
    base = WORK / f"scratch_{tag}"
    if not (base / "models" / "scratch" / f"seed{MORE_SEEDS[-1]}.pt").is_file():
        timed(f"scratch, {tag}", scratch.run, bench_config({"student": seeds, "paths": folder_paths(base)}))
    result = {"dataset": "fashion_mnist", "student_augmentation": AUGMENTED, "seconds": {},
              "non_inferior_above_points": NON_INFERIOR_POINTS, "seeds_added": list(MORE_SEEDS)}
    predictions = {}
    for label in labels:
        out = WORK / f"views_{label}_{tag}"
        paths = distill_folder(out, base)
        k = 0 if label == "live" else MORE_SEEDS_K
        cfg = bench_config({"student": {**AUGMENTED, **seeds}, "distill": {"teacher_views": k}, "paths": paths})
        _, result["seconds"][label] = timed(f"distill, {label}, {tag}", distill.run, cfg)
        timed(f"evaluate, {label}, {tag}", evaluate.run, cfg)
        metrics = json.loads((out / "metrics" / "distill.json").read_text())
        result[label] = {**stats(metrics), "precision": metrics["precision"]}
        new, old = load_predictions(out / "models" / "predictions.npz"), load_predictions(
            WORK / f"views_{label}" / "models" / "predictions.npz")
        assert (new["test_labels"] == old["test_labels"]).all()
        predictions[label] = {"test_labels": new["test_labels"],
                              "test_logits_distilled": np.concatenate([old["test_logits_distilled"],
                                                                       new["test_logits_distilled"]]),
                              "distilled_seeds": np.concatenate([old["distilled_seeds"], new["distilled_seeds"]])}
        correct = (predictions[label]["test_logits_distilled"].argmax(-1) == new["test_labels"]).mean(1)
        result[label]["six_seeds_test_accuracy"] = [round(100 * float(c), 2) for c in correct]
    views = labels[1]
    vs = paired_against(predictions[views], predictions["live"])
    result[views]["minus_live_points_six_seeds"] = {**vs, "non_inferior": vs["low"] > NON_INFERIOR_POINTS}
    result["machine"] = machine()
    return result


# Student recipes compared on validation (`--recipes`), each for scratch and the distilled student alike: with
# and without the teacher's crop + flip (a live teacher labels the very view the student sees: consistent
# teaching), 15 or 30 epochs. Early stopping is off in all: the best-val weights are restored anyway, and
# patience 5 stopped one scratch seed at epoch 10 while the cosine learning rate was still high (val 80.8 %).
RECIPES = {
    "plain_15": {"crop_padding": 0, "flip": False, "epochs": 15, "patience": 0},
    "plain_30": {"crop_padding": 0, "flip": False, "epochs": 30, "patience": 0},
    "augmented_15": {"crop_padding": 2, "flip": True, "epochs": 15, "patience": 0},
    "augmented_30": {"crop_padding": 2, "flip": True, "epochs": 30, "patience": 0},
}


def in_own_folder(name: str, files: tuple[str, ...] = ("teacher.pt", "teacher_outputs.pt")) -> dict:
    """paths overrides for a run in bench/work/quality/<name>/ on quality()'s teacher (its files copied there)."""
    import shutil

    out = WORK / name
    (out / "models").mkdir(parents=True, exist_ok=True)
    for file in files:
        shutil.copy2(WORK / "models" / file, out / "models" / file)
    return {"models": str(out / "models"), "metrics": str(out / "metrics"), "plots": str(out / "plots")}


def reuse(paths: dict, cfg) -> float | None:
    """The distill wall time of a finished run in this folder with the same student and distill params, else None."""
    metrics, seconds = Path(paths["metrics"]) / "distill.json", Path(paths["models"]).parent / "seconds.json"
    if not (metrics.is_file() and seconds.is_file()):
        return None
    done = json.loads(metrics.read_text())["params"]
    same = all(done[k] == getattr(cfg, k).model_dump(mode="json") for k in ("student", "distill"))
    return json.loads(seconds.read_text())["seconds"] if same else None


def recipes_ablation() -> dict:
    """Scratch and the distilled student (quality.yaml's method) under each of RECIPES, on quality()'s teacher:
    the recipe with the best distilled validation accuracy is the one to use. Test accuracy is reported, never
    used to choose."""
    from kdpipe.stages import distill, scratch

    if not (WORK / "models" / "teacher_outputs.pt").is_file():
        sys.exit("bench: run the quality benchmark first (it trains the teacher this ablation reuses)")
    result: dict = {"dataset": "fashion_mnist", "recipes": {}}
    for name, recipe in RECIPES.items():
        paths = in_own_folder(f"recipe_{name}")
        cfg = bench_config({"student": recipe, "paths": paths})
        _, scratch_s = timed(f"scratch, {name}", scratch.run, cfg)
        _, distill_s = timed(f"distill, {name}", distill.run, cfg)
        folder = Path(paths["metrics"])
        result["recipes"][name] = {
            "student": recipe, "method": cfg.distill.method,
            "scratch": stats(json.loads((folder / "scratch.json").read_text())),
            "distilled": stats(json.loads((folder / "distill.json").read_text())),
            "seconds": {"scratch": round(scratch_s, 1), "distill": round(distill_s, 1)}}
    result["chosen_on_val"] = max(result["recipes"], key=lambda n: result["recipes"][n]["distilled"]["val_mean"])
    result["machine"] = machine()
    return result


METHODS = ("kd", "dkd", "dist", "fitnet", "at", "rkd", "pkt", "sp", "crd")
# CRD's per-sample negatives are a memory-bound gather of (batch, K + 1, 128) embeddings from each bank: at the
# default K = 4096 an epoch took 27 s here (80 steps), 10x the other methods. K = 512 (5 % of the 10,200 training
# images; the paper's 16,384 is 33 % of CIFAR's 50,000) keeps the table within the CPU budget.
METHOD_PARAMS = {"crd": {"crd_negatives": 512}}
ENSEMBLE = 3  # teachers (seeds 0, 1, 2) of the ensemble row, distilled with quality.yaml's method


def methods_table() -> dict:
    """Distill again with each method's preset, over quality()'s teacher, data, seeds and student recipe, then with
    an ensemble of ENSEMBLE teachers (its own teacher stage) and quality.yaml's method; scratch and the teacher
    from quality(). Validation accuracy alone chooses among them."""
    from kdpipe.stages import distill, teacher

    if not (WORK / "models" / "teacher_outputs.pt").is_file():
        sys.exit("bench: run the quality benchmark first (it trains the teacher this table reuses)")
    read = lambda folder, stage: json.loads((Path(folder) / f"{stage}.json").read_text())  # noqa: E731
    best, scratch = read(WORK / "metrics", "teacher"), stats(read(WORK / "metrics", "scratch"))
    result = {"dataset": "fashion_mnist", "teacher": {"test": best["test_accuracy"], "val": best["val_accuracy"]},
              "scratch": scratch, "methods": {}}
    runs = [(method, {"distill": {"method": method, **METHOD_PARAMS.get(method, {})}}) for method in METHODS]
    runs.append(("ensemble", {"teacher": {"ensemble": ENSEMBLE}}))
    for label, overrides in runs:
        paths = in_own_folder(f"method_{label}", () if label == "ensemble" else ("teacher.pt", "teacher_outputs.pt"))
        cfg = bench_config({**overrides, "paths": paths})
        seconds = 0.0
        if label == "ensemble":
            _, seconds = timed(f"teacher, ensemble of {ENSEMBLE}", teacher.run, cfg)
            members = read(paths["metrics"], "teacher")["ensemble"]
            result["ensemble_teacher"] = {k: members[k] for k in ("size", "val_accuracy", "test_accuracy", "members")}
        distill_s = reuse(paths, cfg)
        if distill_s is None:  # not run yet with these params (a rerun after an interruption skips what is done)
            _, distill_s = timed(f"distill, {label}", distill.run, cfg)
            (Path(paths["models"]).parent / "seconds.json").write_text(json.dumps({"seconds": distill_s}))
        distilled = stats(read(paths["metrics"], "distill"))
        gap = best["test_accuracy"] - scratch["mean"]
        result["methods"][label] = {**distilled, "method": cfg.distill.method, "seconds": round(seconds + distill_s, 1),
                                    "gain_points": 100 * (distilled["mean"] - scratch["mean"]),
                                    "gap_recovered": (distilled["mean"] - scratch["mean"]) / gap if gap else None}
    result["best_on_val"] = max(result["methods"], key=lambda m: result["methods"][m]["val_mean"])
    result["machine"] = machine()
    return result


# --augment: the student's augmentation, for scratch and the distilled student alike. pad_crop as the views
# ablation (crop 2 + flip); resized_crop is the photo recipe's crop (bench/recipes/photos.yaml: 35-100 % of the
# image, ratio 3/4-4/3) + flip, no colour (grey images) and no mixing. The teacher labels AUGMENT_VIEWS cached views
# of each image either way (FKD), so both rows distill from the same kind of teacher outputs.
AUGMENTATIONS = {
    "pad_crop": {"augment": "pad_crop", "crop_padding": 2, "flip": True},
    "resized_crop": {"augment": "resized_crop", "crop_padding": 0, "flip": True, "crop_scale": [0.35, 1.0]},
}
AUGMENT_VIEWS = 8


def ensure_teacher() -> None:
    """quality()'s data and teacher, trained now when quality() has not run in this folder."""
    from kdpipe.stages import prepare, teacher

    if (WORK / "models" / "teacher_outputs.pt").is_file():
        return
    cfg = bench_config()
    for name, stage in (("prepare", prepare), ("teacher", teacher)):
        timed(name, stage.run, cfg)


def augment_table() -> dict:
    """Scratch and distilled students with each of AUGMENTATIONS, quality.yaml's schedule and seeds, on quality()'s
    teacher: mean ± std test accuracy per row, the paired distillation gain, and the wall time."""
    from kdpipe.stages import distill, scratch

    ensure_teacher()
    views = 2 if QUICK else AUGMENT_VIEWS
    result: dict = {"dataset": "fashion_mnist", "teacher_views": views, "quick": bool(QUICK), "augmentations": {}}
    for name, student in AUGMENTATIONS.items():
        paths = in_own_folder(f"augment_{name}")
        cfg = bench_config({"student": student, "distill": {"teacher_views": views}, "paths": paths})
        _, scratch_s = timed(f"scratch, {name}", scratch.run, cfg)
        _, distill_s = timed(f"distill, {name}", distill.run, cfg)
        folder = Path(paths["metrics"])
        row = {"student": student, "method": cfg.distill.method,
               "scratch": stats(json.loads((folder / "scratch.json").read_text())),
               "distilled": stats(json.loads((folder / "distill.json").read_text())),
               "seconds": {"scratch": round(scratch_s, 1), "distill": round(distill_s, 1)}}
        paired = [d - s for d, s in zip(row["distilled"]["values"], row["scratch"]["values"], strict=True)]
        row["gain_points"] = {"mean": 100 * sum(paired) / len(paired), "per_seed": [100 * p for p in paired]}
        result["augmentations"][name] = row
    result["schedule"] = {k: getattr(cfg.student, k) for k in ("model", "epochs", "batch_size", "lr", "seeds")}
    result["machine"] = machine()
    return result


def main() -> int:
    global WORK
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--curriculum", action="store_true", help="run the curriculum ablation (after quality)")
    parser.add_argument("--views", action="store_true", help="run the cached-views ablation (after quality)")
    parser.add_argument("--views-more-seeds", action="store_true",
                        help="live and 16 views with seeds 3-5, compared over six seeds (after --views)")
    parser.add_argument("--methods", action="store_true", help="distill with every method (after quality)")
    parser.add_argument("--recipes", action="store_true", help="compare student recipes on val (after quality)")
    parser.add_argument("--augment", action="store_true", help="resized_crop vs pad_crop students (teacher first if absent)")
    parser.add_argument("--precision", default=None, help="override runtime.precision (fp32 writes quality_fp32.json)")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run into bench/work/quality_quick/")
    args = parser.parse_args()
    results = RESULTS
    if args.quick:
        WORK, results = BENCH / "work" / "quality_quick", BENCH / "work" / "quality_quick" / "results"
        QUICK.update(QUICK_OVERRIDES)
    results.mkdir(parents=True, exist_ok=True)
    if args.augment:
        out, name = augment_table(), "augment_quality.json"
    elif args.curriculum:
        out, name = curriculum_ablation(), "curriculum.json"
    elif args.views:
        out, name = views_ablation(), "views.json"
    elif args.views_more_seeds:
        out, name = views_more_seeds(), "views_six_seeds.json"
    elif args.methods:
        out, name = methods_table(), "methods.json"
    elif args.recipes:
        out, name = recipes_ablation(), "recipes.json"
    else:
        overrides = {"runtime": {"precision": args.precision}} if args.precision else None
        out = quality(overrides)
        name = "quality_fp32.json" if out["precision"] == "fp32" else "quality.json"
    (results / name).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k not in ("params", "machine")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
