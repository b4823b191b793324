"""Shared fixtures: tiny params in a temp workspace, an isolated MLflow store, a subprocess environment, the
tiny pipeline run once in-process (`tiny_pipeline`) and once under DVC in a fresh git repo (`dvc_repo`)."""

from __future__ import annotations

import copy
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

# kdpipe.store takes MLFLOW_TRACKING_URI at its first import as the user's choice (mlflow.set_tracking_uri writes
# the variable later); imported first inside a test that had set it, it took that test's store for the rest of
# the worker (the tiny pipeline's stages then logged there). Imported here, it takes the session's.
from kdpipe import store  # noqa: F401, E402
from kdpipe.env import QUIET_ENV

REPO = Path(__file__).resolve().parents[1]
# bench/projectcopy.py copies the project as a fresh clone has it. It lives in bench/ because a benchmark must
# not import the tests; the tests reach it through this path entry.
sys.path.append(str(REPO / "bench"))
from projectcopy import copy_project, shrink  # noqa: E402

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
    return with_overrides(params, **overrides)


def with_overrides(params: dict, **overrides) -> dict:
    """`section__key=value` sets params[section][key]; `section=value` replaces a whole section."""
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


def dvc_stage_names() -> list[str]:
    """The pipeline's stages in dvc.yaml's order (each declared after the stages it depends on)."""
    return list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])


# MLFLOW_TRACKING_URI as pytest started with it (CI: unset).
SESSION_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


def _restore_session_tracking_uri() -> None:
    if SESSION_TRACKING_URI is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = SESSION_TRACKING_URI


@pytest.fixture(autouse=True)
def _tracking_uri_restored():
    """MLFLOW_TRACKING_URI as the session started with it, before each test and after it. mlflow.set_tracking_uri
    (every stage calls it) exports the variable, and it outranks tracking.uri: a test that deleted an absent
    variable with monkeypatch had nothing recorded to restore, and a module fixture that called set_tracking_uri
    ran before this fixture's setup, so either leaked a store's URI into later tests on the worker (an export
    whose run went to another test's store). Set before the test too: after the module fixtures, before its own."""
    _restore_session_tracking_uri()
    yield
    _restore_session_tracking_uri()


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A temp working directory with no MLFLOW_TRACKING_URI leaking in from the environment."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment a stage process gets under DVC: this venv first on PATH, telemetry off, CPU."""
    env = {**os.environ, **QUIET_ENV, "KDPIPE_DEVICE": "cpu"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra)
    return env


# ------------------------------------------------------------------------ the tiny pipeline, in-process

SEEDS = [0, 1]


@dataclass(frozen=True)
class TinyPipeline:
    """Every stage run once on digits into `work`: the params (also written to `params_path`), the validated
    config, what each stage's run() returned, and the MLflow run id each stage created."""

    work: Path
    params: dict
    params_path: Path
    cfg: object  # kdpipe.config.Config
    results: dict  # stage name -> what its run(cfg) returned
    run_ids: dict  # stage name -> MLflow run id

    def params_with(self, **overrides) -> dict:
        """A deep copy of the pipeline's params with `section__key=value` overrides."""
        return with_overrides(copy.deepcopy(self.params), **overrides)

    def workspace(self, root: Path, **overrides) -> dict:
        """params_with(overrides) on the pipeline's prepared data, with the outputs, resume state and MLflow store
        under `root`, where the pipeline's teacher is copied: stages run there leave the shared outputs alone."""
        params = self.params_with(**overrides)
        for key in ("models", "metrics", "plots", "reports", "resume"):
            params["paths"][key] = str(root / key)
        params["tracking"]["uri"] = f"sqlite:///{root / 'mlflow.db'}"
        (root / "models").mkdir(parents=True, exist_ok=True)
        shutil.copy2(self.work / "models/teacher.pt", root / "models/teacher.pt")
        return params


