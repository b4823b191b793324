"""Figures for the reports: confusion matrices and reliability diagrams (PNG, and CSV for DVC plots), training
curves, the accuracy-vs-latency trade-off.

matplotlib is imported inside `pyplot()` (about a second), only when a figure is drawn. Every file is written
atomically (a temporary name beside the target, then a rename), so a crash never leaves half a PNG where DVC
would read it.
"""

from __future__ import annotations

import io
from pathlib import Path

CELL_COUNTS_MAX_CLASSES = 20  # beyond this the numbers in confusion-matrix cells become unreadable
PLOT_DPI = 120


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (stages run headless, often without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Render `fig` to PNG in memory, write it atomically, and close it (pyplot keeps figures alive)."""
    from kdpipe.files import atomic_write_bytes

    buf = io.BytesIO()
    try:
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=PLOT_DPI)
    finally:
        pyplot().close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def confusion_png(confusion: list[list[int]], classes: list[str], path: str | Path, title: str) -> Path:
    """Confusion matrix heat map: true class down, predicted across, counts in cells when K ≤ 20."""
    k = len(classes)
    if len(confusion) != k or any(len(row) != k for row in confusion):
        raise ValueError(f"confusion must be {k}×{k} for {k} classes")
    side = min(4.0 + 0.45 * k, 16.0)  # grow with K so tick labels stay legible, but keep the file small
    fig, ax = pyplot().subplots(figsize=(side, side * 0.85))
    image = ax.imshow(confusion, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="images")
    ax.set_xticks(range(k), labels=classes, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(k), labels=classes)
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    if k <= CELL_COUNTS_MAX_CLASSES:
        annotate_counts(ax, confusion)
    return save_figure(fig, path)


def confusion_csv(confusion: list[list[int]], classes: list[str], path: str | Path) -> Path:
    """The confusion matrix as `actual,predicted` rows, one per test image (cell (i, j) repeated its count times):
    the table DVC's `confusion` plot template counts (dvc.yaml's top-level plots), so `dvc plots show` draws it
    beside the curves and `dvc plots diff` compares it between experiments."""
    from kdpipe.files import write_csv

    rows = [{"actual": classes[i], "predicted": classes[j]} for i, row in enumerate(confusion)
            for j, count in enumerate(row) for _ in range(count)]  # csv-quoted: folder names may hold commas
    return write_csv(path, rows)


def annotate_counts(ax, confusion: list[list[int]]) -> None:
    """Write each count in its cell, white on dark cells so it stays readable."""
    threshold = max(max(row) for row in confusion) / 2
    for i, row in enumerate(confusion):
        for j, count in enumerate(row):
            color = "white" if count > threshold else "black"
            ax.text(j, i, str(count), ha="center", va="center", color=color, fontsize=8)


def curves_png(curves: dict[str, list[dict]], path: str | Path, metric: str = "val_accuracy",
               title: str = "") -> Path:
    """One line per run (e.g. teacher, scratch, distilled) of `metric` against epoch, on one axes.

    Rows are as the training engine writes them to CSV, so values may be strings and cells may be empty;
    rows without the metric are skipped. Raises ValueError when no run has the metric at all.
    """
    series = {name: curve_points(rows, metric) for name, rows in curves.items()}
    series = {name: points for name, points in series.items() if points[0]}
    if not series:
        raise ValueError(f"no curve has a value for {metric!r}")
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    for name, (epochs, values) in series.items():
        ax.plot(epochs, values, marker="o" if len(epochs) <= 30 else None, markersize=3, label=name)
    ax.set(xlabel="epoch", ylabel=metric.replace("_", " "), title=title or metric.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def curve_points(rows: list[dict], metric: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of the rows that hold `metric`, as floats."""
    kept = [row for row in rows if row.get(metric) not in (None, "")]
    return [float(row["epoch"]) for row in kept], [float(row[metric]) for row in kept]


def tradeoff_png(points: list[dict], path: str | Path) -> Path:
    """Test accuracy against onnxruntime batch-1 latency, one marker per model, its area ∝ ONNX file size.

    points: {"label", "ms" (batch-1 latency), "acc" (a fraction), "bytes"} per model.
    """
    biggest = max(p["bytes"] for p in points)
    fig, ax = pyplot().subplots(figsize=(7.5, 5))
    for p in points:  # labelled in the legend: near-identical points (fp32 vs int8) would overlap as text
        ax.scatter(p["ms"], p["acc"] * 100, s=40 + 1500 * p["bytes"] / biggest, alpha=0.55, edgecolors="black",
                   label=f"{p['label']}: {p['acc'] * 100:.2f} %, {p['ms']:.3f} ms, {p['bytes'] / 1024:.0f} KiB")
    times = [p["ms"] for p in points]
    log_x = max(times) / min(times) > 10  # a log axis only when the latencies span more than a decade
    if log_x:
        ax.set_xscale("log")
    ax.set(xlabel=f"onnxruntime CPU latency, batch 1 (ms{', log scale' if log_x else ''})",
           ylabel="test accuracy (%)", title="accuracy vs latency (marker area ∝ ONNX file size)")
    ax.margins(x=0.2, y=0.25)
    ax.grid(alpha=0.3)
    legend = ax.legend(fontsize=8, loc="best")
    for handle in legend.legend_handles:
        handle.set_sizes([50])  # same-size legend markers; the axes show the sizes
    return save_figure(fig, path)


def reliability_png(bins: list[dict], path: str | Path, title: str) -> Path:
    """A reliability diagram (Guo et al. 2017): accuracy per confidence bin as bars, the diagonal a perfectly
    calibrated model would follow, and the share of images per bin below.

    bins: kdpipe.evidence.reliability_bins' rows ({lower, upper, count, confidence, accuracy}).
    """
    fig, (ax, counts) = pyplot().subplots(2, 1, figsize=(5.5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    width = bins[0]["upper"] - bins[0]["lower"]
    filled = [b for b in bins if b["count"]]
    ax.bar([b["lower"] for b in filled], [b["accuracy"] for b in filled], width=width, align="edge",
           edgecolor="black", alpha=0.7, label="accuracy in bin")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    ax.plot([b["confidence"] for b in filled], [b["accuracy"] for b in filled], "o", color="black", markersize=3,
            label="mean confidence, accuracy")
    ax.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=title)
    ax.legend(fontsize=8, loc="upper left")
    total = sum(b["count"] for b in bins)
    counts.bar([b["lower"] for b in bins], [b["count"] / total for b in bins], width=width, align="edge",
               edgecolor="black", color="grey")
    counts.set(xlabel="confidence (top-1 softmax probability)", ylabel="share of images")
    return save_figure(fig, path)


def reliability_csv(bins: list[dict], path: str | Path) -> Path:
    """The reliability bins that hold images as `confidence,accuracy,count` rows: a DVC plot (dvc.yaml)."""
    from kdpipe.files import write_csv

    rows = [{"confidence": round(b["confidence"], 6), "accuracy": round(b["accuracy"], 6), "count": b["count"]}
            for b in bins if b["count"]]
    return write_csv(path, rows)
