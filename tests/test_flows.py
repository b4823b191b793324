"""The Prefect layer for real: kd-pipeline and kd-sweep on a fresh git+DVC repo with tiny params, against a
Prefect API (one `prefect_test_harness` per session), with MLflow lineage and a local DVC remote; then beyond
one checkout: a fresh clone restoring from the remote, the deployments registered by `prefect deploy` with
their git pull steps and run by `prefect worker`s (started and stopped by the tests) in clones of their own,
and a sweep whose points spread over two workers.

The tests share one repo (module scope) and one first pipeline run on it (`first_run`, whose results are
committed as the baseline by `built`, pushed to the local DVC remote, and cloned bare as the workers' git
remote by `bare`); every test that changes the workspace restores the baseline, so each test also runs alone
(`-k`). Tests of the set-up files alone (prefect.yaml, Dockerfile, Makefile targets) are in test_scaleout.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, small_project_params
from projectcopy import copy_project

if str(REPO) not in sys.path:  # `flows` is a folder at the repo root, not an installed package
    sys.path.insert(0, str(REPO))

from flows import _dvc  # noqa: E402
from flows.pipeline import kd_pipeline, no_heartbeat, parse_set  # noqa: E402
from flows.sweep import best_point, grid_points, kd_sweep, parse_grid  # noqa: E402

# prepare comes along as teacher's upstream. The later stages (scratch, distill, ...) have their owners' tests;
# that the flow finds every stage of dvc.yaml is checked by test_stage_graph_follows_dvc.
STAGES = ["teacher"]
POOL = "kdpipe-process"
PREFECT = str(Path(sys.executable).parent / "prefect")


# ---------------------------------------------------------------- fast: the pure helpers

def test_set_args_write_values_as_yaml_reads_them():
    assert _dvc.set_args({"teacher.lr": 0.1, "teacher.flip": True, "teacher.checkpoint": None, "a.b": "x"}) == [
        "-S", "teacher.lr=0.1", "-S", "teacher.flip=true", "-S", "teacher.checkpoint=null", "-S", "a.b=x"]
    assert parse_set(["teacher.lr=0.1", "a.b=c=d"]) == {"teacher.lr": "0.1", "a.b": "c=d"}
    with pytest.raises(SystemExit):
        parse_set(["teacher.lr"])


def test_upstream_closure_and_unknown_stage():
    upstream = {"prepare": set(), "teacher": {"prepare"}, "scratch": {"prepare"}, "distill": {"teacher"}}
    assert _dvc.with_upstream(["distill"], upstream) == {"prepare", "teacher", "distill"}
    with pytest.raises(ValueError, match="unknown stage"):
        _dvc.with_upstream(["nope"], upstream)


def test_grid_points_and_best_point():
    assert grid_points({"a": [1, 2], "b": [3, 4]}) == [
        {"a": 1, "b": 3}, {"a": 1, "b": 4}, {"a": 2, "b": 3}, {"a": 2, "b": 4}]
    assert parse_grid(["teacher.lr=0.05,0.1", "teacher.flip=true"]) == {
        "teacher.lr": [0.05, 0.1], "teacher.flip": [True]}
    assert best_point({"x": 0.5, "y": None, "z": 0.7}) == "z"
    assert best_point({"y": None}) is None


# ---------------------------------------------------------------- fixtures: a Prefect API and a fresh repo

@pytest.fixture(scope="session")
def prefect_api():
    """A temporary Prefect server and database for the session (~10 s), heartbeats off."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60), no_heartbeat():
        yield PREFECT_API_URL.value()


def _git(root: Path, *args: str) -> None:
    _sh(["git", *args], root)


