"""MLflow model registry: versions, tags, the candidate/champion aliases, and fetching registered files back.

Part of the tracking layer: with kdpipe/tracking.py, this is the only code that imports mlflow. It imports it
inside functions, through `tracking.import_mlflow`, and never imports torch: `kdpipe predict` downloads
registered models through it without torch.

The promotion rule and its lock live in kdpipe/gate.py; `register_onnx` applies it to every new version.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

CHECKPOINT_TAG = "checkpoint_artifact"  # on teacher versions: runs:/ URI of the kdpipe checkpoint (.pt)
ONNX_FILE = "model.onnx"  # where the ONNX flavour keeps the model inside a logged MLflow model
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+|latest))$")


class RegistryError(Exception):
    """A registry lookup that failed: the message is one line naming the URI and what is missing."""


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


def _mlflow():
    """mlflow as the tracking layer sets it up (telemetry off, INFO chatter hushed), without download
    progress bars."""
    import os

    from kdpipe.tracking import import_mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return import_mlflow()


# ---------------------------------------------------------------------------------------------------------
# Registering


def pip_requirements() -> list[str]:
    """Pinned onnx + onnxruntime, read from the installed packages: given explicitly, MLflow skips its ~10 s
    inference of requirements."""
    _mlflow()
    import mlflow.onnx

    return mlflow.onnx.get_default_pip_requirements()


def register_onnx(entry: Registration, input_example, *, parity_passed: bool = True) -> dict:
    """Log `entry.onnx_path` with the ONNX flavour into the active run, register it as a new version of
    `entry.name` with its tags and description, then apply the gate. Returns apply_gate's dict.

    input_example: a few images, float32 [0, 1] (N, C, H, W); the signature is inferred from it and the
    model's logits. The ONNX file is loaded fresh here: `mlflow.onnx.log_model` mutates the object it gets.
    """
    import onnx

    _mlflow()
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
    from kdpipe.gate import apply_gate

    return apply_gate(client, entry.name, version, parity_passed=parity_passed)


def _run_onnx(path: Path, images):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})[0]


def log_checkpoint(path: Path, artifact_path: str = "checkpoint") -> str:
    """Log a file into the active run; returns its runs:/ URI (what a version's checkpoint tag records)."""
    mlflow = _mlflow()
    mlflow.log_artifact(str(path), artifact_path=artifact_path)
    return f"runs:/{mlflow.active_run().info.run_id}/{artifact_path}/{Path(path).name}"


# ---------------------------------------------------------------------------------------------------------
# Reading back


def parse_uri(uri: str) -> tuple[str, str | None, str | None]:
    """models:/name@alias → (name, alias, None); models:/name/3 or /latest → (name, None, "3" | "latest")."""
    match = _URI.match(uri.strip())
    if not match:
        raise RegistryError(f"{uri}: not a registry URI; use models:/<name>@<alias> or models:/<name>/<version>")
    return match["name"], match["alias"], match["version"]


def require_store(tracking_uri: str) -> None:
    """RegistryError unless a sqlite store exists: MLflow would create an empty one (a new mlflow.db wherever
    the URI points) and then report the model missing from it."""
    from kdpipe.tracking import sqlite_path

    path = sqlite_path(tracking_uri)
    if path is not None and not path.is_file():
        raise RegistryError(f"{tracking_uri}: no MLflow store at {path}; point the tracking URI at the store "
                            "that holds the registry")


def resolve(uri: str, tracking_uri: str):
    """The ModelVersion a models:/ URI names, or RegistryError naming the URI and the store."""
    mlflow = _mlflow()
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_uri(uri)
    require_store(tracking_uri)
    try:
        client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        if alias:
            return client.get_model_version_by_alias(name, alias)
        if version == "latest":
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise RegistryError(f"{uri}: registered model {name!r} has no versions (registry {tracking_uri})")
            return max(versions, key=lambda v: int(v.version))
        return client.get_model_version(name, version)
    except MlflowException as e:
        first = str(e.message if hasattr(e, "message") else e).strip().splitlines()[0]
        raise RegistryError(f"{uri}: not found in the registry at {tracking_uri} ({first})") from None


def download_teacher_checkpoint(uri: str, tracking_uri: str, dst: str | Path) -> Path:
    """The kdpipe teacher checkpoint that the export stage logged next to a registered teacher version."""
    version = resolve(uri, tracking_uri)
    source = version.tags.get(CHECKPOINT_TAG)
    if not source:
        raise RegistryError(f"{uri}: version {version.version} has no {CHECKPOINT_TAG} tag, so no kdpipe "
                            "checkpoint to reuse (register teachers with the export stage)")
    return _download(uri, source, dst, tracking_uri)


def download_onnx(uri: str, tracking_uri: str, dst: str | Path | None = None) -> Path:
    """The model.onnx file of a registered version, downloaded into `dst` (a new temp dir by default)."""
    mlflow = _mlflow()
    version = resolve(uri, tracking_uri)
    dst = Path(dst or tempfile.mkdtemp(prefix="kdpipe-model-"))
    # The artifact location, asked of this store: a models:/ URI given to download_artifacts is resolved in
    # mlflow's global registry (./mlflow.db when none is set), whatever tracking_uri says.
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    source = client.get_model_version_download_uri(version.name, version.version)
    path = _download(uri, source, dst, tracking_uri) / ONNX_FILE
    if not path.is_file():
        raise RegistryError(f"{uri}: version {version.version} holds no {ONNX_FILE} (not an ONNX-flavour model)")
    return path


def _download(uri: str, source: str, dst: str | Path, tracking_uri: str) -> Path:
    """The artifact `source` (a file, folder or runs:/ URI) downloaded into `dst`; RegistryError naming the
    registry `uri` it belongs to when it cannot be."""
    mlflow = _mlflow()
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst),
                                                        tracking_uri=tracking_uri))
    except Exception as e:  # noqa: BLE001 - missing artifacts surface as several exception types
        raise RegistryError(f"{uri}: cannot download {source} ({type(e).__name__})") from None
