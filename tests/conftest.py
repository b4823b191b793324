"""Shared fixtures: tiny params in a temp workspace, an isolated MLflow store, a subprocess environment."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]

# Tests train tiny models: one thread each is as fast, and immune to the barrier thrashing that two
# multi-threaded jobs on a 2-core machine suffer. Stage processes started by tests inherit it.
os.environ.setdefault("KDPIPE_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["KDPIPE_THREADS"]))


def tiny_params(workdir: Path, **overrides) -> dict:
    """The repo's params.yaml shrunk for tests, with every path inside `workdir`."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["teacher"].update(model="small_cnn", epochs=2, batch_size=128, patience=0)
    params["student"].update(model="small_cnn", epochs=2, batch_size=128, patience=0)
    params["paths"] = {k: str(workdir / v) for k, v in params["paths"].items()}
    params["tracking"]["uri"] = f"sqlite:///{workdir / 'mlflow.db'}"
    for dotted, value in overrides.items():
        section, _, key = dotted.partition("__")
        if key:
            params[section][key] = value
        else:
            params[section] = value
    return params


def write_params(path: Path, params: dict) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A temp working directory with no MLFLOW_TRACKING_URI leaking in from the environment."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment a stage process gets under DVC: this venv first on PATH, telemetry off."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true", KDPIPE_DEVICE="cpu")
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra)
    return env
