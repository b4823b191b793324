"""The registry as a team sees it: a real `mlflow server` over a store where kdpipe.ship.registry registered two
versions of a tiny ONNX model; the REST API reports the model and where its aliases point."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import subprocess_env

from kdpipe.models.zoo import build_model
from kdpipe.ship import registrations
from kdpipe.ship.onnx_export import export_onnx

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
NAME = "kdpipe-student"
HEALTH_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(base: str, path: str) -> dict:
    with urllib.request.urlopen(f"{base}{path}", timeout=10) as response:
        return json.loads(response.read() or b"{}")


def populate(store: Path, folder: Path) -> None:
    """Two versions through kdpipe.ship.registry: v1 (acc 0.9) takes champion, v2 (acc 0.8) only candidate."""
    uri = f"sqlite:///{store}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("kdpipe", artifact_location=(folder / "mlartifacts").as_uri())
    torch.manual_seed(0)
    onnx_path = export_onnx(build_model("tiny_cnn", 1, 10), folder / "tiny.onnx", (1, 8, 8), metadata={})
    example = torch.rand(2, 1, 8, 8).numpy()
    with mlflow.start_run(experiment_id=experiment):
        for accuracy in (0.9, 0.8):
            entry = registrations.Registration(name=NAME, onnx_path=onnx_path, artifact_name="student",
                                          test_accuracy=accuracy, dataset_digest="d1", tags={"method": "kd"},
                                          val_accuracy=accuracy)
            registrations.register_onnx(entry, example)


def wait_healthy(base: str, server: subprocess.Popen, *, route: str = "/health", timeout_s: float = HEALTH_TIMEOUT_S,
                 what: str = "mlflow server") -> None:
    """Until `base + route` answers 200; a test failure naming `what` when the server exits or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            stderr = server.stderr.read()[-2000:] if server.stderr else ""
            pytest.fail(f"{what} exited with {server.returncode}: {stderr}")
        try:
            with urllib.request.urlopen(f"{base}{route}", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"{what} not answering {route} after {timeout_s} s")


def stop(server: subprocess.Popen) -> None:
    """The server and its workers: the whole process group it leads."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=15)


def test_registered_model_and_aliases_over_rest(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = tmp_path / "mlflow.db"
    populate(store, tmp_path)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    mlflow_cli = str(Path(sys.executable).parent / "mlflow")
    server = subprocess.Popen(
        [mlflow_cli, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{store}"],
        cwd=tmp_path, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group, so stop() reaches the workers too
    )
    try:
        wait_healthy(base, server)
        model = get(base, f"/api/2.0/mlflow/registered-models/get?name={NAME}")["registered_model"]
        aliases = {a["alias"]: a["version"] for a in model["aliases"]}
        assert aliases == {"champion": "1", "candidate": "2"}
        champion = get(base, f"/api/2.0/mlflow/registered-models/alias?name={NAME}&alias=champion")["model_version"]
        assert champion["version"] == "1"
        tags = {t["key"]: t["value"] for t in champion["tags"]}
        assert tags["test_accuracy"] == "0.900000" and tags["dataset_digest"] == "d1" and tags["method"] == "kd"
        assert tags["val_accuracy"] == "0.900000" and tags["promotion_reason"] == "no champion yet"
    finally:
        stop(server)
