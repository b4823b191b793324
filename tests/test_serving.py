"""Serving the champion as docs/shipping.md says: `mlflow models serve -m models:/kdpipe-student@champion
--env-manager local` on 127.0.0.1 against the tiny pipeline's store answers REST /invocations with exactly the
logits onnxruntime gives for the same ONNX file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime
from conftest import subprocess_env
from test_registry_server import free_port, wait_healthy

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


def test_the_served_champion_answers_with_onnxruntimes_logits(tiny_pipeline, tmp_path):
    uri = tiny_pipeline.cfg.tracking.uri
    onnx_path = registry.download_onnx(f"models:/{STUDENT}@champion", uri, tmp_path / "champion")
    images = load_prepared(tiny_pipeline.work / "data/prepared/dataset.pt")["test_x"][:32].numpy()
    images = images.astype(np.float32) / 255  # (32, 1, 8, 8) in [0, 1], as the model card says
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"images": images})[0]
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", f"models:/{STUDENT}@champion",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tiny_pipeline.work, env=subprocess_env(MLFLOW_TRACKING_URI=uri), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, start_new_session=True)  # its own group: uvicorn is a child
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