def _sh(cmd: list[str], cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=env or _dvc.environment(), capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def repo(prefect_api, tmp_path_factory):
    """A fresh repo holding the project files as a clone has them, tiny params, a local DVC remote, one commit."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv("KDPIPE_DEVICE", "cpu")
        root = copy_project(tmp_path_factory.mktemp("flows") / "repo")
        params = small_project_params(yaml.safe_load((root / "params.yaml").read_text()))
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        _git(root, "init", "-q")
        _git(root, "config", "user.name", "kdpipe test")
        _git(root, "config", "user.email", "test@kdpipe.invalid")
        _sh([_dvc.dvc(), "remote", "add", "-d", "local", str(root.parent / "remote")], root)
        _git(root, "add", "-A")
        _git(root, "commit", "-qm", "init")
        yield root


def _commit(root: Path, message: str) -> None:
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "--allow-empty", "-m", message)


def _restore(root: Path) -> None:
    """Back to the last commit: git files (params, dvc.lock, the uncached metrics and plots), then the cached
    outputs that dvc.lock names (DVC deletes a stage's outputs before running it). Best effort for the
    latter: run on its own, a test may not have built them."""
    _git(root, "checkout", "--", ".")
    subprocess.run([_dvc.dvc(), "checkout", "-q"], cwd=root, env=_dvc.environment(), capture_output=True)


@pytest.fixture(scope="module")
def first_run(repo):
    """The first kd-pipeline run on the fresh repo (it pushes to the local remote): its final state."""
    return kd_pipeline(stages=STAGES, push=True, repo=str(repo), return_state=True)


@pytest.fixture(scope="module")
def built(repo, first_run):
    """The repo after the first run, its results committed: the baseline every later test starts from."""
    assert first_run.is_completed(), f"the first pipeline run failed: {first_run.message}"
    _commit(repo, "results")
    return repo


@pytest.fixture(scope="module")
def bare(built, tmp_path_factory) -> tuple[str, str]:
    """The baseline as a bare git repository, the workers' `origin`: (its file:// URL, the branch)."""
    path = tmp_path_factory.mktemp("git") / "kdpipe.git"
    _git(built, "clone", "-q", "--bare", str(built), str(path))
    branch = _sh(["git", "symbolic-ref", "--short", "HEAD"], built).stdout.strip()
    return path.as_uri(), branch


def flow_run_id(state):
    return state.state_details.flow_run_id


def task_runs(run_id, timeout: float = 20) -> dict:
    """The flow run's task runs by name, with their states. The API records task states from events, a moment
    after the flow returns: wait until every task run has a final state (or the timeout passes)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        states = {run.name: run.state for run in runs}
        if (states and all(s is not None and s.is_final() for s in states.values())) or time.monotonic() > deadline:
            return states
        time.sleep(0.5)


def logged_lines(run_id, wanted: str, timeout: float = 20) -> list[str]:
    """The flow run's log messages, once one containing `wanted` arrived (logs are shipped in batches)."""
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        lines = [log.message for log in logs]
        if any(wanted in line for line in lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.5)


def mlflow_runs(root: Path, query: str) -> list:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["kdpipe"], filter_string=query, output_format="list")


# ---------------------------------------------------------------- kd-pipeline

@pytest.mark.e2e
@pytest.mark.slow
def test_stage_graph_follows_dvc(repo):
    order, upstream = _dvc.stage_graph(repo, _dvc.environment())
    listed = _sh([_dvc.dvc(), "stage", "list", "--name-only"], repo).stdout.split()
    assert sorted(order) == sorted(listed) and order[:2] == ["prepare", "teacher"]
    for stage, before in upstream.items():  # every stage comes after what it depends on
        assert all(order.index(b) < order.index(stage) for b in before)


@pytest.mark.e2e
@pytest.mark.slow
def test_pipeline_runs_each_stage_as_a_task_and_pushes(repo, first_run):
    state = first_run
    assert state.is_completed(), state.message
    result = state.result()
    assert result["results"] == {"prepare": "ran", "teacher": "ran"}
    tasks = task_runs(flow_run_id(state))
    assert set(tasks) == {"prepare", "teacher", "dvc push"}
    assert all(s.is_completed() for s in tasks.values()), tasks
    assert result["dvc_lock_sha256"] == hashlib.sha256((repo / "dvc.lock").read_bytes()).hexdigest()
    assert any((repo.parent / "remote").rglob("*")), "dvc push sent nothing to the remote"
    # The stages' own output, line by line, is in the flow run's logs.
    lines = logged_lines(flow_run_id(state), "teacher epoch 1/1")
    assert "Running stage 'teacher':" in lines and any("teacher epoch 1/1" in line for line in lines), lines[-20:]


@pytest.mark.e2e
@pytest.mark.slow
def test_stage_runs_nest_under_one_mlflow_parent_run(built, first_run):
    repo = built
    (parent,) = mlflow_runs(repo, f"tags.prefect_flow_run_id = '{flow_run_id(first_run)}'")
    assert parent.data.tags["prefect_flow"] == "kd-pipeline"
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["dvc_lock_sha256"] == _dvc.lock_digest(repo)
    children = mlflow_runs(repo, f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == ["prepare", "teacher"]

    from prefect import get_client

    with get_client(sync_client=True) as client:  # named after the flow run, tagged with its id
        run = client.read_flow_run(parent.data.tags["prefect_flow_run_id"])
    assert parent.info.run_name == run.name


@pytest.mark.e2e
@pytest.mark.slow
def test_second_run_reports_stages_up_to_date(built):
    repo = built
    lock = _dvc.lock_digest(repo)
    state = kd_pipeline(stages=STAGES, repo=str(repo), return_state=True)
    assert state.is_completed(), state.message
    assert state.result()["results"] == {"prepare": "up to date", "teacher": "up to date"}
    tasks = task_runs(flow_run_id(state))
    assert {name: s.message for name, s in tasks.items()} == {"prepare": "up to date", "teacher": "up to date"}
    assert _dvc.lock_digest(repo) == lock


@pytest.mark.e2e
@pytest.mark.slow
def test_cli_entry_point(built, prefect_api):
    repo = built
    env = _dvc.environment(PREFECT_API_URL=prefect_api)
    out = _sh([sys.executable, "-m", "flows.pipeline", "--stages", *STAGES, "--repo", str(repo)], REPO, env=env)
    assert out.stdout.splitlines() == ["prepare: up to date", "teacher: up to date"], out.stdout


@pytest.mark.e2e
@pytest.mark.slow
def test_fresh_clone_restores_from_the_remote_and_retrains_nothing(built, tmp_path):
    clone = tmp_path / "clone"
    _git(tmp_path, "clone", "-q", str(built), str(clone))  # .dvc/config, and so the remote, comes along
    assert not (clone / "models/teacher.pt").exists()
    lock = _dvc.lock_digest(built)

    # A remote without the outputs: one line naming the remote and what is missing; nothing is trained.
    empty = tmp_path / "empty-remote"
    _sh([_dvc.dvc(), "remote", "modify", "local", "url", str(empty)], clone)
    state = kd_pipeline(stages=STAGES, pull=True, retries=0, repo=str(clone), return_state=True)
    assert state.is_failed() and "\n" not in state.message, state.message
    assert f"dvc pull from remote 'local' ({empty}) failed" in state.message, state.message
    assert "models/teacher.pt" in state.message, state.message
    _git(clone, "checkout", "--", ".dvc/config")

    state = kd_pipeline(stages=STAGES, pull=True, retries=0, repo=str(clone), return_state=True)
    assert state.is_completed(), state.message
    assert state.result()["results"] == {"prepare": "up to date", "teacher": "up to date"}
    assert set(task_runs(flow_run_id(state))) == {"dvc pull", "prepare", "teacher"}
    assert (clone / "models/teacher.pt").exists() and _dvc.lock_digest(clone) == lock

    # The same with DVC alone, in a second clone: `dvc repro --pull` runs no stage.
    plain = tmp_path / "plain"
    _git(tmp_path, "clone", "-q", str(built), str(plain))
    out = _sh([_dvc.dvc(), "repro", "--pull", *STAGES], plain).stdout
    assert "Running stage" not in out and (plain / "models/teacher_outputs.pt").exists(), out


@pytest.mark.e2e
@pytest.mark.slow
def test_pull_without_a_remote_fails_before_any_work(built, tmp_path):
    clone = tmp_path / "clone"
    _git(tmp_path, "clone", "-q", str(built), str(clone))
    _sh([_dvc.dvc(), "remote", "remove", "local"], clone)
    state = kd_pipeline(stages=STAGES, pull=True, repo=str(clone), return_state=True)
    assert state.is_failed() and "no default DVC remote" in state.message and "make remote" in state.message
    assert task_runs(flow_run_id(state), timeout=2) == {}  # failed before the first task


@pytest.mark.e2e
@pytest.mark.slow
def test_failing_stage_fails_the_flow_with_its_name(built):
    repo = built
    params = repo / "params.yaml"
    good = params.read_bytes()
    junk = repo.parent / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    bad = yaml.safe_load(good)  # valid params (so the flow starts), but a teacher that cannot load
    bad["teacher"].update(source="checkpoint", checkpoint=str(junk))
    params.write_text(yaml.safe_dump(bad, sort_keys=False))
    try:
        state = kd_pipeline(stages=STAGES, repo=str(repo), return_state=True)
    finally:
        _restore(repo)
    assert state.is_failed()
    assert "stage 'teacher' failed" in state.message and "kdpipe teacher: error:" in state.message, state.message
    tasks = task_runs(flow_run_id(state))
    assert tasks["prepare"].is_completed() and tasks["teacher"].is_failed()
    (parent,) = mlflow_runs(repo, f"tags.prefect_flow_run_id = '{flow_run_id(state)}'")
    assert parent.info.status == "FAILED"


@pytest.mark.e2e
@pytest.mark.slow
def test_overrides_run_as_one_recorded_experiment(built):
    repo = built
    committed = (repo / "params.yaml").read_bytes()
    try:
        failed = kd_pipeline(stages=STAGES, overrides={"teacher.model": "no_such_model"}, repo=str(repo),
                             return_state=True)
        assert failed.is_failed() and "unknown model" in failed.message
        assert (repo / "params.yaml").read_bytes() == committed  # a failed experiment leaves params.yaml as it was

        state = kd_pipeline(stages=STAGES, overrides={"teacher.epochs": 2}, repo=str(repo), return_state=True)
        assert state.is_completed(), state.message
        (name,) = state.result()["results"]
        assert set(task_runs(flow_run_id(state))) == {name}  # one task, named after the experiment
        shown = _sh([_dvc.dvc(), "exp", "show", "--json"], repo).stdout
        assert name in shown
        assert json.loads((repo / "metrics/teacher.json").read_text())["epochs_run"] == 2
        assert yaml.safe_load(committed)["teacher"]["epochs"] == 1  # git's params.yaml was never edited
    finally:
        _restore(repo)  # back to the baseline for the other tests


# ---------------------------------------------------------------- kd-sweep

@pytest.mark.e2e
@pytest.mark.slow
def test_sweep_2x2_two_at_a_time_names_the_best_point_by_validation_accuracy(built):
    repo = built
    params_before = (repo / "params.yaml").read_bytes()
    grid = {"teacher.lr": [0.05, 0.2], "teacher.epochs": [1, 2]}
    state = kd_sweep(grid=grid, jobs=2, stages=STAGES, repo=str(repo), return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    values = {name: point["val_accuracy"] for name, point in result["points"].items()}
    assert len(values) == 4 and None not in values.values()
    assert result["best_value"] == max(values.values())
    assert result["best_params"] == result["points"][result["best_experiment"]]["params"]
    assert (repo / "params.yaml").read_bytes() == params_before  # --temp: the workspace is untouched
    # MLflow: the sweep run names the best; a run per point under it; the stage runs under the points.
    (sweep,) = mlflow_runs(repo, f"tags.prefect_flow_run_id = '{flow_run_id(state)}'")
    assert sweep.data.tags["best_experiment"] == result["best_experiment"]
    assert float(sweep.data.tags["best.teacher.lr"]) == result["best_params"]["teacher.lr"]
    points = mlflow_runs(repo, f"tags.mlflow.parentRunId = '{sweep.info.run_id}'")
    assert sorted(r.info.run_name for r in points) == sorted(values)
    stage_runs = [r for p in points for r in mlflow_runs(repo, f"tags.mlflow.parentRunId = '{p.info.run_id}'")]
    assert {r.info.run_name for r in stage_runs} == {"teacher"}  # run in --temp dirs, logged to the workspace store


@pytest.mark.e2e
def test_sweep_refuses_to_choose_on_test_metrics(prefect_api):
    state = kd_sweep(grid={"teacher.lr": [0.1]}, metric="test_accuracy", return_state=True)
    assert state.is_failed() and "validation" in state.message


# ---------------------------------------------------------------- the deployment, run by a worker

def _stop(proc: subprocess.Popen) -> None:
    """Stop a process and everything it started: the worker runs each flow in a new session, and DVC
    commands get their own process group, so every group in the tree is signalled."""
    import psutil

    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    groups = set()
    for p in tree:
        try:
            groups.add(os.getpgid(p.pid))
        except ProcessLookupError:
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for group in groups:
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=10)
            break
        except subprocess.TimeoutExpired:
            continue


def _deploy(repo: Path, name: str, bare: tuple[str, str], env: dict[str, str]) -> None:
    """`prefect deploy` of one deployment of prefect.yaml, its workers cloning `bare` (file://) at its branch."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=POOL, type="process"), overwrite=True)
    deploy_env = {**env, "KDPIPE_GIT_URL": bare[0], "KDPIPE_GIT_REF": bare[1]}
    _sh([PREFECT, "--no-prompt", "deploy", "--name", name], repo, env=deploy_env, timeout=120)


def _worker_env(tmp_path: Path, prefect_api: str, store: Path, install: bool = False) -> dict[str, str]:
    """A worker's environment: the test's API, polling every second, the shared MLflow store `store`; the pull
    step's dependency install only with `install` (it finds them all there: ~3 s, once is enough)."""
    return _dvc.environment(PREFECT_API_URL=prefect_api, PREFECT_WORKER_QUERY_SECONDS="1",
                            KDPIPE_INSTALL="1" if install else "0", PREFECT_HOME=str(tmp_path / "prefect-home"),
                            MLFLOW_TRACKING_URI=f"sqlite:///{store}")


def _kdpipe_imported_from() -> Path:
    """Where this venv's Python imports kdpipe from, asked of a fresh interpreter outside the repo."""
    out = subprocess.run([sys.executable, "-c", "import kdpipe; print(kdpipe.__file__)"], cwd="/",
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return Path(out.stdout.strip()).resolve()


def _start_worker(name: str, cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    """`prefect worker start` in `cwd`, one run at a time, in its own session (so _stop takes its whole tree)."""
    cwd.mkdir(parents=True, exist_ok=True)
    with (cwd / "worker.log").open("w") as log:
        return subprocess.Popen([PREFECT, "worker", "start", "--pool", POOL, "--name", name, "--limit", "1"],
                                cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for_workers(names: set[str], timeout: float = 60) -> None:
    """Until every named worker has polled the pool: runs submitted earlier could all go to the first one."""
    from prefect import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while {w.name for w in client.read_workers_for_work_pool(POOL)} < names:
            assert time.monotonic() < deadline, f"workers {names} did not come online in {timeout} s"
            time.sleep(0.5)


def _wait_for_run(run_id, timeout: float):
    from prefect import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while not (state := client.read_flow_run(run_id).state).is_final() and time.monotonic() < deadline:
            time.sleep(1)
    return state


def _logs(*dirs: Path) -> str:
    return "\n".join((d / "worker.log").read_text()[-2000:] for d in dirs if (d / "worker.log").exists())


@pytest.mark.e2e
@pytest.mark.slow
def test_nightly_deployment_with_pull_steps_runs_on_a_worker_elsewhere(built, bare, prefect_api, tmp_path):
    from prefect import get_client
    from prefect.deployments import run_deployment

    store = tmp_path / "shared-mlflow.db"
    env = _worker_env(tmp_path, prefect_api, store, install=True)  # the pull steps as shipped, install included
    _deploy(built, "nightly", bare, env)

    declared = yaml.safe_load((built / "prefect.yaml").read_text())["deployments"][0]
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("kd-pipeline/nightly")
    assert deployment.schedules[0].schedule.cron == "0 3 * * *"
    assert deployment.parameters == declared["parameters"]
    assert deployment.work_pool_name == POOL and deployment.global_concurrency_limit.limit == 1
    assert deployment.concurrency_options.collision_strategy == "ENQUEUE"  # a second run waits for the first
    clone_step = deployment.pull_steps[0]["prefect.deployments.steps.git_clone"]
    assert (clone_step["repository"], clone_step["branch"]) == bare  # resolved at deploy time by the build steps

    worker_dir = tmp_path / "elsewhere"  # not the repo: the run clones the bare repo into a temporary folder
    worker = _start_worker("nightly-worker", worker_dir, env)
    try:
        run = run_deployment("kd-pipeline/nightly", parameters={"stages": STAGES, "retries": 0}, timeout=0)
        state = _wait_for_run(run.id, timeout=150)
    finally:
        _stop(worker)
    assert state.is_completed(), f"{state.name}: {state.message}\n{_logs(worker_dir)}"
    tasks = task_runs(run.id)
    assert set(tasks) == {"dvc pull", "prepare", "teacher", "dvc push"} and all(s.is_completed() for s in tasks.values())
    assert tasks["prepare"].message == tasks["teacher"].message == "up to date"  # restored by the pull, not retrained
    (parent,) = _mlflow_runs(store, f"tags.prefect_flow_run_id = '{run.id}'")  # in the shared store
    workdir = Path(parent.data.tags["workdir"])
    assert workdir.name == f"kdpipe-{bare[1]}" and workdir != built, workdir  # git_clone's folder name
    assert parent.data.tags["prefect_worker"] == "nightly-worker"
    # The worker ran in this checkout's venv: after its install step that venv still imports the checkout's
    # kdpipe, not the run's throwaway clone (an editable install from the clone re-pointed it).
    assert "flows.source install: " in (worker_dir / "worker.log").read_text(), _logs(worker_dir)  # it did run
    assert _kdpipe_imported_from() == (REPO / "kdpipe" / "__init__.py").resolve()


@pytest.mark.e2e
@pytest.mark.slow
def test_sweep_points_spread_over_two_workers_and_the_best_is_named(built, bare, prefect_api, tmp_path):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    store = built / "mlflow.db"  # the store the sweep itself logs to (the repo's default): the workers share it
    env = _worker_env(tmp_path, prefect_api, store)
    _deploy(built, "point", bare, env)
    dirs = [tmp_path / "w1", tmp_path / "w2"]
    workers = [_start_worker(d.name, d, {**env, "PREFECT_HOME": str(d / "prefect-home")}) for d in dirs]
    try:
        _wait_for_workers({"w1", "w2"})
        state = kd_sweep(grid={"teacher.lr": [0.02, 0.3]}, stages=STAGES, deployment="kd-sweep-point/point",
                         pull=True, push=True, timeout_s=200, repo=str(built), return_state=True)
    finally:
        for worker in workers:
            _stop(worker)
    assert state.is_completed(), f"{state.message}\n{_logs(*dirs)}"
    result = state.result()
    points = result["points"]
    values = {name: point["val_accuracy"] for name, point in points.items()}
    assert len(values) == 2 and None not in values.values()
    assert result["best_value"] == max(values.values()) and values[result["best_experiment"]] == result["best_value"]
    assert sorted(p["prefect_worker"] for p in points.values()) == ["w1", "w2"]  # one point on each worker
    assert len({p["workdir"] for p in points.values()}) == 2  # each in a clone of its own

    with get_client(sync_client=True) as client:  # each point ran exactly once: one flow run, one teacher run
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=list(points))))
    assert sorted(r.name for r in runs) == sorted(points) and all(r.state.is_completed() for r in runs)
    (sweep,) = mlflow_runs(built, f"tags.prefect_flow_run_id = '{flow_run_id(state)}'")
    assert sweep.data.tags["best_experiment"] == result["best_experiment"]
    for point in mlflow_runs(built, f"tags.mlflow.parentRunId = '{sweep.info.run_id}'"):
        stage_runs = mlflow_runs(built, f"tags.mlflow.parentRunId = '{point.info.run_id}'")
        assert [r.info.run_name for r in stage_runs] == ["teacher"], point.info.run_name  # prepare was pulled
        assert point.data.metrics["val_accuracy"] == values[point.info.run_name]
    pushed = _sh(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], Path(bare[0].removeprefix("file://")))
    assert sorted(ref.rsplit("/", 1)[1] for ref in pushed.stdout.split()) == sorted(points)  # dvc exp push


@pytest.mark.e2e
@pytest.mark.slow
def test_sweep_across_workers_refuses_an_unknown_deployment_and_stops_waiting_at_its_timeout(built, bare, prefect_api,
                                                                                             tmp_path):
    state = kd_sweep(grid={"teacher.lr": [0.1]}, deployment="kd-sweep-point/nope", repo=str(built), return_state=True)
    assert state.is_failed() and "'kd-sweep-point/nope' is not registered" in state.message, state.message

    _deploy(built, "point", bare, _worker_env(tmp_path, prefect_api, built / "mlflow.db"))
    state = kd_sweep(grid={"teacher.lr": [0.1]}, stages=STAGES, deployment="kd-sweep-point/point", timeout_s=3,
                     repo=str(built), return_state=True)  # no worker is running: the point stays Scheduled
    assert state.is_failed() and "still Scheduled after 3 s; cancelled" in state.message, state.message
    (sweep,) = mlflow_runs(built, f"tags.prefect_flow_run_id = '{flow_run_id(state)}'")
    (point,) = mlflow_runs(built, f"tags.mlflow.parentRunId = '{sweep.info.run_id}'")
    assert point.info.status == "FAILED"

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:  # cancelled, so that no worker starts it later
        (run,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[point.info.run_name])))
    assert run.state.name in ("Cancelling", "Cancelled"), run.state


def _mlflow_runs(store: Path, query: str) -> list:
    """Runs of experiment kdpipe in the sqlite store `store` matching `query`."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{store}")
    return client.search_runs([client.get_experiment_by_name("kdpipe").experiment_id], query)