def tiny_pipeline_params(work: Path) -> dict:
    """2 epochs; a small_cnn teacher and two tiny_cnn students, batch 32 (~40 steps an epoch: models well
    above chance); short export measurements; every path and the sqlite store inside `work`. The int8 model is
    always registered (limit 1.0): whether a tiny student's int8 loses more than 0.01 of validation (1 image of
    270 is 0.0037) depends on the CPU's kernels; under CPU_PROFILE=avx2 it did and test_lineage's int8 checks
    found no int8 version (issue 33). The rule itself is checked in test_export_stage."""
    params = tiny_params(work)
    params["teacher"].update(batch_size=32)
    params["student"].update(model="tiny_cnn", seeds=SEEDS, batch_size=32)
    params["export"].update(latency_repeats=3, calibration_images=64, int8_max_accuracy_drop=1.0)
    return params


def rerun_params(work: Path, tmp_path: Path, monkeypatch, *, folders=("models", "metrics"), ignore=("*.onnx",),
                 **export_overrides) -> dict:
    """Params to rerun a stage in tmp_path on a copy of the tiny pipeline's `folders` (without `ignore`), reading
    its prepared data, with export.* overrides; tmp_path becomes the working directory and MLFLOW_TRACKING_URI is
    unset, so the stage logs to tmp_path's own store (the autouse fixture above restores the variable after)."""
    for folder in folders:
        shutil.copytree(work / folder, tmp_path / folder, ignore=shutil.ignore_patterns(*ignore))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = tiny_pipeline_params(tmp_path)
    params["paths"]["prepared"] = str(work / "data/prepared")
    params["export"].update(export_overrides)
    return params


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> TinyPipeline:
    """All stages once per session, in-process, in dvc.yaml's order, against the workspace's own sqlite store.

    The process's cwd and MLFLOW_TRACKING_URI are changed only while the stages run. Tests that run a stage
    again write into their own tmp_path (or assert that the shared outputs stayed as they were).
    """
    from kdpipe import config

    work = tmp_path_factory.mktemp("tiny_pipeline")
    params = tiny_pipeline_params(work)
    params_path = write_params(work / "params.yaml", params)
    cfg = config.load(params_path)
    results = {}
    user_uri = os.environ.pop("MLFLOW_TRACKING_URI", None)  # the stages log to tracking.uri; mlflow sets this
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(work)  # the MLflow artifact folder is created in the cwd, next to the store
            for stage in dvc_stage_names():
                results[stage] = importlib.import_module(f"kdpipe.stages.{stage}").run(cfg)
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        if user_uri is not None:
            os.environ["MLFLOW_TRACKING_URI"] = user_uri
    return TinyPipeline(work, params, params_path, cfg, results, _stage_run_ids(cfg))


def _stage_run_ids(cfg) -> dict[str, str]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id])
    names = [r.info.run_name for r in runs]
    assert sorted(names) == sorted(dvc_stage_names()), f"one MLflow run per stage expected, got {names}"
    return {r.info.run_name: r.info.run_id for r in runs}


# --------------------------------------------------------------------- the tiny pipeline under DVC, in git

def small_project_params(params: dict) -> dict:
    """projectcopy.shrink (tiny training everywhere), no system-metrics sampling, short export measurements."""
    params = shrink(params)
    params["tracking"]["system_metrics"] = False
    params["export"].update(latency_repeats=3, calibration_images=64)
    return params


