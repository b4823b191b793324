"""Registering the export stage's versions: teacher, student and int8 described and tagged from the typed export
results, logged with MLflow's ONNX flavour and registered, each through the candidate/champion gate of
kdpipe/ship/gate.py.

The teacher's kdpipe checkpoint is logged beside its version (tag `checkpoint_artifact`), so a later run can
reuse it with teacher.source: registry. mlflow is imported inside functions, through registry.mlflow_module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kdpipe.ship.gate import apply_gate
from kdpipe.ship.registry import mlflow_module

if TYPE_CHECKING:
    from torch import Tensor

    from kdpipe.config import Config
    from kdpipe.ship.shipping import Models, Shipment

@dataclass(frozen=True)
class Registration:
    """One ONNX model to register: the file, the registered-model name, version tags, a description."""

    name: str
    onnx_path: Path
    artifact_name: str  # the logged model's name inside the run, e.g. "student"
    test_accuracy: float
    dataset_digest: str
    tags: dict[str, str] = field(default_factory=dict)
    description: str = ""


def pip_requirements() -> list[str]:
    """Pinned onnx + onnxruntime, read from the installed packages: given explicitly, MLflow skips its ~10 s
    inference of requirements."""
    mlflow_module()
    import mlflow.onnx

    return mlflow.onnx.get_default_pip_requirements()


def register_onnx(entry: Registration, input_example, *, parity_passed: bool = True) -> dict:
    """Log `entry.onnx_path` with the ONNX flavour into the active run, register it as a new version of
    `entry.name` with its tags and description, then apply the gate. Returns apply_gate's dict.

    input_example: a few images, float32 [0, 1] (N, C, H, W); the signature is inferred from it and the
    model's logits. The ONNX file is loaded fresh here: `mlflow.onnx.log_model` mutates the object it gets.
    """
    import onnx

    mlflow_module()
    import mlflow.onnx
    from mlflow.models import infer_signature

    logits = _run_onnx(entry.onnx_path, input_example)
    info = mlflow.onnx.log_model(
        onnx.load(entry.onnx_path), name=entry.artifact_name, registered_model_name=entry.name,
        signature=infer_signature(input_example, {"logits": logits}), input_example=input_example,
        pip_requirements=pip_requirements(), onnx_execution_providers=["CPUExecutionProvider"],
        save_as_external_data=False,  # one self-contained model.onnx, as exported
    )
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    tags = {**entry.tags, "test_accuracy": f"{entry.test_accuracy:.6f}", "dataset_digest": entry.dataset_digest}
    for key, value in tags.items():
        client.set_model_version_tag(entry.name, version, key, str(value))
    if entry.description:
        client.update_model_version(entry.name, version, description=entry.description)
    return apply_gate(client, entry.name, version, parity_passed=parity_passed)


def _run_onnx(path: Path, images):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})[0]


def log_checkpoint(path: Path, artifact_path: str = "checkpoint") -> str:
    """Log a file into the active run; returns its runs:/ URI (what a version's checkpoint tag records)."""
    mlflow = mlflow_module()
    mlflow.log_artifact(str(path), artifact_path=artifact_path)
    return f"runs:/{mlflow.active_run().info.run_id}/{artifact_path}/{Path(path).name}"


EXAMPLE_IMAGES = 4  # test images logged as each registered version's input example


@dataclass(frozen=True)
class Release:
    """What every version registered by one export shares: params, data, commit, models, measured files."""

    cfg: Config
    dataset_digest: str
    git_commit: str
    models: Models
    shipment: Shipment
    chance_accuracy: float | None = None  # the majority class's share of the test split: the gate's chance level

    def entry(self, role: str, name: str, artifact: str, tags: dict, description: str) -> Registration:
        """The Registration of one shipped file: common tags, its own numbers, then the role's `tags`."""
        cfg, result = self.cfg, self.shipment.shipped()[role]
        tags = {"git_commit": self.git_commit, "dataset": cfg.data.dataset, "opset": cfg.export.opset,
                "method": cfg.distill.method, "role": role, "params_hash": result.params_hash,
                "latency_ms_b1": f"{result.latency.b1:.4f}", "latency_ms_b64": f"{result.latency.b64:.4f}", **tags}
        if self.chance_accuracy is not None:
            tags["chance_accuracy"] = f"{self.chance_accuracy:.6f}"
        return Registration(name=name, onnx_path=result.path, artifact_name=artifact,
                            test_accuracy=result.accuracy, dataset_digest=self.dataset_digest,
                            tags={k: str(v) for k, v in tags.items()}, description=description)


def register(release: Release, test_images: Tensor, teacher_checkpoint: Path, *, int8: bool) -> dict[str, dict]:
    """Teacher, student and (with `int8`: within export.int8_max_accuracy_drop) int8 as new registry versions,
    each through the gate. Returns role → registry.register_onnx's record (version, aliases, champion, ...)."""
    from kdpipe.ship.onnx_export import as_float01

    example = as_float01(test_images[:EXAMPLE_IMAGES])  # (4, C, H, W) float32 [0, 1]
    checkpoint = log_checkpoint(teacher_checkpoint, artifact_path="teacher_checkpoint")
    registered = {"teacher": register_onnx(teacher_entry(release, checkpoint), example),
                  "student": register_onnx(student_entry(release), example)}
    if int8:
        registered["int8"] = register_onnx(int8_entry(release, registered["student"]["version"]), example)
    return registered


def teacher_entry(release: Release, checkpoint: str) -> Registration:
    """The teacher, with the runs:/ URI of its kdpipe checkpoint for reuse."""
    from kdpipe.ship.registry import CHECKPOINT_TAG

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


ORPHAN_TAG = "orphan"  # on a version whose export run never finished: why, and which run found it


def tag_orphans(dead_runs: list[str], by_run: str) -> list[str]:
    """Tag the registry versions that export runs killed mid-way registered (`dead_runs`: marked KILLED by
    tracking.reap_dead_runs), so that every version belongs to a finished run or says why not; "name vN" of each.
    They stay loadable (a version is registered only once its model is logged), and the gate keeps judging them."""
    mlflow = mlflow_module()
    client, tagged = mlflow.MlflowClient(), []
    for run_id in dead_runs:
        for version in client.search_model_versions(f"run_id = '{run_id}'"):
            client.set_model_version_tag(version.name, version.version, ORPHAN_TAG,
                                         f"registered by export run {run_id}, which was killed before it finished "
                                         f"(no metrics/export.json); export run {by_run} registered again")
            tagged.append(f"{version.name} v{version.version}")
    return tagged
