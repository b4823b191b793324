"""The evaluate stage's evidence, computed from models/predictions.npz alone (so anyone can recompute every
figure from that file): paired comparisons, gap recovered's interval, fidelity to the teacher, calibration with
the temperature fitted on validation, per-class changes and the verdict. The statistics are kdpipe/evidence.py's;
the Markdown is evidence_text.py's.
"""

from __future__ import annotations

import numpy as np

from kdpipe.evidence import (
    BOOTSTRAP_SAMPLES,
    CONFIDENCE,
    ECE_BINS,
    HELPED,
    HURT,
    as_rows,
    bootstrap_means,
    calibration,
    correct,
    direction,
    fidelity,
    fit_temperature,
    gap_recovered_interval,
    interval_record,
    interval_text,
    mcnemar,
)


def compare(a: np.ndarray, b: np.ndarray, seeds: list[int], *, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0,
            confidence: float = CONFIDENCE) -> dict:
    """Model a against model b on the same images, per seed and pooled over seeds.

    a: (S, N) 0/1 correctness of S seeds; b: (S, N) paired seed by seed, or (1, N) for a model trained once.
    Returns {pooled: paired_bootstrap over seeds and images, per_seed: [{seed, paired_bootstrap…, mcnemar}],
    better, worse, same: how many seeds moved which way, p_min, p_max: the seeds' McNemar p range}.
    """
    a, b = as_rows(a), as_rows(b)
    diff = a - b  # (S, N): a one-row b stands beside every seed of a
    # One set of draws for the pooled and the per-seed intervals (a per-seed row is a one-seed array there)
    replicates = bootstrap_means([diff, *diff], samples=samples, seed=seed)
    intervals = [interval_record(d, reps, samples, confidence) for d, reps in zip([diff, *diff], replicates, strict=True)]
    per_seed = [{"seed": run_seed, **interval, "mcnemar": mcnemar(a[row], b[0] if b.shape[0] == 1 else b[row])}
                for row, (run_seed, interval) in enumerate(zip(seeds, intervals[1:], strict=True))]
    diffs = [s["difference"] for s in per_seed]
    ps = [s["mcnemar"]["p"] for s in per_seed]
    return {"pooled": intervals[0], "per_seed": per_seed, "better": sum(d > 0 for d in diffs), "worse": sum(d < 0 for d in diffs),
            "same": sum(d == 0 for d in diffs), "p_min": min(ps), "p_max": max(ps)}


def seed_direction(row: dict) -> str:
    """One seed pair's reading: helped or hurt only when its bootstrap interval excludes 0 AND the exact McNemar
    test agrees (p below 1 − confidence). With a handful of discordant images the percentile interval can
    exclude 0 while the exact test does not (digits: 9 against 2 images, interval +0.28 to +3.90, p = 0.065);
    the stricter of the two then decides, and the line still shows both."""
    found = direction(row)
    return found if row["mcnemar"]["p"] < 1 - row["confidence"] else "no evidence"


def p_text(comparison: dict) -> str:
    """'McNemar p = 0.012' for one seed, 'McNemar p 0.003–0.21 over seeds' for several."""
    low, high = comparison["p_min"], comparison["p_max"]
    if len(comparison["per_seed"]) == 1:
        return f"McNemar p = {low:.2g}"
    return f"McNemar p {low:.2g}–{high:.2g} over seeds"


def verdict(comparison: dict, *, subject: str = "distillation", shipped: dict | None = None) -> dict:
    """The one-line answer to "did `subject` help?" from compare()'s dict (a − b with a the distilled model).

    helped: the pooled interval lies above 0; hurt: below 0; otherwise no evidence of a difference, said with
    the interval and what would narrow it. `shipped`: one entry of comparison["per_seed"] (the seed export
    ships), whose own comparison ends the line. Returns {verdict, line}.
    """
    pooled, n = comparison["pooled"], len(comparison["per_seed"])
    seeds = f"{comparison['better']} of {n} seed{'s' if n > 1 else ''} better"
    found = direction(pooled)
    said = {HELPED: f"{subject} helped", HURT: f"{subject} hurt"}.get(found, f"no evidence that {subject} made a difference")
    line = f"{said}: {interval_text(pooled)}, {seeds}, {p_text(comparison)}"
    if found not in (HELPED, HURT):
        line += "; more seeds or a larger test split would tell"
    if shipped is not None:
        line += (f". Shipped seed {shipped['seed']}: {interval_text(shipped)}, McNemar p = "
                 f"{shipped['mcnemar']['p']:.2g} ({seed_direction(shipped)})")
    return {"verdict": found, "line": line}


