"""Markdown for the reports: the headline table, number formats, the evaluate and export reports' text.

Pure string work on metrics dicts and typed export results; the figures are kdpipe/report/plots.py's.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kdpipe.config import Config
    from kdpipe.ship.shipping import Shipment

MISSING = "–"  # an en dash: what the headline table shows for a value nobody measured
EVALUATED = ("teacher", "scratch", "distilled")  # the model rows of metrics/evaluate.json, in table order
ENSEMBLE_ROWS = ("teacher members", "teacher ensemble")  # after "teacher", with teacher.ensemble > 1
SEED_STATS = ("test_accuracy", "macro_f1", "top5_accuracy")  # the row values evaluate gives as mean ± std


# ---------------------------------------------------------------------------------------------------------
# Tables and numbers


def headline_table(rows: dict[str, dict]) -> str:
    """Markdown table of accuracy and cost per model; a value may be a float or a mean_std dict.

    Columns: model, architecture, test acc, top-5 (only when some row has it), macro-F1, params, MACs (M),
    CPU ms/img (1 thread). Anything missing shows as "–".
    """
    with_top5 = any(present(row.get("top5_accuracy")) for row in rows.values())
    header = ["model", "architecture", "test acc", *(["top-5"] if with_top5 else []),
              "macro-F1", "params", "MACs (M)", "CPU ms/img (1 thread)"]
    align = ["---", "---"] + ["---:"] * (len(header) - 2)  # text columns left, numbers right
    lines = [markdown_row(header), markdown_row(align)]
    for label, row in rows.items():
        lines.append(markdown_row(table_cells(label, row, with_top5)))
    return "\n".join(lines)


def table_cells(label: str, row: dict, with_top5: bool) -> list[str]:
    """The cells of one headline-table row, in header order."""
    cells = [label, str(row["model"]) if present(row.get("model")) else MISSING,
             fmt_percent(row.get("test_accuracy"))]
    if with_top5:
        cells.append(fmt_percent(row.get("top5_accuracy")))
    cells += [fmt_number(row.get("macro_f1"), "{:.4f}"), fmt_count(row.get("num_parameters")),
              fmt_number(row.get("macs"), "{:.2f}", scale=1e-6), fmt_number(row.get("latency_ms"), "{:.3f}")]
    return cells


def evaluate_table(evaluated: dict) -> str:
    """The headline table of metrics/evaluate.json's teacher, scratch and distilled rows (students as mean ± std
    over seeds): the evaluate stage's report and the export stage's both show it."""
    labels = [label for label in (EVALUATED[0], *ENSEMBLE_ROWS, *EVALUATED[1:]) if label in evaluated]
    return headline_table({label: with_spread(evaluated[label]) for label in labels})


def with_spread(row: dict) -> dict:
    """An evaluate.json row with each `<key>` + `<key>_std` pair folded into one mean_std-style dict."""
    out = dict(row)
    for key in SEED_STATS:
        if f"{key}_std" in row:
            out[key] = {"mean": row[key], "std": row[f"{key}_std"], "n": len(row["per_seed"])}
    return out


def markdown_row(cells: list[str]) -> str:
    """One table row; pipes inside cells are escaped so they cannot split a column."""
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def present(value) -> bool:
    """False for None and NaN: both mean 'not measured'."""
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def fmt_number(value, pattern: str, scale: float = 1.0, suffix: str = "") -> str:
    """A float as `pattern`, or a mean_std dict as "mean ± std", both times `scale`; "–" when missing."""
    if not present(value):
        return MISSING
    if isinstance(value, dict):
        mean, std = pattern.format(value["mean"] * scale), pattern.format(value["std"] * scale)
        return f"{mean} ± {std}{suffix}"
    return pattern.format(value * scale) + suffix


def fmt_percent(value) -> str:
    """A fraction as "98.33 %", a mean_std of fractions as "98.33 ± 0.21 %"."""
    return fmt_number(value, "{:.2f}", scale=100.0, suffix=" %")


def fmt_count(value) -> str:
    """A parameter count as "0.27 M" from 100 k up, "94 k" or "1.5 k" below, the plain number under 1 k."""
    if not present(value):
        return MISSING
    if value >= 100_000:
        return f"{value / 1e6:.2f} M"
    if value >= 10_000:
        return f"{value / 1e3:.0f} k"
    if value >= 1_000:
        return f"{value / 1e3:.1f} k"
    return str(int(value))


def gap_line(gap: float | None) -> str:
    """The gap_recovered value with the sentence that says what it means."""
    meaning = ("the share of the teacher–scratch gap that distillation closed, "
               "(distilled − scratch) / (teacher − scratch): 100 % matches the teacher, 0 % or less is no gain")
    if gap is None:
        return f"**Gap recovered:** undefined — teacher and scratch score the same, so there is no gap ({meaning})."
    return f"**Gap recovered:** {gap * 100:.1f} % — {meaning}."


def markdown_report(*, title: str, dataset: str, table: str, gap: float | None, sections: dict[str, str],
                    images: dict[str, str], verdict: str | None = None, evidence: dict[str, str] | None = None) -> str:
    """A whole Markdown report: title, dataset, headline table, gap recovered, sections, then figures.

    sections: heading → preformatted text (e.g. a classification report), shown in a fenced code block so its
    columns stay aligned. images: alt text → path relative to the report file. verdict: one line shown first;
    evidence: heading → Markdown, after the headline.
    """
    parts = [f"# {title}", *([f"**Verdict:** {verdict}"] if verdict else []), f"**Dataset:** {dataset}",
             "## Headline", table, gap_line(gap)]
    for heading, text in (evidence or {}).items():
        parts += [f"## {heading}", text]
    for heading, text in sections.items():
        parts += [f"## {heading}", f"```text\n{text.rstrip()}\n```"]
    if images:
        parts.append("## Figures")
        parts += [f"![{alt}]({Path(rel).as_posix()})" for alt, rel in images.items()]
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------------------
# The export report


def export_report(cfg: Config, metrics: dict, shipment: Shipment, evaluated: dict, *, n_test: int,
                  png: str) -> str:
    """reports/export/report.md: the shipped seed and why, the evaluate stage's headline, the ONNX numbers,
    the registry outcome, and the trade-off figure (`png`, relative to the report).

    metrics: metrics/export.json's dict; evaluated: metrics/evaluate.json's.
    """
    choice, opts = metrics["seed_choice"], cfg.export
    parts = [
        "# kdpipe export",
        f"**Dataset:** {cfg.data.dataset} (digest `{metrics['dataset_digest'][:12]}`, {n_test} test {'texts' if cfg.data.is_text else 'images'}). "
        f"**Shipped student:** distill seed {metrics['student_seed']} of {list(cfg.student.seeds)} — "
        f"{choice['rule']} ({choice['val_accuracy'] * 100:.2f} %); the test split played no part in the choice.",
        "## Headline (evaluate stage, PyTorch)",
        evaluate_table(evaluated), gap_line(evaluated.get("gap_recovered")),
        "## ONNX (onnxruntime, CPU)",
        f"Parity over the whole test split: limits max |Δlogit| ≤ {opts.parity_atol:g} and argmax agreement "
        f"≥ {opts.parity_min_agreement:g}. Latency: median of {opts.latency_repeats} runs after warm-up, "
        f"{opts.latency_threads} thread(s), per batch (not per image).",
        onnx_table(metrics, shipment, evaluated), speed_line(metrics, cfg),
        "## Registry", "\n".join(registry_lines(metrics, cfg)),
        "## Trade-off",
        "Test accuracy against batch-1 latency; marker area ∝ ONNX file size. Teacher, distilled and int8 "
        "accuracies are onnxruntime's on the test split; scratch is the evaluate stage's mean over seeds.",
        f"![accuracy vs latency]({png})",
    ]
    return "\n\n".join(parts) + "\n"


def shipped_labels(metrics: dict) -> dict[str, str]:
    """role → how the report and the trade-off plot name each shipped model."""
    return {"teacher": f"teacher ({metrics['teacher_model']})",
            "student": f"distilled student (seed {metrics['student_seed']})", "int8": "int8 distilled student"}


def onnx_table(metrics: dict, shipment: Shipment, evaluated: dict) -> str:
    """One row per ONNX model: file, size, onnxruntime accuracy, parity, latency at batch 1 and 64."""
    header = ["model", "file", "KiB", "test acc (ORT)", "max abs logit diff", "argmax agreement", "ms batch 1",
              "ms batch 64"]
    rows = [markdown_row(header), markdown_row(["---", "---"] + ["---:"] * 6)]
    labels = {**shipped_labels(metrics),
              "scratch": "scratch student (not shipped; accuracy: PyTorch, mean of seeds)"}
    for role, r in {**shipment.shipped(), "scratch": shipment.scratch}.items():
        accuracy = evaluated["scratch"]["test_accuracy"] if role == "scratch" else r.accuracy
        parity = r.parity or {}
        rows.append(markdown_row([
            labels[role], f"`{r.path}`" if r.path else MISSING, f"{r.size_bytes / 1024:.0f}",
            fmt_percent(accuracy), fmt_number(parity.get("parity_max_abs_diff"), "{:.2e}"),
            fmt_number(parity.get("argmax_agreement"), "{:.4f}"), f"{r.latency.b1:.3f}", f"{r.latency.b64:.3f}"]))
    return "\n".join(rows)


def speed_line(metrics: dict, cfg: Config) -> str:
    """Student / teacher latency ratios, and int8's accuracy and speed."""
    int8 = "int8: off (`export.int8: false`)."
    if metrics["int8_accuracy"] is not None:
        slower = " (slower than fp32: smaller, not faster)" if metrics.get("int8_slower_than_fp32") else ""
        int8 = (f"int8: test accuracy {metrics['int8_accuracy'] * 100:.2f} % (drop "
                f"{metrics['int8_accuracy_drop'] * 100:.2f} points; on validation "
                f"{metrics['int8_val_accuracy_drop'] * 100:.2f}, limit {cfg.export.int8_max_accuracy_drop * 100:.2f}), "
                f"{metrics['int8_latency_ms_b1']:.3f} ms at batch 1 vs fp32 {metrics['student_latency_ms_b1']:.3f} ms"
                f"{slower}.")
    return (f"Student / teacher latency: {metrics['latency_ratio_b1']:.3f}× at batch 1, "
            f"{metrics['latency_ratio_b64']:.3f}× at batch 64. {int8}")  # _b64: shipping.BIG_BATCH


