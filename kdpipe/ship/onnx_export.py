"""ONNX export of a Classifier, torch-vs-onnxruntime parity, onnxruntime latency, and static int8 quantisation.

The exported graph is the whole `Classifier`, normalisation included: input "images", float32 (N, C, H, W) in
[0, 1] with a dynamic batch axis "batch"; output "logits" (N, K). Provenance (class names, input size, params
hash, commit, dataset digest) travels inside the file as ONNX metadata_props.

Exporter: the legacy TorchScript exporter (`dynamo=False`). Both exporters export every zoo model with a dynamic
batch and match torch to ~1e-6, but in torch 2.14 the dynamo exporter's lowest opset is 18 (asking for 17 logs a
failed down-conversion traceback) and it takes 1-9 s per model against 0.05-0.4 s here; its one complaint, a
DeprecationWarning, is silenced. Only torch and numpy are imported at module level; onnx and onnxruntime inside
the functions. Text models (token ids in): kdpipe/ship/text_onnx.py, which shares the file and timing helpers.
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    import onnx
    import onnxruntime

INPUT_NAME, OUTPUT_NAME, BATCH_AXIS = "images", "logits", "batch"  # the graph's input, output and dynamic axis
MIN_OPSET, CALIBRATION_BATCH = 17, 32  # the lowest opset exported; images per int8 calibration batch


class ExportError(Exception):
    """An export, check, load or quantisation that failed: the message names the file and what went wrong."""


# ---------------------------------------------------------------------------------------------------------
# Files


def save_checked(model: onnx.ModelProto, path: str | Path) -> Path:
    """Save `model` as one self-contained file, atomically: written beside the target, checked, renamed. The
    checker (full_check: with shape inference) runs on the written temp file, so a failing model never appears."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        onnx.save_model(model, tmp, format="protobuf", save_as_external_data=False)
        onnx.checker.check_model(str(tmp), full_check=True)
        os.replace(tmp, path)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as e:
        raise ExportError(f"{path}: ONNX checker failed: {one_line(e)}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """An ONNX file as a ModelProto; ExportError naming the file when it is missing or unreadable."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: ONNX file not found")
    try:
        return onnx.load(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise ExportError(f"{path}: not a readable ONNX model ({one_line(e)})") from None


def one_line(error: BaseException) -> str:
    """`Type: first line of the message`: third-party errors can span pages; our messages are one line."""
    first = str(error).strip().splitlines()
    return f"{type(error).__name__}: {first[0] if first else ''}"


def set_metadata(model: onnx.ModelProto, metadata: dict[str, str]) -> None:
    """Replace the model's metadata_props with `metadata` (string keys and values only)."""
    import onnx

    bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise ExportError(f"metadata must map str to str; offending keys: {bad}")
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, metadata)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata_props of an ONNX file as a dict."""
    return {p.key: p.value for p in load_onnx(path).metadata_props}


# ---------------------------------------------------------------------------------------------------------
# Export


def cpu_eval_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A float32 CPU copy in eval mode, so the caller's model keeps its device, dtype and mode."""
    return copy.deepcopy(model).cpu().float().eval()


def export_onnx(model: torch.nn.Module, path: str | Path, input_shape: tuple[int, int, int], *,
                metadata: dict[str, str], opset: int = MIN_OPSET) -> Path:
    """Export `model` (float [0, 1] images (N, C, H, W) -> logits) to one self-contained, checked .onnx file.

    input_shape is (C, H, W); the batch axis is dynamic ("batch"). `metadata` is stored as metadata_props.
    """
    import onnx

    if opset < MIN_OPSET:
        raise ExportError(f"{path}: opset {opset} requested; need >= {MIN_OPSET}")
    net = cpu_eval_copy(model)
    example = torch.rand(2, *input_shape)  # batch 2, so nothing gets specialised to a batch of one
    with tempfile.TemporaryDirectory(prefix="kdpipe-export-") as tmp:
        raw = Path(tmp) / "model.onnx"
        try:
            with warnings.catch_warnings():
                # The legacy exporter announces its own deprecation (twice); TracerWarnings etc. still show.
                warnings.simplefilter("ignore", DeprecationWarning)
                torch.onnx.export(
                    net, (example,), str(raw), dynamo=False, opset_version=opset,
                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: {0: BATCH_AXIS}, OUTPUT_NAME: {0: BATCH_AXIS}},
                )
        except Exception as e:  # noqa: BLE001 - the exporter raises many types; all mean "could not export"
            raise ExportError(f"{path}: torch.onnx.export failed ({one_line(e)})") from None
        exported = onnx.load(raw)
    set_metadata(exported, metadata)
    return save_checked(exported, path)


# ---------------------------------------------------------------------------------------------------------
# onnxruntime


def ort_session(path: str | Path, *, threads: int | None = None) -> onnxruntime.InferenceSession:
    """A CPU session; spinning off, since torch and onnxruntime in one process otherwise slow each other."""
    import onnxruntime

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: ONNX file not found")
    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: no optimiser chatter
    if threads is not None:
        options.intra_op_num_threads = threads
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types for bad files
        raise ExportError(f"{path}: onnxruntime cannot load it ({one_line(e)})") from None


def as_float01(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """uint8 images -> float32 / 255; float images are used as is (cast to float32)."""
    array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32, copy=False)
    raise ValueError(f"images must be uint8 or float, got {array.dtype}")


