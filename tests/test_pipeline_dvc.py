"""The real pipeline under DVC in a fresh git repo: default params, no-op rerun, experiments, metrics, plots.

This is the README's `make run` path (minus venv set-up), so it is marked slow; CI still runs it.
"""

from __future__ import annotations

import json
import subprocess
import time

import mlflow
import pytest
from conftest import subprocess_env
from projectcopy import copy_project

pytestmark = pytest.mark.slow



def _sh(cmd: list[str], cwd, timeout: int = 900) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A fresh repo holding the project files (as a clone has them), one commit, no outputs yet."""
    root = copy_project(tmp_path_factory.mktemp("clone"))
    _sh(["git", "init", "-q"], root)
    _sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A"], root)
    _sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], root)
    _sh(["git", "config", "user.name", "kdpipe test"], root)
    _sh(["git", "config", "user.email", "test@kdpipe.invalid"], root)
    t0 = time.perf_counter()
    first = _sh(["dvc", "repro"], root)
    return root, first, time.perf_counter() - t0


def test_default_pipeline_meets_the_teacher_bar(clone):
    root, first, seconds = clone
    assert "Running stage 'prepare'" in first.stdout and "Running stage 'teacher'" in first.stdout
    metrics = json.loads((root / "metrics/teacher.json").read_text())
    assert metrics["test_accuracy"] >= 0.97, metrics
    print(f"default pipeline: {seconds:.0f} s, teacher test_accuracy {metrics['test_accuracy']:.4f}")


def test_mlflow_store_is_at_repo_root_and_not_a_dvc_output(clone):
    root, *_ = clone
    assert (root / "mlflow.db").is_file() and (root / "mlartifacts").is_dir()
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    names = {r.info.run_name for r in mlflow.search_runs(experiment_names=["kdpipe"], output_format="list")}
    assert {"prepare", "teacher"} <= names
    lock = (root / "dvc.lock").read_text()  # every DVC output is listed here
    assert "mlflow" not in lock and "mlartifacts" not in lock


def test_second_repro_is_up_to_date_and_fast(clone):
    root, *_ = clone
    t0 = time.perf_counter()
    out = _sh(["dvc", "repro"], root)
    seconds = time.perf_counter() - t0
    assert "Data and pipelines are up to date." in out.stdout, out.stdout
    assert "Running stage" not in out.stdout
    assert seconds < 15, seconds


def test_metrics_and_plots_show(clone, tmp_path):
    root, *_ = clone
    shown = json.loads(_sh(["dvc", "metrics", "show", "--json"], root).stdout)
    assert "test_accuracy" in json.dumps(shown)
    _sh(["dvc", "plots", "show", "-o", str(tmp_path / "plots")], root)
    assert (tmp_path / "plots" / "index.html").stat().st_size > 0


def test_exp_run_with_override_shows_in_exp_show(clone):
    root, *_ = clone
    _sh(["git", "add", "-A"], root)
    _sh(["git", "commit", "-qm", "baseline results"], root)
    _sh(["dvc", "exp", "run", "-S", "teacher.epochs=2", "-n", "two-epochs"], root)
    table = json.loads(_sh(["dvc", "exp", "show", "--json"], root).stdout)
    text = json.dumps(table)
    assert "two-epochs" in text
    # The workspace now holds the experiment's result: 2 epochs of training.
    assert json.loads((root / "metrics/teacher.json").read_text())["epochs_run"] == 2