def load_predictions(path) -> dict[str, np.ndarray]:
    """models/predictions.npz (the evaluate stage's write_predictions) as a dict of arrays."""
    with np.load(path, allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def models_in(predictions: dict[str, np.ndarray]) -> list[str]:
    """The model keys of a predictions dict, e.g. ["teacher", "scratch", "distilled"]."""
    return [name[len("test_logits_"):] for name in predictions if name.startswith("test_logits_")]


def per_class(scratch: np.ndarray, distilled: np.ndarray, labels: np.ndarray, classes: list[str],
              most: int = 3) -> dict:
    """Accuracy per class of each student (mean over seeds) and its change, with the `most` classes that
    distillation fixed (gained) and broke (lost) most. scratch, distilled: (S, N) 0/1 correctness."""
    rows = []
    for k, name in enumerate(classes):
        inside = labels == k
        if not inside.any():
            continue
        before, after = float(scratch[:, inside].mean()), float(distilled[:, inside].mean())
        rows.append({"class": str(name), "images": int(inside.sum()), "scratch": before, "distilled": after,
                     "change": after - before})
    ranked = sorted(rows, key=lambda r: (r["change"], r["class"]))
    return {"classes": rows, "fixed_most": [r["class"] for r in reversed(ranked) if r["change"] > 0][:most],
            "broke_most": [r["class"] for r in ranked if r["change"] < 0][:most]}


def model_calibration(test_logits: np.ndarray, test_labels: np.ndarray, val_logits: np.ndarray,
                      val_labels: np.ndarray, bins: int) -> dict:
    """calibration() per seed on test (means over seeds at the top), each seed's temperature fitted on
    validation and the test ECE and NLL it would give, and the reliability bins of all seeds' test predictions
    pooled (the diagram)."""
    seeds = []
    for test, val in zip(test_logits, val_logits, strict=True):
        raw = calibration(test, test_labels, bins=bins)
        t = fit_temperature(val, val_labels)
        scaled = calibration(test, test_labels, bins=bins, temperature=t)
        seeds.append({"ece": raw["ece"], "nll": raw["nll"], "brier": raw["brier"], "temperature": t,
                      "ece_at_temperature": scaled["ece"], "nll_at_temperature": scaled["nll"]})
    pooled = calibration(np.concatenate(list(test_logits)), np.tile(test_labels, len(test_logits)), bins=bins)
    means = {key: float(np.mean([s[key] for s in seeds])) for key in seeds[0]}
    return {**means, "per_seed": seeds, "bins": pooled["bins"]}


def evaluate_evidence(predictions: dict[str, np.ndarray], shipped: int, *, samples: int = BOOTSTRAP_SAMPLES,
                      seed: int = 0, confidence: float = CONFIDENCE, bins: int = ECE_BINS) -> dict:
    """Every figure of the evaluate stage's evidence from its predictions (load_predictions' dict): paired
    comparisons, gap recovered's interval, fidelity, calibration, per-class changes and the verdict for the
    `shipped` distilled seed. The comparisons and gap recovered are against the "teacher" row (with
    teacher.ensemble > 1, the first member, as evaluate.json's gap_recovered); fidelity is to the model that
    taught ("teacher_ensemble" when there is one)."""
    labels, classes = predictions["test_labels"], [str(c) for c in predictions["classes"]]
    seeds = [int(s) for s in predictions["distilled_seeds"]]
    hit = {name: correct(predictions[f"test_logits_{name}"], labels) for name in models_in(predictions)}
    args = {"samples": samples, "seed": seed, "confidence": confidence}
    distilled_vs_scratch = compare(hit["distilled"], hit["scratch"], seeds, **args)
    shipped_row = next(s for s in distilled_vs_scratch["per_seed"] if s["seed"] == shipped)
    found = verdict(distilled_vs_scratch, shipped=shipped_row)
    # Fidelity is to the model that taught: an ensemble's averaged logits when teacher.ensemble > 1
    teacher = predictions.get("test_logits_teacher_ensemble", predictions["test_logits_teacher"])[0]
    return {
        "verdict": found["verdict"], "verdict_line": found["line"], "confidence": confidence,
        "bootstrap_samples": samples, "bootstrap_seed": seed, "test_images": int(len(labels)), "seeds": seeds,
        "distilled_vs_scratch": distilled_vs_scratch, "shipped_seed": shipped_row,
        "distilled_vs_teacher": compare(hit["distilled"], hit["teacher"], seeds, **args),
        "scratch_vs_teacher": compare(hit["scratch"], hit["teacher"], seeds, **args),
        "gap_recovered": gap_recovered_interval(hit["teacher"], hit["scratch"], hit["distilled"], **args),
        "fidelity": {name: _fidelity_over_seeds(predictions[f"test_logits_{name}"], teacher, seeds)
                     for name in ("scratch", "distilled")},
        "calibration": {name: model_calibration(predictions[f"test_logits_{name}"], labels,
                                                predictions[f"val_logits_{name}"], predictions["val_labels"], bins)
                        for name in models_in(predictions)},
        "per_class": per_class(hit["scratch"], hit["distilled"], labels, classes),
    }


def _fidelity_over_seeds(student_logits: np.ndarray, teacher_logits: np.ndarray, seeds: list[int]) -> dict:
    """fidelity() per seed, with the means over seeds at the top."""
    rows = [{"seed": s, **fidelity(logits, teacher_logits)} for s, logits in zip(seeds, student_logits, strict=True)]
    return {"agreement": float(np.mean([r["agreement"] for r in rows])),
            "kl": float(np.mean([r["kl"] for r in rows])), "per_seed": rows}
