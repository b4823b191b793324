"""Deployments that run as shipped. `make deploy` in a checkout with no DVC remote adds the one-machine default (a
folder outside the checkout, in .dvc/config.local) and says so in one line, then registers; it refuses in one
line when that folder cannot be made, and a run whose clone is handed a folder that is not on its machine fails
in one line. End to end: a fresh copy of the project, a real `prefect server`, `make deploy`, `make worker`, and
a scheduled nightly run reaches Completed with no remote set by hand. The workers' install step installs the
clone's dependencies only, never the package (an editable install re-pointed a checkout's venv at a throwaway
clone)."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
if str(REPO) not in sys.path:  # `flows` is a folder at the repo root, not an installed package
    sys.path.insert(0, str(REPO))

from flows import _dvc, source  # noqa: E402


def checkout(tmp_path: Path) -> Path:
    """A DVC workspace holding what `make deploy` reads: prefect.yaml and flows/; no DVC remote."""
    root = tmp_path / "checkout"
    shutil.copytree(REPO / "flows", root / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "prefect.yaml", root / "prefect.yaml")
    subprocess.run([str(BIN / "dvc"), "init", "-q", "--no-scm"], cwd=root, check=True)
    return root


def deploy_env(root: Path, **extra: str) -> dict[str, str]:
    """make deploy's environment: the venv first on PATH, the user's cache (where the one-machine remote goes)
    under the test's folder, a fresh PREFECT_HOME; `extra` on top."""
    # Not the outer make's variables either: under `make test` (MAKELEVEL 1) make prints "Entering directory".
    unset = (_dvc.REMOTE_ENV, "KDPIPE_GIT_URL", "MLFLOW_TRACKING_URI", "MAKELEVEL", "MAKEFLAGS", "MFLAGS")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    return {**env, "PATH": f"{BIN}{os.pathsep}{env['PATH']}", "PREFECT_HOME": str(root / ".prefect"),
            "XDG_CACHE_HOME": str(root.parent / "cache"), **extra}


