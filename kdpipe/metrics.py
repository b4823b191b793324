"""Metrics and cost figures computed from predictions: accuracy, macro-F1, classification report, confusion
matrix, MACs, CPU latency, mean ± std over seeds, gap recovered. Nothing here trains, plots or writes files.

Only torch is imported at module level: scikit-learn costs about a second to import, and most stages that
import this module never build a classification report.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

TOP5_MIN_CLASSES = 10  # top-5 accuracy says little when there are only a handful of classes


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


# An accuracy at most this far above chance is "at chance": a model that collapsed onto one class scores that
# class's share, at most the majority share, and one that learned a little clears it easily (a 1-epoch digits
# student: 0.51 against 0.10; the collapses measured here: 0.100 against 0.104, 3 photo classes: 0.333 against 0.333).
CHANCE_MARGIN = 0.02


def chance_accuracy(labels) -> float:
    """What always guessing the most frequent class scores on `labels` (a tensor or array of class indices)."""
    labels = torch.as_tensor(labels).flatten()
    return torch.bincount(labels).max().item() / len(labels) if len(labels) else 0.0


def at_chance(accuracy: float, chance: float) -> bool:
    """Is `accuracy` at chance level (within CHANCE_MARGIN of `chance`, or below it)?"""
    return accuracy <= chance + CHANCE_MARGIN


# ---------------------------------------------------------------------------------------------------------
# Cost: multiply-accumulates and CPU latency


def count_macs(model: nn.Module, input_shape: tuple[int, int, int], example: Tensor | None = None) -> int:
    """Multiply-accumulates of one forward pass for one (C, H, W) image, counted over Conv1d, Conv2d and Linear.

    Conv: output elements × in_channels/groups × kernel elements (kH × kW; k for a text CNN's Conv1d); Linear: rows × in × out (rows = 1 for a flat
    feature vector). Bias adds, norms, activations and pooling are ignored, as is usual in the KD literature.
    The model runs where it lives, in eval mode (so BN statistics stay put); its modes are restored after.
    `example`: the one input to count on instead of zeros of `input_shape` (a text model's token ids (1, L)).
    """
    total = 0

    def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        nonlocal total
        total += layer_macs(module, output)

    layers = [m for m in model.modules() if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Linear)]
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with eval_mode(model), torch.inference_mode():
            model(torch.zeros(1, *input_shape, device=model_device(model)) if example is None
                  else example.to(model_device(model)))
    finally:
        for handle in handles:
            handle.remove()
    return total


def layer_macs(module: nn.Module, output: Tensor) -> int:
    """MACs of one Conv1d, Conv2d or Linear call, from the output it produced."""
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        return output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
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
                   warmup: int = 5, repeats: int = 30, threads: int = 1, example: Tensor | None = None) -> float:
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
    x = torch.zeros(batch_size, *input_shape) if example is None else example.expand(batch_size, *example.shape[1:])
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
