"""ONNX export of a text classifier, torch-vs-onnxruntime parity over length-bucketed batches, onnxruntime latency
at a few lengths, and dynamic int8 quantisation: onnx_export.py's counterparts for token ids.

The graph: inputs "input_ids" and "attention_mask", int64 (batch, sequence), both axes dynamic; output "logits"
(batch, K). The model is any text model of the zoo's contract, forward(input_ids, attention_mask) -> logits. Texts
are scored in batches of similar length, each padded to its own longest text (as training batches are), so a
corpus of short texts is not run at max_length and the pads a batch adds are tested too.

Only torch and numpy are imported at module level; onnx and onnxruntime inside the functions.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from kdpipe.ship.onnx_export import (
    BATCH_AXIS,
    MIN_OPSET,
    OUTPUT_NAME,
    ExportError,
    cpu_eval_copy,
    load_onnx,
    median_run_ms,
    one_line,
    ort_session,
    save_checked,
    set_metadata,
)

TEXT_INPUTS, SEQUENCE_AXIS = ("input_ids", "attention_mask"), "sequence"
LENGTH_BATCH = 64  # texts per length-bucketed batch in parity and accuracy runs
LATENCY_LENGTHS = (16, 64)  # tokens per text at which latency is measured, plus max_length


class _Logits(torch.nn.Module):
    """forward(input_ids, attention_mask) -> logits of any text model, whatever else its forward accepts."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, attention_mask)


def example_inputs(max_length: int, pad_id: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch 2 of unequal lengths (the second text padded), so neither axis gets specialised to a constant."""
    length = min(8, max_length)
    ids = torch.randint(0, vocab_size, (2, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, length, dtype=torch.int64)
    mask[1, length // 2:] = 0
    ids[1, length // 2:] = pad_id
    return ids, mask


def export_text_onnx(model: torch.nn.Module, path: str | Path, *, max_length: int, pad_id: int, vocab_size: int,
                     metadata: dict[str, str], opset: int = MIN_OPSET) -> Path:
    """`model` (token ids -> logits) as one self-contained, checked .onnx file with dynamic batch and sequence."""
    import onnx

    if opset < MIN_OPSET:
        raise ExportError(f"{path}: opset {opset} requested; need >= {MIN_OPSET}")
    net = _Logits(cpu_eval_copy(model))
    dynamic = {name: {0: BATCH_AXIS, 1: SEQUENCE_AXIS} for name in TEXT_INPUTS} | {OUTPUT_NAME: {0: BATCH_AXIS}}
    with tempfile.TemporaryDirectory(prefix="kdpipe-export-") as tmp:
        raw = Path(tmp) / "model.onnx"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter's own notice
                warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape-dependent Python branches
                # transformers' mask indexing; the parity check that follows is what says the graph is right
                warnings.filterwarnings("ignore", message="Exporting aten::index operator", category=UserWarning)
                torch.onnx.export(net, example_inputs(max_length, pad_id, vocab_size), str(raw), dynamo=False,
                                  opset_version=opset, input_names=list(TEXT_INPUTS), output_names=[OUTPUT_NAME],
                                  dynamic_axes=dynamic)
        except Exception as e:  # noqa: BLE001 - the exporter raises many types; all mean "could not export"
            raise ExportError(f"{path}: torch.onnx.export failed ({one_line(e)})") from None
        exported = onnx.load(raw)
    set_metadata(exported, metadata)
    return save_checked(exported, path)


# ---------------------------------------------------------------------------------------------------------
# Running over a split


def length_batches(lengths: np.ndarray | torch.Tensor, batch_size: int = LENGTH_BATCH) -> Iterator[np.ndarray]:
    """Indices of the texts, sorted by length (stable) and cut into batches: each batch's texts are of similar
    length, so padding each batch to its own longest costs little."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def batch_feed(ids: np.ndarray | torch.Tensor, lengths: np.ndarray | torch.Tensor, rows: np.ndarray
               ) -> dict[str, np.ndarray]:
    """{input_ids, attention_mask} int64 (B, L) for `rows`, cut to the longest of them (right padding kept)."""
    ids, lengths = np.asarray(ids), np.asarray(lengths)
    longest = max(int(lengths[rows].max()), 1)
    batch = ids[rows, :longest].astype(np.int64)  # (B, L)
    mask = (np.arange(longest)[None, :] < lengths[rows][:, None]).astype(np.int64)  # 1 at tokens
    return {"input_ids": batch, "attention_mask": mask}


