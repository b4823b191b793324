"""Metrics, cost figures, plots and Markdown reports computed from predictions; nothing here trains.

Only torch is imported at module level: scikit-learn and matplotlib cost about a second each to import, and
most stages that import this module never draw a plot. Every file is written atomically (a temporary name
beside the target, then a rename), so a crash never leaves half a PNG where DVC would read it.
"""

from __future__ import annotations

import copy
import io
import math
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

MISSING = "–"  # an en dash: what the headline table shows for a value nobody measured
TOP5_MIN_CLASSES = 10  # top-5 accuracy says little when there are only a handful of classes
CELL_COUNTS_MAX_CLASSES = 20  # beyond this the numbers in confusion-matrix cells become unreadable
PLOT_DPI = 120


# ---------------------------------------------------------------------------------------------------------
# Classification metrics


def classification_metrics(logits: Tensor, labels: Tensor, classes: list[str]) -> dict:
    """Top-1 (and top-5 when K ≥ 10) accuracy, macro-F1, sklearn's per-class report and the confusion matrix.

    logits: (N, K) scores, labels: (N,) class indices, classes: the K class names in index order. The report
    and the confusion matrix always cover all K classes, even those absent from `labels`.
    """
    from sklearn.metrics import classification_report, confusion_matrix, f1_score

    logits, labels = check_predictions(logits, labels, len(classes))
    y_true, y_pred = labels.numpy(), logits.argmax(dim=1).numpy()
    ids = list(range(len(classes)))
    report_args = dict(labels=ids, target_names=list(classes), zero_division=0)
    metrics = {"test_accuracy": float((y_true == y_pred).mean())}
    if len(classes) >= TOP5_MIN_CLASSES:
        metrics["top5_accuracy"] = topk_accuracy(logits, labels, 5)
    metrics["macro_f1"] = float(f1_score(y_true, y_pred, labels=ids, average="macro", zero_division=0))
    metrics["report"] = classification_report(y_true, y_pred, output_dict=True, **report_args)
    metrics["report_text"] = classification_report(y_true, y_pred, digits=4, **report_args)
    metrics["confusion"] = confusion_matrix(y_true, y_pred, labels=ids).astype(int).tolist()
    return metrics


def check_predictions(logits: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Validate shapes and move to CPU as (float logits, long labels); the message says what is wrong."""
    logits, labels = logits.detach().float().cpu(), labels.detach().long().cpu()
    if logits.ndim != 2 or logits.shape[1] != num_classes:
        raise ValueError(f"logits must be (N, {num_classes}) for {num_classes} classes, got {tuple(logits.shape)}")
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"labels must be ({logits.shape[0]},) to match the logits, got {tuple(labels.shape)}")
    if labels.numel() == 0:
        raise ValueError("no predictions to evaluate")
    return logits, labels


def topk_accuracy(logits: Tensor, labels: Tensor, k: int) -> float:
    """Fraction of rows whose true class is among the k highest logits."""
    topk = logits.topk(k, dim=1).indices  # (N, k)
    return float((topk == labels[:, None]).any(dim=1).float().mean())


# ---------------------------------------------------------------------------------------------------------
# Cost: multiply-accumulates and CPU latency


def count_macs(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Multiply-accumulates of one forward pass for one (C, H, W) image, counted over Conv2d and Linear.

    Conv2d: output elements × in_channels/groups × kH × kW; Linear: rows × in × out (rows = 1 for a flat
    feature vector). Bias adds, norms, activations and pooling are ignored, as is usual in the KD literature.
    The model runs where it lives, in eval mode (so BN statistics stay put); its modes are restored after.
    """
    total = 0

    def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        nonlocal total
        total += layer_macs(module, output)

    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with eval_mode(model), torch.inference_mode():
            model(torch.zeros(1, *input_shape, device=model_device(model)))
    finally:
        for handle in handles:
            handle.remove()
    return total


def layer_macs(module: nn.Module, output: Tensor) -> int:
    """MACs of one Conv2d or Linear call, from the output it produced."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return output.numel() * (module.in_channels // module.groups) * kh * kw
    return output.numel() * module.in_features  # output.numel() = rows × out_features


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode, then give each back its own mode (they may differ, e.g. a frozen BN)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.training = training


def model_device(model: nn.Module) -> torch.device:
    """Device of the first parameter or buffer; CPU for a model that holds neither."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def cpu_latency_ms(model: nn.Module, input_shape: tuple[int, int, int], *, batch_size: int = 1,
                   warmup: int = 5, repeats: int = 30, threads: int = 1) -> float:
    """Median wall-clock milliseconds per image of a CPU forward pass on a batch of zeros, on `threads` threads.

    A deep copy is timed (on CPU, eval mode, inference_mode), so the caller's model keeps its device, mode and
    BN statistics. The median, not the mean, because one scheduler hiccup would drag a mean of 30 runs.
    One thread by default: a multi-threaded forward on a busy machine waits at every op's barrier for a
    descheduled thread (measured here: 0.2 ms became 220 ms with another job on the 2 cores), and
    single-thread latency is what an edge deployment sees.
    """
    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"need batch_size ≥ 1, repeats ≥ 1, warmup ≥ 0; got {batch_size}, {repeats}, {warmup}")
    cpu_model = copy.deepcopy(model).cpu().eval()
    x = torch.zeros(batch_size, *input_shape)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                cpu_model(x)
            times = [timed_call(cpu_model, x) for _ in range(repeats)]
    finally:
        torch.set_num_threads(before)
    return 1000.0 * statistics.median(times) / batch_size


def timed_call(model: nn.Module, x: Tensor) -> float:
    """Seconds taken by one forward call."""
    start = time.perf_counter()
    model(x)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------------
# Summaries over models and seeds


def gap_recovered(teacher: float, scratch: float, distilled: float) -> float | None:
    """(distilled − scratch) / (teacher − scratch): the share of the teacher–scratch gap distillation closed.

    1 means the student matches the teacher, 0 no gain over training from scratch, < 0 worse than scratch.
    None when teacher and scratch score the same (|difference| < 1e-9): there is no gap to divide by.
    """
    gap = teacher - scratch
    if abs(gap) < 1e-9:
        return None
    return (distilled - scratch) / gap


def mean_std(values: list[float]) -> dict:
    """{"mean", "std", "n", "values"} over seeds; std is the sample std (ddof=1), 0.0 for a single value."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_std needs at least one value")
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values), "values": values}


# ---------------------------------------------------------------------------------------------------------
# Plots


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (stages run headless, often without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Render `fig` to PNG in memory, write it atomically, and close it (pyplot keeps figures alive)."""
    from kdpipe.artifacts import atomic_write_bytes

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


# ---------------------------------------------------------------------------------------------------------
# Markdown


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
                    images: dict[str, str]) -> str:
    """A whole Markdown report: title, dataset, headline table, gap recovered, sections, then figures.

    sections: heading → preformatted text (e.g. a classification report), shown in a fenced code block so its
    columns stay aligned. images: alt text → path relative to the report file.
    """
    parts = [f"# {title}", f"**Dataset:** {dataset}", "## Headline", table, gap_line(gap)]
    for heading, text in sections.items():
        parts += [f"## {heading}", f"```text\n{text.rstrip()}\n```"]
    if images:
        parts.append("## Figures")
        parts += [f"![{alt}]({Path(rel).as_posix()})" for alt, rel in images.items()]
    return "\n\n".join(parts) + "\n"
