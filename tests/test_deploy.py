"""Deployments that run as shipped: `make deploy` refuses, in one line naming `make remote`, while deployments
pull from or push to a DVC remote the checkout does not have; the workers' install step installs the clone's
dependencies only, never the package (an editable install re-pointed a checkout's venv at a throwaway clone)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
if str(REPO) not in sys.path:  # `flows` is a folder at the repo root, not an installed package
    sys.path.insert(0, str(REPO))

from flows import source  # noqa: E402


def checkout(tmp_path: Path) -> Path:
    """A DVC workspace holding what `make deploy` reads: prefect.yaml and flows/; no DVC remote."""
    root = tmp_path / "checkout"
    shutil.copytree(REPO / "flows", root / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "prefect.yaml", root / "prefect.yaml")
    subprocess.run([str(BIN / "dvc"), "init", "-q", "--no-scm"], cwd=root, check=True)
    return root


def make_deploy(root: Path) -> subprocess.CompletedProcess:
    """The repo's Makefile's deploy, its venv step skipped, against an API URL nothing listens on (the refusal
    comes before any call to it)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PREFECT_API_URL": "http://127.0.0.1:9/api",
           "PREFECT_HOME": str(root / ".prefect")}
    return subprocess.run(["make", "-s", "-f", str(REPO / "Makefile"), "-o", "venv", "deploy"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def test_make_deploy_refuses_without_a_dvc_remote_in_one_line(tmp_path):
    root = checkout(tmp_path)
    out = make_deploy(root)
    first = out.stderr.splitlines()[0]
    assert out.returncode != 0 and first.startswith("make deploy: deployments nightly, sweep pull from"), out.stderr
    assert "`dvc remote default` is empty" in first and "make remote REMOTE=" in first
    assert "prefect" not in out.stdout  # nothing was registered or created


def test_check_remote_passes_once_a_default_remote_is_set(tmp_path, monkeypatch):
    root = checkout(tmp_path)
    with pytest.raises(SystemExit, match="make remote"):
        source.check_remote(root)
    subprocess.run([str(BIN / "dvc"), "remote", "add", "-d", "store", str(tmp_path / "remote")], cwd=root, check=True)
    source.check_remote(root)  # no refusal
    monkeypatch.setattr(source, "remote_users", lambda path: [])
    shutil.rmtree(root / ".dvc")
    source.check_remote(root)  # no deployment uses a remote: none needed


def test_the_install_step_installs_dependencies_never_the_package(tmp_path, monkeypatch):
    """The pull step runs flows.source install: pip gets pyproject's dependency list, no -e and no path, so the
    kdpipe a checkout's venv imports stays the checkout's."""
    import tomllib

    ran = []
    monkeypatch.setattr(source.subprocess, "run", lambda cmd, check: ran.append(cmd))
    cmd = source.install(REPO)
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert ran == [cmd] and cmd[1:5] == ["-m", "pip", "install", "-q"] and cmd[5:] == deps
    assert "-e" not in cmd and not any(arg in (".", str(REPO)) or arg.startswith(("/", "./")) for arg in cmd[1:])
    script = (REPO / "prefect.yaml").read_text()
    assert "python -m flows.source install" in script and "pip install -q -e ." not in script
