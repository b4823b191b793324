"""Serving the champion as docs/shipping.md says (`make serve`: `kdpipe store`, then `mlflow models serve -m
models:/kdpipe-student@champion --env-manager local` on 127.0.0.1) from a copy of the tiny pipeline's checkout in
another folder: the copy's store is pointed at its own artifacts, and REST /invocations answers with exactly the
logits onnxruntime gives for the same ONNX file."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from conftest import subprocess_env
from test_registry_server import free_port, wait_healthy

from kdpipe import store_moves
from kdpipe.data.prepared import load_prepared
from kdpipe.ship import registry

STUDENT = "kdpipe-student"
START_TIMEOUT_S = 120  # ~10 s on an idle 2-core machine


def invoke(base: str, images: np.ndarray) -> np.ndarray:
    """POST /invocations as the README's curl call does; the logits it answers."""
    body = json.dumps({"inputs": images.tolist()}).encode()
    request = urllib.request.Request(f"{base}/invocations", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return np.asarray(json.loads(response.read())["predictions"]["logits"], dtype=np.float32)


def stored_locations(db: Path) -> list[str]:
    """Every artifact location a sqlite store holds (store_moves.LOCATION_COLUMNS), read straight from the file."""
    with sqlite3.connect(db) as conn:
        return [value for table, column in store_moves.LOCATION_COLUMNS
                for (value,) in conn.execute(f"SELECT {column} FROM {table}") if value]


@pytest.mark.slow
def test_a_moved_checkout_serves_its_own_champion_with_onnxruntimes_logits(tiny_pipeline, tmp_path):
    original = tiny_pipeline.work
    moved = tmp_path / "moved"
    shutil.copytree(original, moved)
    before = stored_locations(moved / "mlflow.db")
    assert any(v.startswith(original.as_uri() + "/") for v in before), before  # MLflow keeps them absolute
    uri = f"sqlite:///{moved / 'mlflow.db'}"
    env = subprocess_env(MLFLOW_TRACKING_URI=uri)
    done = subprocess.run([str(Path(sys.executable).parent / "kdpipe"), "store"], cwd=moved, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == uri, done.stderr
    assert f"was moved from {original.resolve()}" in done.stderr, done.stderr
    after = stored_locations(moved / "mlflow.db")
    assert len(after) == len(before) and not any(str(original) in v for v in after), after
    assert all(v.startswith((moved.as_uri() + "/", f"{moved}/", "models:/")) for v in after), after

    onnx_path = registry.download_onnx(f"models:/{STUDENT}@champion", uri, tmp_path / "champion")
    images = load_prepared(moved / "data/prepared/dataset.pt")["test_x"][:32].numpy()
    images = images.astype(np.float32) / 255  # (32, 1, 8, 8) in [0, 1], as the model card says
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"images": images})[0]
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", f"models:/{STUDENT}@champion",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
        cwd=moved, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True)  # its own group: uvicorn is a child
    try:
        wait_healthy(f"http://127.0.0.1:{port}", server, route="/ping", timeout_s=START_TIMEOUT_S,
                     what="mlflow models serve")
        served = invoke(f"http://127.0.0.1:{port}", images)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    np.testing.assert_allclose(served, expected, rtol=0, atol=1e-6)
    assert (served.argmax(1) == expected.argmax(1)).all()