def make_deploy(root: Path, **extra: str) -> subprocess.CompletedProcess:
    """The repo's Makefile's deploy, its venv step skipped, against an API URL nothing listens on (what comes
    before the first call to it is what these tests check)."""
    env = deploy_env(root, PREFECT_API_URL="http://127.0.0.1:9/api", **extra)
    return subprocess.run(["make", "-f", str(REPO / "Makefile"), "-o", "venv", "deploy"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=180)


def dvc_out(root: Path, *args: str) -> str:
    return subprocess.run([str(BIN / "dvc"), *args], cwd=root, capture_output=True, text=True).stdout.strip()


def remotes(root: Path) -> dict[str, str]:
    """Every DVC remote of `root`, name -> URL, from all its config files (`dvc remote list` wraps long URLs)."""
    pairs = [line.partition("=") for line in dvc_out(root, "config", "--list").splitlines()]
    return {key.split(".")[1]: url for key, _, url in pairs if key.startswith("remote.") and key.endswith(".url")}


@pytest.mark.e2e
def test_make_deploy_without_a_dvc_remote_adds_the_one_machine_default_and_says_so(tmp_path, monkeypatch):
    root = checkout(tmp_path)
    (root / "built.txt").write_text("an output\n")
    subprocess.run([str(BIN / "dvc"), "add", "-q", "built.txt"], cwd=root, check=True)  # something cached
    committed = (root / ".dvc/config").read_bytes()
    out = make_deploy(root)
    top = root.resolve()
    folder = tmp_path / "cache/kdpipe/dvc-remote" / f"checkout-{hashlib.sha256(str(top).encode()).hexdigest()[:8]}"
    first = out.stdout.splitlines()[0]
    assert first == (f"make deploy: no DVC remote, so deployments nightly, sweep use kdpipe-local -> {folder} (in "
                     ".dvc/config.local, for workers on this machine only; dvc push: 1 file pushed)"), out.stdout
    assert "prefect work-pool" in out.stdout  # then it went on to register (against an API nothing answers)
    assert (root / ".dvc/config").read_bytes() == committed  # a path on one machine: never in the committed file
    assert dvc_out(root, "config", "--local", "remote.kdpipe-local.url") == str(folder)
    assert dvc_out(root, "remote", "default") == "kdpipe-local" and not folder.is_relative_to(root)
    assert [p.name for p in (folder / "files/md5").rglob("*") if p.is_file()] != []  # the cache was pushed
    monkeypatch.chdir(root)  # as the build steps run
    assert source.local_remote() == str(folder)  # what the deployments hand their runs' clones
    again = make_deploy(root)
    assert "no DVC remote" not in again.stdout, again.stdout  # set up once: the second deploy reuses it
    assert remotes(root) == {"kdpipe-local": str(folder)}  # still the one remote, at the same folder


def test_make_deploy_refuses_in_one_line_when_the_default_folder_cannot_be_made(tmp_path):
    root = checkout(tmp_path)
    (tmp_path / "a-file").write_text("")
    out = make_deploy(root, KDPIPE_DVC_REMOTE=str(tmp_path / "a-file" / "remote"))
    first = out.stderr.splitlines()[0]
    assert out.returncode != 0 and first.startswith("make deploy: this checkout has no DVC remote and the "
                                                    f"one-machine default {tmp_path}/a-file/remote could not be set"), out.stderr
    assert "KDPIPE_DVC_REMOTE" in first and "make remote REMOTE=" in first
    assert "prefect" not in out.stdout  # nothing was registered or created
    assert remotes(root) == {}  # and no remote left half set up


def test_a_committed_remote_is_used_as_it_is_and_not_handed_over(tmp_path, monkeypatch):
    root = checkout(tmp_path)
    subprocess.run([str(BIN / "dvc"), "remote", "add", "-d", "store", str(tmp_path / "remote")], cwd=root, check=True)
    assert source.check_remote(root) is None  # nothing added
    monkeypatch.chdir(root)
    assert source.local_remote() == ""  # every clone has it: the deployments hand nothing over
    assert dvc_out(root, "remote", "default") == "store" and remotes(root) == {"store": str(tmp_path / "remote")}
    monkeypatch.setattr(source, "remote_users", lambda path: [])
    shutil.rmtree(root / ".dvc")
    assert source.check_remote(root) is None  # no deployment uses a remote: none needed


def test_a_run_is_handed_the_remote_and_refuses_a_folder_not_on_its_machine(tmp_path, monkeypatch):
    """What a worker's clone does with KDPIPE_DVC_REMOTE (flows/pipeline.py require_remote): the folder exists
    here, so it becomes the clone's default remote, one that a missing output cannot mean unreachable; a folder
    that is not here (the deploy ran on another machine) fails before any work, in one line."""
    from flows import pipeline

    clone = checkout(tmp_path)
    env = _dvc.environment()
    monkeypatch.setenv(_dvc.REMOTE_ENV, str(tmp_path / "elsewhere"))
    with pytest.raises(ValueError, match=rf"^dvc pull: the DVC remote {tmp_path}/elsewhere \(KDPIPE_DVC_REMOTE, "
                       rf"a folder on the machine that ran make deploy\) is not a folder on {socket.gethostname()}; "
                       r"for workers on other machines set a shared remote") as refused:
        pipeline.require_remote(clone, env, "dvc pull")
    assert "\n" not in str(refused.value) and remotes(clone) == {}
    (tmp_path / "elsewhere").mkdir()
    assert pipeline.require_remote(clone, env, "dvc pull") == "kdpipe-local"
    assert dvc_out(clone, "config", "--local", "remote.kdpipe-local.url") == str(tmp_path / "elsewhere")
    assert pipeline.can_miss("kdpipe-local", clone, env)  # nothing pushed there yet: the run builds it
    assert _dvc.pull_args(None, allow_missing=True) == ["pull", "--allow-missing"]
    subprocess.run([str(BIN / "dvc"), "remote", "add", "-d", "store", str(tmp_path / "elsewhere")], cwd=clone,
                   check=True)
    assert not pipeline.can_miss("store", clone, env)  # any other remote: a missing output fails the pull


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


# ---------------------------------------------------------------- end to end: a scheduled nightly, no set-up

SCHEDULED_RUN_TIMEOUT_S = 480  # the next minute, then the whole tiny pipeline (~70 s alone, 2-4x when shared)


def fresh_project(dest: Path) -> Path:
    """The project as a fresh clone has it (bench/projectcopy.py: no outputs, no dvc.lock), tiny params, the
    Makefile, one git commit, no DVC remote, no `origin`; the nightly's cron every minute instead of 03:00."""
    from conftest import small_project_params, write_params
    from projectcopy import copy_project

    root = copy_project(dest)
    shutil.copy2(REPO / "Makefile", root / "Makefile")
    write_params(root / "params.yaml", small_project_params(yaml.safe_load((root / "params.yaml").read_text())))
    spec = root / "prefect.yaml"
    text = spec.read_text()
    assert text.count('cron: "0 3 * * *"') == 1
    spec.write_text(text.replace('cron: "0 3 * * *"', 'cron: "* * * * *"'))
    for args in (["init", "-q"], ["config", "user.name", "kdpipe test"], ["config", "user.email", "t@kdpipe.invalid"],
                 ["add", "-A"], ["commit", "-qm", "a fresh clone"]):
        subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)
    return root