def sh(cmd: list[str], cwd: Path, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    """Run a command with the stage environment; fail with its output's tail when it fails."""
    out = subprocess.run(cmd, cwd=cwd, env=subprocess_env(**env), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def dvc(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return sh([str(Path(sys.executable).parent / "dvc"), *args], cwd, timeout=timeout)


def dvc_status(root: Path) -> dict:
    return json.loads(dvc("status", "--json", cwd=root).stdout or "{}")


def stages_run(output: str) -> list[str]:
    """The stages a `dvc repro` / `dvc exp run` really ran (not those restored from the run cache)."""
    return re.findall(r"^Running stage '([^']+)':", output, re.M)


@dataclass(frozen=True)
class DvcRepo:
    root: Path
    first_repro: str  # stdout of the first `dvc repro`
    seconds: float

    def restore(self) -> None:
        """Back to the committed baseline: git's files (params, dvc.lock, uncached metrics and plots), then
        the cached outputs dvc.lock names; fails unless `dvc status` is clean afterwards."""
        sh(["git", "checkout", "--", "."], self.root)
        dvc("checkout", "--quiet", cwd=self.root)
        assert dvc_status(self.root) == {}, dvc_status(self.root)


@pytest.fixture(scope="session")
def dvc_repo(tmp_path_factory) -> DvcRepo:
    """A fresh git repo holding the project files as a clone has them, small params, `dvc repro` run once and
    its results committed as the baseline. Tests that change the workspace call `restore()` when done."""
    root = copy_project(tmp_path_factory.mktemp("dvc") / "repo")
    write_params(root / "params.yaml", small_project_params(yaml.safe_load((root / "params.yaml").read_text())))
    sh(["git", "init", "-q"], root)
    sh(["git", "config", "user.name", "kdpipe test"], root)
    sh(["git", "config", "user.email", "test@kdpipe.invalid"], root)
    sh(["git", "add", "-A"], root)
    sh(["git", "commit", "-qm", "init"], root)
    t0 = time.perf_counter()
    first = dvc("repro", cwd=root, timeout=900)
    seconds = time.perf_counter() - t0
    sh(["git", "add", "-A"], root)
    sh(["git", "commit", "-qm", "baseline results"], root)
    return DvcRepo(root, first.stdout, seconds)


@dataclass(frozen=True)
class Experiment:
    name: str
    override: str
    output: str  # stdout of `dvc exp run`


@pytest.fixture(scope="session")
def temperature_experiment(dvc_repo) -> Experiment:
    """`dvc exp run -S distill.temperature=<new value>` once on the baseline, then the workspace restored.
    The value is one the run cache has not seen, so every stage that must rerun really runs."""
    params = yaml.safe_load((dvc_repo.root / "params.yaml").read_text())
    override = f"distill.temperature={params['distill']['temperature'] + 1.5}"
    try:
        out = dvc("exp", "run", "-S", override, "-n", "warmer", cwd=dvc_repo.root, timeout=600)
    finally:
        dvc_repo.restore()
    return Experiment("warmer", override, out.stdout)


# ------------------------------------------------------------------ two test processes (pytest-xdist)

# `make test` runs two pytest workers (`-n 2 --dist loadgroup`): tests train on one thread each, so a second
# worker uses the second core. A test is kept on one worker with the others that share an expensive fixture
# (built once per worker that uses it): the session's DVC repository gets a group, and a file with a
# module-scoped fixture is one group. Every other test goes to whichever worker is free.
SHARED_FIXTURE_GROUPS = {"dvc_repo": "dvc_repo", "temperature_experiment": "dvc_repo"}


def _group(item) -> str | None:
    names = getattr(item, "fixturenames", ())
    shared = [g for f, g in SHARED_FIXTURE_GROUPS.items() if f in names]
    if shared:
        return shared[0]
    defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    if any(d and d[-1].scope == "module" for d in defs.values()):
        return item.nodeid.split("::")[0]
    return None


# tryfirst: xdist's own hook reads the xdist_group markers into the node ids; markers added after it (as this hook
# once did) grouped nothing, and both workers built the DVC repository and each module fixture.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if not item.get_closest_marker("xdist_group") and (group := _group(item)):
            item.add_marker(pytest.mark.xdist_group(group))
    # Longest first: xdist hands out groups in the order of their first test, so the groups and files with slow
    # tests go first and the quick tests fill in at the end (a long group handed out last would leave the
    # other worker idle). A file's tests stay together and in order, so its module fixtures are built once.
    slow_files = {item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow")}
    slow_groups = {m.args[0] for item in items if item.get_closest_marker("slow")
                   for m in item.iter_markers("xdist_group")}

    def heavy(item) -> bool:
        groups = {m.args[0] for m in item.iter_markers("xdist_group")}
        return item.nodeid.split("::")[0] in slow_files or bool(groups & slow_groups)

    items.sort(key=lambda item: not heavy(item))  # stable: collection order within each half
