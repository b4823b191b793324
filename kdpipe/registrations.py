"""The export stage's registry versions: teacher, student and int8 described and tagged from the typed export
results, then registered through kdpipe/registry.py (which applies the candidate/champion gate of gate.py).

The teacher's kdpipe checkpoint is logged beside its version (tag `checkpoint_artifact`), so a later run can
reuse it with teacher.source: registry. No mlflow import here: kdpipe/registry.py does that.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

    from kdpipe.config import Config
    from kdpipe.registry import Registration
    from kdpipe.shipping import Models, Shipment

EXAMPLE_IMAGES = 4  # test images logged as each registered version's input example


@dataclass(frozen=True)
class Release:
    """What every version registered by one export shares: params, data, commit, models, measured files."""

    cfg: Config
    dataset_digest: str
    git_commit: str
    models: Models
    shipment: Shipment

    def entry(self, role: str, name: str, artifact: str, tags: dict, description: str) -> Registration:
        """The Registration of one shipped file: common tags, its own numbers, then the role's `tags`."""
        from kdpipe.registry import Registration

        cfg, result = self.cfg, self.shipment.shipped()[role]
        tags = {"git_commit": self.git_commit, "dataset": cfg.data.dataset, "opset": cfg.export.opset,
                "method": cfg.distill.method, "role": role, "params_hash": result.params_hash,
                "latency_ms_b1": f"{result.latency.b1:.4f}", "latency_ms_b64": f"{result.latency.b64:.4f}", **tags}
        return Registration(name=name, onnx_path=result.path, artifact_name=artifact,
                            test_accuracy=result.accuracy, dataset_digest=self.dataset_digest,
                            tags={k: str(v) for k, v in tags.items()}, description=description)


def register(release: Release, test_images: Tensor, teacher_checkpoint: Path, *, int8: bool) -> dict[str, dict]:
    """Teacher, student and (with `int8`: within export.int8_max_accuracy_drop) int8 as new registry versions,
    each through the gate. Returns role → registry.register_onnx's record (version, aliases, champion, ...)."""
    from kdpipe.export import as_float01
    from kdpipe.registry import log_checkpoint, register_onnx

    example = as_float01(test_images[:EXAMPLE_IMAGES])  # (4, C, H, W) float32 [0, 1]
    checkpoint = log_checkpoint(teacher_checkpoint, artifact_path="teacher_checkpoint")
    registered = {"teacher": register_onnx(teacher_entry(release, checkpoint), example),
                  "student": register_onnx(student_entry(release), example)}
    if int8:
        registered["int8"] = register_onnx(int8_entry(release, registered["student"]["version"]), example)
    return registered


def teacher_entry(release: Release, checkpoint: str) -> Registration:
    """The teacher, with the runs:/ URI of its kdpipe checkpoint for reuse."""
    from kdpipe.registry import CHECKPOINT_TAG

    cfg, models, source = release.cfg, release.models, release.models.teacher_source
    return release.entry(
        "teacher", cfg.export.teacher_registered_model, "teacher",
        {"model": models.teacher.name, "teacher_source": source, CHECKPOINT_TAG: checkpoint},
        f"kdpipe teacher {models.teacher.name} (teacher.source: {source}) on {cfg.data.dataset}; the teacher of "
        f"{cfg.distill.method} distillation into {models.student.name}. The kdpipe checkpoint for reuse "
        f"(teacher.source: registry) is {checkpoint}.")


def student_tags(release: Release) -> dict:
    """The tags the fp32 and int8 students share."""
    return {"model": release.models.student.name, "student_seed": release.models.seed,
            "teacher_model": release.models.teacher.name}


def student_entry(release: Release) -> Registration:
    """The fp32 student, with the seed that shipped."""
    cfg, models = release.cfg, release.models
    return release.entry(
        "student", cfg.export.registered_model, "student", student_tags(release),
        f"kdpipe student {models.student.name} distilled from teacher {models.teacher.name} with method "
        f"{cfg.distill.method} on {cfg.data.dataset} (seed {models.seed}, chosen by validation accuracy).")


def int8_entry(release: Release, fp32_version: str) -> Registration:
    """The int8 student, pointing at the fp32 version it was quantised from."""
    cfg, models = release.cfg, release.models
    tags = {**student_tags(release), "quantization": "static int8 (QDQ, MinMax)",
            "int8_accuracy_drop": f"{release.shipment.int8_drop:.6f}", "fp32_version": fp32_version}
    return release.entry(
        "int8", f"{cfg.export.registered_model}-int8", "student_int8", tags,
        f"int8 (static QDQ) of kdpipe student {models.student.name} distilled from teacher {models.teacher.name} "
        f"with method {cfg.distill.method} on {cfg.data.dataset} (seed {models.seed}); fp32 version "
        f"{fp32_version}.")
