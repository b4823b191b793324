"""Markdown of the evaluate stage's evidence (kdpipe/evidence.py's dict): the paired comparisons with their
intervals, gap recovered, fidelity to the teacher, calibration and the per-class changes. Pure string work."""

from __future__ import annotations

from kdpipe.evidence import direction, interval_text, points
from kdpipe.report.findings import seed_direction
from kdpipe.report.markdown import markdown_row

COMPARISONS = {"distilled_vs_scratch": "distilled − scratch", "distilled_vs_teacher": "distilled − teacher",
               "scratch_vs_teacher": "scratch − teacher"}


def evidence_sections(found: dict, unit: str = "images") -> dict[str, str]:
    """heading → Markdown of each part of the evidence, in reading order; `unit`: what one test item is (images,
    texts)."""
    level = round(found["confidence"] * 100)
    how = (f"Paired comparisons on the same {found['test_images']} test {unit}: {level} % percentile intervals "
           f"from {found['bootstrap_samples']:,} bootstrap replicates (seed {found['bootstrap_seed']}) that "
           "resample seeds and images together (two-level), so seed variance is inside the interval; per seed, "
           "the same over images, and the exact McNemar test on the images one model gets right and the other "
           f"wrong (a seed reads as helped or hurt only when both agree). One test {unit[:-1]} is {100 / found['test_images']:.2f} points.")
    return {"Did distillation help? Paired comparisons": how + "\n\n" + comparisons_table(found),
            "Per seed": per_seed_table(found),
            "Gap recovered": gap_text(found["gap_recovered"]),
            "Fidelity to the teacher": fidelity_table(found["fidelity"]),
            "Calibration": calibration_table(found["calibration"]),
            "Per class: what distillation fixed and broke": per_class_text(found["per_class"], unit)}


def comparisons_table(found: dict) -> str:
    """One row per comparison: difference with its interval, seeds better / worse, McNemar p range, verdict."""
    rows = [markdown_row(["comparison", "difference (points)", "interval", "seeds better / worse",
                          "McNemar p (per seed)", "reads as"]),
            markdown_row(["---", "---:", "---:", "---:", "---:", "---"])]
    for key, name in COMPARISONS.items():
        c = found[key]
        pooled = c["pooled"]
        rows.append(markdown_row([name, points(pooled["difference"]), f"{points(pooled['low'])} to "
                                  f"{points(pooled['high'])}", f"{c['better']} / {c['worse']}",
                                  f"{c['p_min']:.2g}–{c['p_max']:.2g}", direction(pooled)]))
    return "\n".join(rows)


def per_seed_table(found: dict) -> str:
    """Distilled against same-seed scratch, seed by seed, the shipped seed marked."""
    rows = [markdown_row(["seed", "distilled − scratch", "images only distilled / only scratch got right",
                          "McNemar p", "reads as"]), markdown_row(["---:", "---", "---:", "---:", "---"])]
    for s in found["distilled_vs_scratch"]["per_seed"]:
        mark = " (shipped)" if s["seed"] == found["shipped_seed"]["seed"] else ""
        rows.append(markdown_row([f"{s['seed']}{mark}", interval_text(s),
                                  f"{s['mcnemar']['a_only']} / {s['mcnemar']['b_only']}", f"{s['mcnemar']['p']:.2g}",
                                  seed_direction(s)]))
    return "\n".join(rows)


def gap_text(gap: dict) -> str:
    """gap_recovered with its interval in words."""
    if gap["value"] is None:
        return "Undefined: teacher and scratch score the same on test."
    undefined = f"; {gap['undefined']} replicates had no gap and were left out" if gap["undefined"] else ""
    def pct(x: float) -> str:
        return f"{x * 100:.1f}".replace("-", "−")

    return (f"{pct(gap['value'])} % of the teacher–scratch gap ({round(gap['confidence'] * 100)} % CI "
            f"{pct(gap['low'])} % to {pct(gap['high'])} %, same draws as above{undefined}). A ratio of two "
            "noisy differences: read its interval, not its value.")


def fidelity_table(fidelity: dict) -> str:
    """Agreement with the teacher's top-1 and KL(teacher ‖ student) at T = 1, per student (mean over seeds)."""
    rows = [markdown_row(["student", "top-1 agreement with teacher", "KL(teacher ‖ student), nats"]),
            markdown_row(["---", "---:", "---:"])]
    for name, f in fidelity.items():
        rows.append(markdown_row([name, f"{f['agreement'] * 100:.2f} %", f"{f['kl']:.4f}"]))
    return ("Stanton et al. 2021: what the student took from the teacher, apart from accuracy (mean over seeds, "
            "test split).\n\n" + "\n".join(rows))


def calibration_table(calibration: dict) -> str:
    """ECE, NLL, Brier per model (mean over seeds), and the temperature fitted on validation with its test ECE."""
    rows = [markdown_row(["model", "ECE", "NLL", "Brier", "temperature (fitted on val)", "ECE at that temperature"]),
            markdown_row(["---", "---:", "---:", "---:", "---:", "---:"])]
    for name, c in calibration.items():
        rows.append(markdown_row([name.replace("_", " "), f"{c['ece'] * 100:.2f} %", f"{c['nll']:.4f}",
                                  f"{c['brier']:.4f}", f"{c['temperature']:.3f}", f"{c['ece_at_temperature'] * 100:.2f} %"]))
    return ("Guo et al. 2017, on test: ECE over equal-width confidence bins, NLL, Brier score; the temperature "
            "is reported, and applied to the shipped student only with `export.temperature_scale: true`.\n\n" + "\n".join(rows))


def per_class_text(per_class: dict, unit: str = "images") -> str:
    """The per-class table and the classes fixed and broken most."""
    rows = [markdown_row(["class", f"test {unit}", "scratch", "distilled", "change (points)"]),
            markdown_row(["---", "---:", "---:", "---:", "---:"])]
    for r in per_class["classes"]:
        rows.append(markdown_row([r["class"], str(r["images"]), f"{r['scratch'] * 100:.2f} %",
                                  f"{r['distilled'] * 100:.2f} %", points(r["change"])]))
    fixed, broke = ", ".join(per_class["fixed_most"]) or "none", ", ".join(per_class["broke_most"]) or "none"
    return (f"Fixed most: {fixed}. Broke most: {broke}. Accuracy per class, mean over seeds; with few images per "
            "class one image moves a class by several points, so read these as where to look, not as "
            "findings.\n\n" + "\n".join(rows))
