"""MLflow model registry, reading back: parse `models:/` URIs, check the store, resolve aliases, and fetch
registered files (a teacher checkpoint, an ONNX model).

With kdpipe/store.py, kdpipe/tracking.py and kdpipe/ship/registrations.py, the only code that imports mlflow. It imports it
inside functions, through `store.import_mlflow`, and never imports torch: `kdpipe predict` downloads
registered models through it without torch. Registering lives in kdpipe/ship/registrations.py, the
promotion rule in kdpipe/ship/gate.py.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

CHECKPOINT_TAG = "checkpoint_artifact"  # on teacher versions: runs:/ URI of the kdpipe checkpoint (.pt)
ONNX_FILE = "model.onnx"  # where the ONNX flavour keeps the model inside a logged MLflow model
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+|latest))$")


class RegistryError(Exception):
    """A registry lookup that failed: the message is one line naming the URI and what is missing. `instead`: for
    an alias no version holds, the alias of the latest version (e.g. candidate), what a caller may offer."""

    def __init__(self, message: str, instead: str | None = None):
        super().__init__(message)
        self.instead = instead


def mlflow_module():
    """mlflow as the tracking layer sets it up (telemetry off, INFO chatter hushed), without download
    progress bars."""
    import os

    from kdpipe.store import import_mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return import_mlflow()


# ---------------------------------------------------------------------------------------------------------
# Registering


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
    from kdpipe.store import sqlite_path

    path = sqlite_path(tracking_uri)
    if path is not None and not path.is_file():
        raise RegistryError(f"{tracking_uri}: no MLflow store at {path}; point the tracking URI at the store "
                            "that holds the registry")


def resolve(uri: str, tracking_uri: str):
    """The ModelVersion a models:/ URI names, or RegistryError naming the URI and the store."""
    mlflow = mlflow_module()
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_uri(uri)
    require_store(tracking_uri)
    try:
        client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        if alias:
            try:
                return client.get_model_version_by_alias(name, alias)
            except MlflowException:
                raise RegistryError(*missing_alias(client, name, alias, uri, tracking_uri)) from None
        if version == "latest":
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise RegistryError(f"{uri}: registered model {name!r} has no versions (registry {tracking_uri})")
            return max(versions, key=lambda v: int(v.version))
        return client.get_model_version(name, version)
    except MlflowException as e:
        first = str(e.message if hasattr(e, "message") else e).strip().splitlines()[0]
        raise RegistryError(f"{uri}: not found in the registry at {tracking_uri} ({first})") from None


def missing_alias(client, name: str, alias: str, uri: str, tracking_uri: str) -> tuple[str, str | None]:
    """(one line saying why no version holds `alias`, the latest version's other alias or None): the latest
    version's aliases and its promotion_reason tag (the gate's reason for not crowning it), and what names it."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        versions = []
    if not versions:
        return f"{uri}: not found: registered model {name!r} has no versions in the registry at {tracking_uri}", None
    latest = max(versions, key=lambda v: int(v.version))
    held = sorted(a for a, v in client.get_registered_model(name).aliases.items() if str(v) == str(latest.version))
    why = latest.tags.get("promotion_reason", "no reason recorded")
    instead = next((a for a in ("candidate", "champion") if a in held and a != alias), None)
    names = f"models:/{name}@{instead}" if instead else f"models:/{name}/{latest.version}"
    return (f"{uri}: not found: no version of {name!r} holds alias {alias!r} (registry {tracking_uri}); the latest, "
            f"v{latest.version} ({', '.join(held) or 'no alias'}), was not crowned: {why}; {names} names it"), instead


def download_teacher_checkpoint(uri: str, tracking_uri: str, dst: str | Path) -> Path:
    """The kdpipe teacher checkpoint that the export stage logged next to a registered teacher version."""
    version = resolve(uri, tracking_uri)
    source = version.tags.get(CHECKPOINT_TAG)
    if not source:
        raise RegistryError(f"{uri}: version {version.version} has no {CHECKPOINT_TAG} tag, so no kdpipe "
                            "checkpoint to reuse (register teachers with the export stage)")
    return _download(uri, source, dst, tracking_uri)


def download_onnx(uri: str, tracking_uri: str, dst: str | Path | None = None) -> Path:
    """The model.onnx file of a registered version (the ONNX flavour's, or a text pyfunc's artifact), downloaded
    into `dst` (a new temp dir by default)."""
    mlflow = mlflow_module()
    version = resolve(uri, tracking_uri)
    dst = Path(dst or tempfile.mkdtemp(prefix="kdpipe-model-"))
    # The artifact location, asked of this store: a models:/ URI given to download_artifacts is resolved in
    # mlflow's global registry (./mlflow.db when none is set), whatever tracking_uri says.
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    source = client.get_model_version_download_uri(version.name, version.version)
    root = _download(uri, source, dst, tracking_uri)
    path = root / ONNX_FILE if (root / ONNX_FILE).is_file() else root / "artifacts" / ONNX_FILE  # the text pyfunc's
    if not path.is_file():
        raise RegistryError(f"{uri}: version {version.version} holds no {ONNX_FILE} (not a kdpipe ONNX or text model)")
    return path


def _download(uri: str, source: str, dst: str | Path, tracking_uri: str) -> Path:
    """The artifact `source` (a file, folder or runs:/ URI) downloaded into `dst`; RegistryError naming the
    registry `uri` it belongs to when it cannot be."""
    from kdpipe.store import sqlite_path
    from kdpipe.store_moves import rebased

    mlflow = mlflow_module()
    source = rebased(source, sqlite_path(tracking_uri))  # a moved checkout's store: its own artifacts, nothing written
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst),
                                                        tracking_uri=tracking_uri))
    except Exception as e:  # noqa: BLE001 - missing artifacts surface as several exception types
        raise RegistryError(f"{uri}: cannot download {source} ({type(e).__name__})") from None
