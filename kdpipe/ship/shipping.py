"""What the export stage ships, as typed results: the teacher and the chosen student exported to ONNX in a
staging folder and compared with PyTorch over the whole test split, then timed under onnxruntime, the student
quantised to int8, and everything renamed into place only once every check passed.

kdpipe/ship/onnx_export.py (images) and text_onnx.py (token ids) handle one file at a time, kdpipe/ship/feeds.py
what a model of either modality is fed; this module knows the roles (teacher, student, int8, and the scratch
student, exported only to be timed for the trade-off plot) and reads the export.* params.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

    from kdpipe.config import Config, ExportConfig
    from kdpipe.paths import Paths
    from kdpipe.ship.feeds import ImageFeed, TextFeed

BIG_BATCH = 64  # the second latency batch size: throughput, where batch 1 is one request


@dataclass(frozen=True)
class Models:
    """The models to ship, with their checkpoints, and the scratch student of the same seed."""

    teacher: nn.Module
    teacher_ckpt: dict
    student: nn.Module
    student_ckpt: dict
    scratch: nn.Module  # not shipped: timed only, the trade-off plot's baseline
    seed: int

    @property
    def teacher_source(self) -> str:
        """How the teacher was obtained (train, checkpoint, registry), as its checkpoint records it."""
        return str(self.teacher_ckpt.get("params", {}).get("teacher", {}).get("source", "unknown"))


def TemperatureScaled(model: nn.Module, temperature: float) -> nn.Module:  # noqa: N802 - a class factory
    """`model` with its logits divided by `temperature` (temperature scaling, Guo et al. 2017): the same argmax,
    better calibrated probabilities. Keeps the model's name, channels (images) and classes, so it exports like
    one; images or token ids pass through. torch is imported here, as everywhere in this module, only when used."""
    import torch

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            self.name, self.num_classes = model.name, model.num_classes
            self.in_channels = getattr(model, "in_channels", None)
            self.temperature = float(temperature)

        def forward(self, *inputs):  # (images,) or (input_ids, attention_mask)
            return self.model(*inputs) / self.temperature

    return Scaled()


@dataclass(frozen=True)
class Latency:
    """onnxruntime CPU milliseconds per session.run on a whole batch (not per image), median after warm-up. Text
    models: at max_length tokens, and `by_length` {tokens: {"b1": ms, "b64": ms}} at each length timed."""

    b1: float
    b64: float
    by_length: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Exported:
    """A fresh ONNX file in the staging folder and how it compares with PyTorch on the test split."""

    role: str
    path: Path
    parity: dict  # kdpipe.ship.onnx_export.parity's record: max abs/rel |Δlogit|, argmax agreement, n_images, passed
    params_hash: str


@dataclass(frozen=True)
class OnnxResult:
    """One ONNX model measured under onnxruntime: file, size, speed, test and validation accuracy, its checks."""

    path: Path | None  # None for scratch: its file goes with the staging folder
    size_bytes: int
    latency: Latency
    accuracy: float | None = None  # test; None for scratch: the evaluate stage's PyTorch mean over seeds stands in
    parity: dict | None = None  # None where nothing was compared with PyTorch (int8, scratch)
    params_hash: str | None = None
    val_accuracy: float | None = None  # what the registry gate decides on (kdpipe/ship/gate.py)
    # (N_val,) int8 0/1 per validation image: the gate's paired comparisons (kdpipe/evidence.py)
    val_correct: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Shipment:
    """Everything the export stage measured: the shipped files, plus the scratch student for comparison."""

    teacher: OnnxResult
    student: OnnxResult
    scratch: OnnxResult
    int8: OnnxResult | None  # None with export.int8 off

    def shipped(self) -> dict[str, OnnxResult]:
        """role → result of each file that lands under models/: teacher, student and (when on) int8."""
        roles = {"teacher": self.teacher, "student": self.student, "int8": self.int8}
        return {role: result for role, result in roles.items() if result is not None}

    @property
    def int8_drop(self) -> float | None:
        """Test accuracy (a fraction) lost by int8 against the fp32 student; None with int8 off."""
        return None if self.int8 is None else self.student.accuracy - self.int8.accuracy

    @property
    def int8_val_drop(self) -> float | None:
        """Validation accuracy lost by int8: what decides whether it is registered (the test split never does)."""
        return None if self.int8 is None else self.student.val_accuracy - self.int8.val_accuracy

    @property
    def int8_slower(self) -> bool | None:
        """int8 slower than the fp32 student at batch 1 (one request); None with int8 off."""
        return None if self.int8 is None else self.int8.latency.b1 > self.student.latency.b1


# ---------------------------------------------------------------------------------------------------------
# Export and parity


def params_hash(params: dict) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of the params that produced a file."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def provenance(cfg: Config, prepared: dict, model: nn.Module, ckpt: dict, role: str, git: dict,
               extra: dict, feed: ImageFeed | TextFeed) -> dict[str, str]:
    """ONNX metadata_props: what a consumer needs (classes and the input, feeds.py: an image's size and
    preprocessing, or a text model's tokenizer.json, which `kdpipe predict` applies too) and where the file came from.

    params_hash covers the params the checkpoint carries (the recipe that made the weights) and the opset.
    """
    return {
        **feed.input_metadata(), "role": role, "model": model.name, "dataset": cfg.data.dataset, "dataset_digest": prepared["digest"],
        "params_hash": params_hash({"params": ckpt.get("params", {}), "opset": cfg.export.opset}),
        "git_commit": git["git_commit"], "git_dirty": git["git_dirty"],
        **{k: str(v) for k, v in extra.items()},
    }


@contextmanager
def staging(paths: Paths) -> Iterator[Path]:
    """A hidden temp folder beside the ONNX outputs: files are checked there and renamed into place only when
    every check passed (same filesystem, so each rename is atomic); it goes, with whatever is left, on exit."""
    folder = paths.onnx("student").parent
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=folder) as tmp:
        yield Path(tmp)


def export_checked(cfg: Config, prepared: dict, models: Models, paths: Paths, folder: Path,
                   git: dict, feed: ImageFeed | TextFeed) -> dict[str, Exported]:
    """Teacher and student exported into the staging `folder` (self-contained, dynamic batch (and sequence),
    provenance in the metadata) and compared with PyTorch on the whole test split. Nothing raises on a failed
    comparison: the caller logs the numbers first, then calls `require_parity`."""
    roles = {"teacher": (models.teacher, models.teacher_ckpt, {"teacher_source": models.teacher_source}),
             "student": (models.student, models.student_ckpt, {"student_seed": models.seed,
                                                               "method": cfg.distill.method,
                                                               "teacher": models.teacher.name,
                                                               **temperature_of(models.student)})}
    exported = {}
    for role, (model, ckpt, extra) in roles.items():
        meta = provenance(cfg, prepared, model, ckpt, role, git, extra, feed)
        path = feed.export(model, folder / paths.onnx(role).name, meta, cfg.export.opset)
        checked = feed.parity(model, path, cfg.export)
        exported[role] = Exported(role, path, checked, meta["params_hash"])
    return exported


def temperature_of(model) -> dict[str, str]:
    """{"temperature": T} for a TemperatureScaled student (ONNX metadata: its logits are divided by T), else {}."""
    return {"temperature": f"{model.temperature:.6f}"} if hasattr(model, "temperature") else {}


def parity_metrics(exported: dict[str, Exported]) -> dict[str, float]:
    """The parity numbers as MLflow metrics, e.g. student/parity_max_abs_diff, student/passed."""
    return {f"{role}/{key}": value for role, e in exported.items() for key, value in e.parity.items()}


def require_parity(exported: dict[str, Exported], opts: ExportConfig) -> None:
    """ExportError with one line (which model, which numbers, which limits) for the first failed check."""
    from kdpipe.ship.onnx_export import ExportError

    for e in exported.values():
        p = e.parity
        if not p["passed"]:
            what = f"{p['n_images']} test images" if "n_images" in p else f"{p['n_texts']} test texts"
            raise ExportError(
                f"parity failed for the {e.role} ({e.path.name}): max |Δlogit| {p['parity_max_abs_diff']:.3g} "
                f"(limit {opts.parity_atol:g}), argmax agreement {p['argmax_agreement']:.4f} "
                f"(limit {opts.parity_min_agreement:g}) over {what}; nothing registered")


# ---------------------------------------------------------------------------------------------------------
# Measuring and placing


def measure(cfg: Config, models: Models, exported: dict[str, Exported], paths: Paths, folder: Path,
            feed: ImageFeed | TextFeed) -> Shipment:
    """After parity passed: the scratch student timed, the student quantised (export.int8), then onnxruntime
    test accuracy, latency and size of every shipped file. Files stay in the staging `folder`."""
    scratch = feed.export(models.scratch, folder / "scratch.onnx", {"role": "scratch"}, cfg.export.opset)
    scratch_result = OnnxResult(None, scratch.stat().st_size, feed.latency(scratch, cfg.export),
                                **validation(scratch, feed))  # the gate's baseline
    int8 = feed.quantize(exported["student"].path, folder / paths.onnx("int8").name, cfg) if cfg.export.int8 else None
    teacher, student = (measured(e.path, feed, cfg.export, parity=e.parity, params_hash=e.params_hash)
                        for e in (exported["teacher"], exported["student"]))
    # quantisation copies the student's metadata, params_hash included
    int8_result = measured(int8, feed, cfg.export, params_hash=student.params_hash) if int8 else None
    return Shipment(teacher, student, scratch_result, int8_result)


def measured(path: Path, feed: ImageFeed | TextFeed, opts: ExportConfig, **checks) -> OnnxResult:
    """onnxruntime test and validation accuracy, latency and file size of one ONNX file."""
    accuracy = float(feed.correct(path, "test").mean())
    return OnnxResult(path, path.stat().st_size, feed.latency(path, opts), accuracy, **validation(path, feed),
                      **checks)


def validation(path: Path, feed: ImageFeed | TextFeed) -> dict:
    """{val_accuracy, val_correct}: onnxruntime on the validation split, every model the gate compares scored the
    same way, input by input (for the paired comparisons)."""
    hit = feed.correct(path, "val")
    return {"val_accuracy": float(hit.mean()), "val_correct": hit}


def place(shipment: Shipment, paths: Paths) -> Shipment:
    """The checked files renamed from the staging folder into place; a stale int8 file goes when int8 is off
    (its folder stays: a DVC output that exists, maybe empty, either way)."""
    paths.onnx("int8").parent.mkdir(parents=True, exist_ok=True)
    placed = {}
    for role, result in shipment.shipped().items():
        os.replace(result.path, paths.onnx(role))
        placed[role] = replace(result, path=paths.onnx(role))
    if shipment.int8 is None:
        paths.onnx("int8").unlink(missing_ok=True)
    return replace(shipment, **placed)