def _over_batches(run, ids, lengths, n_classes: int | None = None) -> np.ndarray:
    """(N, K) float32 logits in the split's order, `run(feed)` giving each length batch's (B, K)."""
    if len(lengths) == 0:
        raise ValueError("needs at least one text")
    out: np.ndarray | None = None
    for rows in length_batches(lengths):
        logits = np.asarray(run(batch_feed(ids, lengths, rows)), dtype=np.float32)
        if out is None:
            out = np.empty((len(lengths), n_classes or logits.shape[1]), dtype=np.float32)
        out[rows] = logits
    return out


def ort_text_logits(session, ids, lengths) -> np.ndarray:
    """onnxruntime logits (N, K) of the texts (ids (N, max_length), lengths (N,)), length-bucketed."""
    return _over_batches(lambda feed: session.run(None, feed)[0], ids, lengths)


@torch.inference_mode()
def torch_text_logits(model: torch.nn.Module, ids, lengths) -> np.ndarray:
    """Reference logits: the model on CPU, eval, fp32, over the same length batches as onnxruntime."""
    net = cpu_eval_copy(model)
    return _over_batches(lambda feed: net(*(torch.from_numpy(feed[k]) for k in TEXT_INPUTS)).numpy(), ids, lengths)


def text_parity(model: torch.nn.Module, onnx_path: str | Path, ids, lengths, *, atol: float = 1e-4,
                min_agreement: float = 0.999) -> dict:
    """onnx_export.parity's record for texts: max |Δlogit| (and per text relative to its largest |logit|), top-1
    agreement, n_texts, passed (absolute difference ≤ atol and agreement ≥ min_agreement)."""
    expected = torch_text_logits(model, ids, lengths)  # (N, K)
    actual = ort_text_logits(ort_session(onnx_path), ids, lengths)
    diff = np.abs(expected - actual)
    scale = np.maximum(np.abs(expected).max(axis=1), np.finfo(np.float32).tiny)
    max_abs, agreement = float(diff.max()), float((expected.argmax(1) == actual.argmax(1)).mean())
    return {"parity_max_abs_diff": max_abs, "parity_max_rel_diff": float((diff.max(axis=1) / scale).max()),
            "argmax_agreement": agreement, "n_texts": len(expected),
            "passed": bool(max_abs <= atol and agreement >= min_agreement)}


def text_correct(onnx_path: str | Path, ids, lengths, labels) -> np.ndarray:
    """(N,) int8: 1 where the ONNX model's top-1 under plain onnxruntime is the label."""
    labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    return (ort_text_logits(ort_session(onnx_path), ids, lengths).argmax(1) == labels).astype(np.int8)


# ---------------------------------------------------------------------------------------------------------
# Latency and int8


def latency_lengths(max_length: int) -> tuple[int, ...]:
    """LATENCY_LENGTHS below max_length, then max_length itself."""
    return tuple(n for n in LATENCY_LENGTHS if n < max_length) + (max_length,)


def text_latency_ms(onnx_path: str | Path, *, length: int, batch_size: int, vocab_size: int, warmup: int = 5,
                    repeats: int = 30, threads: int | None = None) -> float:
    """Median wall-clock milliseconds of one session.run on a whole batch of `batch_size` texts of `length` tokens
    each (seeded random ids, no pads), after warm-up."""
    session = ort_session(onnx_path, threads=threads)
    ids = np.random.default_rng(0).integers(0, vocab_size, (batch_size, length), dtype=np.int64)
    return median_run_ms(session, {"input_ids": ids, "attention_mask": np.ones_like(ids)}, warmup, repeats)


def quantize_text_int8(fp32_path: str | Path, int8_path: str | Path) -> Path:
    """Dynamic int8 quantisation (int8 weights of MatMul/Gemm/Gather, activations quantised per batch at run time),
    metadata kept: what onnxruntime recommends for transformer models, whose activation ranges vary too much with
    the text for static calibration; no calibration data, so nothing of the train split is needed."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32 = load_onnx(fp32_path)
    with tempfile.TemporaryDirectory(prefix="kdpipe-int8-") as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        try:
            quant_pre_process(fp32, str(prepared))  # shape inference + graph optimisation, as onnxruntime advises
            quantize_dynamic(str(prepared), str(quantized), weight_type=QuantType.QInt8)
        except Exception as e:  # noqa: BLE001 - quantisation raises many types; all mean "could not quantise"
            raise ExportError(f"{fp32_path}: int8 quantisation failed ({one_line(e)})") from None
        int8 = load_onnx(quantized)
    set_metadata(int8, {p.key: p.value for p in fp32.metadata_props})
    return save_checked(int8, int8_path)