def ort_predict(session: onnxruntime.InferenceSession, images: np.ndarray | torch.Tensor,
                batch_size: int = 256) -> np.ndarray:
    """float32 logits (N, K) in batches; uint8 input is scaled by 1/255 first, float input is used as is."""
    if len(images) == 0:
        raise ValueError("ort_predict needs at least one image")
    name = session.get_inputs()[0].name
    outputs = [session.run(None, {name: as_float01(images[i:i + batch_size])})[0]
               for i in range(0, len(images), batch_size)]
    return np.concatenate(outputs).astype(np.float32, copy=False)


@torch.inference_mode()
def torch_predict(model: torch.nn.Module, images_uint8: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Reference logits: the model on CPU, eval, fp32, images uint8 -> float / 255."""
    net = cpu_eval_copy(model)
    outputs = [net(torch.from_numpy(as_float01(images_uint8[i:i + batch_size]))).numpy()
               for i in range(0, len(images_uint8), batch_size)]
    return np.concatenate(outputs)


def parity(model: torch.nn.Module, onnx_path: str | Path, images_uint8: torch.Tensor, *,
           atol: float = 1e-4, min_agreement: float = 0.999) -> dict:
    """Compare torch and onnxruntime logits on the same uint8 (N, C, H, W) images.

    parity_max_rel_diff is, per image, max|Δ| over the largest |torch logit| of that image, then the max over
    images: for information, since untrained nets can have logits near 1e-10. passed uses only the absolute
    difference (≤ atol) and the top-1 agreement (≥ min_agreement).
    """
    expected = torch_predict(model, images_uint8)  # (N, K)
    actual = ort_predict(ort_session(onnx_path), images_uint8)  # (N, K)
    diff = np.abs(expected - actual)
    scale = np.maximum(np.abs(expected).max(axis=1), np.finfo(np.float32).tiny)  # (N,)
    max_abs = float(diff.max())
    agreement = float((expected.argmax(1) == actual.argmax(1)).mean())
    return {
        "parity_max_abs_diff": max_abs,
        "parity_max_rel_diff": float((diff.max(axis=1) / scale).max()),
        "argmax_agreement": agreement,
        "n_images": len(expected),
        "passed": bool(max_abs <= atol and agreement >= min_agreement),
    }


def ort_latency_ms(onnx_path: str | Path, input_shape: tuple[int, int, int], *, batch_size: int,
                   warmup: int = 5, repeats: int = 30, threads: int | None = None) -> float:
    """Median wall-clock milliseconds of one session.run on a whole batch (not per image), after warm-up, of
    uniform random float32 in [0, 1] of shape (batch_size, *input_shape), the same for every call."""
    session = ort_session(onnx_path, threads=threads)
    feed = {session.get_inputs()[0].name: np.random.default_rng(0).random((batch_size, *input_shape), np.float32)}
    return median_run_ms(session, feed, warmup, repeats)


def median_run_ms(session: onnxruntime.InferenceSession, feed: dict, warmup: int, repeats: int) -> float:
    """Median wall-clock ms of `session.run(None, feed)` over `repeats` calls after `warmup` untimed ones."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def onnx_accuracy(onnx_path: str | Path, images_uint8: torch.Tensor, labels: torch.Tensor | np.ndarray) -> float:
    """Top-1 accuracy (a fraction) of the ONNX model under plain onnxruntime."""
    return float(onnx_correct(onnx_path, images_uint8, labels).mean())


def onnx_correct(onnx_path: str | Path, images_uint8: torch.Tensor, labels: torch.Tensor | np.ndarray) -> np.ndarray:
    """(N,) int8: 1 where the ONNX model's top-1 under plain onnxruntime is the label."""
    labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    return (ort_predict(ort_session(onnx_path), images_uint8).argmax(1) == labels).astype(np.int8)


# ---------------------------------------------------------------------------------------------------------
# int8


def calibration_reader(images_uint8: torch.Tensor, batch_size: int = CALIBRATION_BATCH):
    """An onnxruntime CalibrationDataReader yielding {"images": float32 / 255 batch} once over the images."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.rewind()

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

        def rewind(self) -> None:
            self.batches = ({INPUT_NAME: as_float01(images_uint8[i:i + batch_size])}
                            for i in range(0, len(images_uint8), batch_size))

    return Reader()


def quantize_int8(fp32_path: str | Path, int8_path: str | Path, calibration_uint8: torch.Tensor, *,
                  per_channel: bool = True) -> Path:
    """Static int8 quantisation (QDQ, int8 weights and activations, MinMax calibration) keeping metadata.

    S8S8 in QDQ format is what onnxruntime recommends first for CPU. The model is pre-processed (symbolic
    shape inference + graph optimisation) as onnxruntime advises; every intermediate file lives in a
    temporary directory, and the result is written atomically.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration_uint8) == 0:
        raise ValueError("quantize_int8 needs calibration images")
    fp32 = load_onnx(fp32_path)
    with tempfile.TemporaryDirectory(prefix="kdpipe-int8-") as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        try:
            quant_pre_process(fp32, str(prepared))
            quantize_static(
                str(prepared), str(quantized), calibration_reader(calibration_uint8),
                quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                per_channel=per_channel, calibrate_method=CalibrationMethod.MinMax,
                # A BatchNormalization left unfused (e.g. after a pre-activation Add) has a 1-D scale whose
                # channel axis is 0, not the default 1 (which logs a warning and falls back to per-tensor).
                extra_options={"QDQOpTypePerChannelSupportToAxis": {"BatchNormalization": 0}},
            )
        except Exception as e:  # noqa: BLE001 - quantisation raises many types; all mean "could not quantise"
            raise ExportError(f"{fp32_path}: int8 quantisation failed ({one_line(e)})") from None
        int8 = load_onnx(quantized)
    set_metadata(int8, {p.key: p.value for p in fp32.metadata_props})
    return save_checked(int8, int8_path)