def registry_lines(metrics: dict, cfg: Config) -> list[str]:
    """Each registered version with its aliases and why; or why nothing (or no int8) was registered."""
    if not cfg.export.registry:
        return ["Registry off (`export.registry: false`): nothing registered."]
    names = {"teacher": cfg.export.teacher_registered_model, "student": cfg.export.registered_model,
             "int8": f"{cfg.export.registered_model}-int8"}
    lines = [f"- `{names[role]}` version {r['version']}: aliases {', '.join(r['aliases']) or MISSING} "
             f"({r['reason']})" for role, r in metrics["registry"].items()]
    if cfg.export.int8 and not metrics["int8_registrable"]:
        drop = metrics["int8_val_accuracy_drop"] * 100
        lines.append(f"- int8 not registered: validation accuracy drop {drop:.2f} points > "
                     f"limit {cfg.export.int8_max_accuracy_drop * 100:.2f}")
    return lines


def tradeoff_points(metrics: dict, shipment: Shipment, evaluated: dict) -> list[dict]:
    """plots.tradeoff_png's points: (label, batch-1 ms, test accuracy, ONNX bytes) per model, the scratch
    student's accuracy being the evaluate stage's mean over seeds."""
    labels, scratch = shipped_labels(metrics), evaluated["scratch"]
    n = len(scratch.get("per_seed", [])) or 1
    models = [(labels["teacher"], shipment.teacher, shipment.teacher.accuracy),
              (f"scratch student (mean of {n} seeds)", shipment.scratch, scratch["test_accuracy"]),
              (labels["student"], shipment.student, shipment.student.accuracy)]
    if shipment.int8 is not None:
        models.append((labels["int8"], shipment.int8, shipment.int8.accuracy))
    return [{"label": label, "ms": r.latency.b1, "acc": accuracy, "bytes": r.size_bytes}
            for label, r, accuracy in models]