def start_prefect_server(home: Path, port: int) -> subprocess.Popen:
    """`prefect server start` on loopback, its own database under `home`, its scheduler looking every 2 s
    (default 60: a deployment made just after start would wait that long), in its own process group."""
    env = deploy_env(home, PREFECT_HOME=str(home), PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2",
                     PREFECT_UI_ENABLED="false", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    home.mkdir(parents=True, exist_ok=True)
    with (home / "server.log").open("w") as log:
        return subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def scheduled_runs(deployment_id) -> list:
    """The flow runs of a deployment that its schedule created (not `prefect deployment run`), oldest first."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id])))
    return sorted((r for r in runs if r.auto_scheduled), key=lambda r: r.expected_start_time)


@pytest.mark.e2e
@pytest.mark.slow
def test_make_deploy_on_a_fresh_clone_schedules_a_nightly_that_a_worker_completes(tmp_path):
    """Issue 33's acceptance: a fresh clone, a local Prefect server, `make deploy`, `make worker`, and a run its
    schedule made reaches Completed, with no DVC remote and no git remote set by hand: the nightly pulls from the
    one-machine remote (empty: nothing was built yet), builds every stage and pushes them there."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from test_flows import _stop, task_runs
    from test_registry_server import free_port, stop, wait_healthy

    root = fresh_project(tmp_path / "kdpipe")
    base = f"http://127.0.0.1:{free_port()}"
    server = start_prefect_server(tmp_path / "server", int(base.rsplit(":", 1)[1]))
    worker = None
    try:
        wait_healthy(base, server, route="/api/health", timeout_s=90, what="prefect server")
        env = deploy_env(root, PREFECT_API_URL=f"{base}/api", KDPIPE_DEVICE="cpu", PREFECT_WORKER_QUERY_SECONDS="2",
                         KDPIPE_INSTALL="0")  # the install step is test_flows' (it would pip into this venv)
        deployed = subprocess.run(["make", "-o", "venv", "deploy"], cwd=root, env=env, capture_output=True,
                                  text=True, timeout=300)
        assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
        folder = Path(remotes(root)["kdpipe-local"])
        said = [line for line in deployed.stdout.splitlines() if line.startswith("make deploy: ")]
        assert said == [f"make deploy: no DVC remote, so deployments nightly, sweep use kdpipe-local -> {folder} (in "
                        ".dvc/config.local, for workers on this machine only; dvc push: Everything is up to date)",
                        f"make deploy: no git remote 'origin', so workers clone this checkout ({root.resolve().as_uri()})"
                        f" at {dvc_branch(root)}: they run what is committed there"], deployed.stdout
        assert not folder.is_relative_to(root) and list(folder.iterdir()) == []  # outside; nothing built to push
        with temporary_settings(updates={PREFECT_API_URL: f"{base}/api"}), get_client(sync_client=True) as client:
            nightly = client.read_deployment_by_name("kd-pipeline/nightly")
            assert nightly.schedules[0].schedule.cron == "* * * * *"
            assert nightly.job_variables["env"]["KDPIPE_DVC_REMOTE"] == str(folder)  # handed to the runs' clones
            with (tmp_path / "worker.log").open("w") as log:  # `make worker` as the user starts it
                worker = subprocess.Popen(["make", "-o", "venv", "worker", "NAME=one-machine"], cwd=root, env=env,
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.monotonic() + SCHEDULED_RUN_TIMEOUT_S
            while time.monotonic() < deadline:
                done = [r for r in scheduled_runs(nightly.id) if r.state and r.state.is_final()]
                if done:
                    break
                assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
                time.sleep(2)
            assert done, f"no scheduled run ended in {SCHEDULED_RUN_TIMEOUT_S} s:\n{(tmp_path / 'worker.log').read_text()[-3000:]}"
            run = done[0]
            assert run.state.is_completed(), f"{run.state.name}: {run.state.message}\n" + (
                tmp_path / "worker.log").read_text()[-3000:]
            tasks = task_runs(run.id)
    finally:
        if worker is not None:
            _stop(worker)
        stop(server)
    stages = set(_dvc_stage_names(root))
    assert set(tasks) == {"dvc pull", "dvc push", *stages} and all(s.is_completed() for s in tasks.values()), tasks
    assert {tasks[s].message for s in stages} == {"ran"}  # nothing to restore: every stage built
    assert any(p.is_file() for p in (folder / "files/md5").rglob("*"))  # and pushed to the one-machine remote
    assert subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout == ""


def dvc_branch(root: Path) -> str:
    return subprocess.run(["git", "symbolic-ref", "--short", "HEAD"], cwd=root, capture_output=True,
                          text=True).stdout.strip()


def _dvc_stage_names(root: Path) -> list[str]:
    return list(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])
