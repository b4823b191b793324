"""Beyond one machine, the set-up files: prefect.yaml's pull steps and deployments, the Docker work pool
(prefect.docker.yaml, Dockerfile; no image is built here: no Docker daemon), flows/source.py, and the Makefile's
`remote` and `worker` targets. What runs them for real (a fresh clone restoring from the DVC remote, workers
running the deployments, a sweep over two workers) is in test_flows.py, next to the Prefect API it shares.
"""

from __future__ import annotations

import importlib
import inspect
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO

if str(REPO) not in sys.path:  # `flows` is a folder at the repo root, not an installed package
    sys.path.insert(0, str(REPO))

from flows import _dvc, source  # noqa: E402

BIN = Path(sys.executable).parent
GIT_CLONE = "prefect.deployments.steps.git_clone"
SET_CWD = "prefect.deployments.steps.set_working_directory"
SHELL = "prefect.deployments.steps.run_shell_script"


def prefect_file(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


def step(steps: list[dict], kind: str) -> dict:
    """The inputs of the one step of `kind` in `steps`."""
    (found,) = [s[kind] for s in steps if kind in s]
    return found


# ---------------------------------------------------------------- prefect.yaml

def test_every_deployment_clones_the_repository_at_the_ref_read_when_deploying():
    spec = prefect_file("prefect.yaml")
    built = {s[SHELL]["id"]: s[SHELL]["script"] for s in spec["build"]}
    assert built == {"repository": "python -m flows.source repository", "ref": "python -m flows.source ref",
                     "dvc_remote": "python -m flows.source dvc-remote"}
    env = spec["definitions"]["work_pool"]["job_variables"]["env"]
    assert env["KDPIPE_DVC_REMOTE"] == "{{ dvc_remote.stdout }}"  # a remote only .dvc/config.local names
    clone = step(spec["pull"], GIT_CLONE)
    assert (clone["repository"], clone["branch"]) == ("{{ repository.stdout }}", "{{ ref.stdout }}")
    assert step(spec["pull"], SET_CWD)["directory"] == "{{ " + clone["id"] + ".directory }}"
    assert [s for s in spec["deployments"] if "pull" in s or "build" in s] == []  # none overrides them


def test_install_step_is_skipped_with_kdpipe_install_0():
    """With KDPIPE_INSTALL=0 the step runs no pip (here: no python on PATH, so running it would fail)."""
    script = shlex.split(step(prefect_file("prefect.yaml")["pull"], SHELL)["script"])
    env = {"PATH": "/nonexistent"}
    cmd = [shutil.which(script[0]), *script[1:]]
    assert subprocess.run(cmd, env={**env, "KDPIPE_INSTALL": "0"}, capture_output=True).returncode == 0
    assert subprocess.run(cmd, env=env, capture_output=True).returncode != 0  # it would install


def flow_of(entrypoint: str):
    path, name = entrypoint.split(":")
    return getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)


@pytest.mark.parametrize("file", ["prefect.yaml", "prefect.docker.yaml"])
def test_deployment_parameters_are_parameters_of_their_flows(file):
    for deployment in prefect_file(file)["deployments"]:
        accepted = inspect.signature(flow_of(deployment["entrypoint"]).fn).parameters
        unknown = set(deployment.get("parameters") or {}) - set(accepted)
        assert not unknown, f"{file}: {deployment['name']} sets {unknown}, not parameters of its flow"


def test_sweep_deployment_submits_to_the_point_deployment_and_the_pipeline_runs_one_at_a_time():
    deployments = {d["name"]: d for d in prefect_file("prefect.yaml")["deployments"]}
    flow_name, name = deployments["sweep"]["parameters"]["deployment"].split("/")
    assert flow_of(deployments[name]["entrypoint"]).name == flow_name
    assert deployments["nightly"]["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    assert deployments["nightly"]["parameters"]["pull"] and deployments["nightly"]["parameters"]["push"]


def test_pull_takes_what_the_stages_need_and_its_error_fits_one_line():
    assert _dvc.pull_args(None) == ["pull"]
    assert _dvc.pull_args(["teacher"]) == ["pull", "--with-deps", "teacher"]
    dvc_said = ["WARNING: Some of the cache files do not exist neither locally nor on remote.",
                "ERROR: failed to pull data from the cloud - Checkout failed for following targets:",
                "models/teacher.pt", "data/prepared", "Is your cache up to date?", "<https://error.dvc.org/missing-files>"]
    assert _dvc.error_summary(dvc_said) == ("failed to pull data from the cloud - Checkout failed for following "
                                            "targets: models/teacher.pt, data/prepared")
    assert _dvc.error_summary(["something else went wrong"]) == "something else went wrong"


# ---------------------------------------------------------------- the Docker work pool

def test_docker_pool_builds_the_image_and_clones_like_the_process_pool():
    docker, process = prefect_file("prefect.docker.yaml"), prefect_file("prefect.yaml")
    image = step(docker["build"], "prefect_docker.deployments.steps.build_docker_image")
    assert image["dockerfile"] == "Dockerfile" and (REPO / image["dockerfile"]).exists()
    for kind in (GIT_CLONE, SET_CWD):
        assert step(docker["pull"], kind) == step(process["pull"], kind)
    (deployment,) = docker["deployments"]
    job = deployment["work_pool"]["job_variables"]
    assert job["image"] == "{{ " + image["id"] + ".image }}"
    assert job["env"]["KDPIPE_INSTALL"] == "0"  # the image has the dependencies
    assert job["container_create_kwargs"]["device_requests"][0]["capabilities"] == [["gpu"]]


def test_dockerfile_installs_the_pinned_dependencies_before_the_code():
    lines = (REPO / "Dockerfile").read_text().splitlines()
    assert lines[[i for i, line in enumerate(lines) if line.startswith("FROM")][0]] == "FROM python:3.11-slim"
    text = "\n".join(lines)
    # The dependency layer reads pyproject.toml (torch 2.14.1 and torchvision 0.29.1 pinned there) and comes
    # before the code, so a code change reuses it.
    deps = text.index("tomllib.load(open('pyproject.toml'")
    assert text.index("COPY pyproject.toml") < deps < text.index("COPY kdpipe")
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"torch==2.14.1"' in pyproject and '"torchvision==0.29.1"' in pyproject
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert "*" in ignore and {"!pyproject.toml", "!README.md", "!kdpipe/"} <= set(ignore)


# ---------------------------------------------------------------- flows/source.py

def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def test_source_reads_origin_and_branch_and_refuses_what_workers_cannot_clone(tmp_path, monkeypatch):
    monkeypatch.delenv("KDPIPE_GIT_URL", raising=False)
    monkeypatch.delenv("KDPIPE_GIT_REF", raising=False)
    monkeypatch.chdir(tmp_path)
    git(tmp_path, "init", "-q", "-b", "trunk")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x")
    assert source.repository() == tmp_path.resolve().as_uri()  # no origin: workers on this machine clone it
    git(tmp_path, "remote", "add", "origin", "https://example.invalid/team/kdpipe.git")
    assert (source.repository(), source.ref()) == ("https://example.invalid/team/kdpipe.git", "trunk")
    git(tmp_path, "checkout", "-q", "--detach")
    with pytest.raises(SystemExit, match="KDPIPE_GIT_REF"):
        source.ref()
    monkeypatch.setenv("KDPIPE_GIT_URL", "file:///srv/kdpipe.git")
    monkeypatch.setenv("KDPIPE_GIT_REF", "v1.0")
    assert (source.repository(), source.ref()) == ("file:///srv/kdpipe.git", "v1.0")
    monkeypatch.delenv("KDPIPE_GIT_URL")
    (tmp_path / ".git").rename(tmp_path / "not-git")  # no git repository here (nor above tmp_path)
    with pytest.raises(SystemExit, match="not in a git repository"):
        source.repository()


# ---------------------------------------------------------------- make remote, make worker

def make(target: str, cwd: Path, *flags: str, **variables: str) -> subprocess.CompletedProcess:
    """The repo's Makefile run in `cwd`, its `venv` step skipped (-o: never reinstall the shared venv), with no
    Prefect API configured (a fresh PREFECT_HOME: no profile sets one)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PREFECT_HOME": str(cwd / ".prefect"),
           "PREFECT_PROFILES_PATH": str(cwd / ".prefect/profiles.toml")}
    env.pop("PREFECT_API_URL", None)
    args = [f"{k}={v}" for k, v in variables.items()]
    return subprocess.run(["make", "-s", *flags, "-f", str(REPO / "Makefile"), "-o", "venv", target, *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_make_worker_needs_an_api_url_and_starts_a_worker_of_the_pool(tmp_path):
    out = make("worker", tmp_path)
    # One line saying why (make then adds its own "Error 1" line).
    assert out.returncode != 0 and out.stderr.splitlines()[0].startswith(
        "make worker: set PREFECT_API_URL first"), out.stderr
    dry = make("worker", tmp_path, "-n", LIMIT="2", NAME="gpu-1")  # what it starts once the API is set
    assert "prefect worker start --pool kdpipe-process --limit 2 --name 'gpu-1'" in dry.stdout, dry.stdout


@pytest.mark.slow
def test_make_remote_sets_the_default_remote_in_the_committed_config(tmp_path):
    git(tmp_path, "init", "-q")
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=tmp_path, check=True)
    out = make("remote", tmp_path)
    assert out.returncode != 0 and "make remote: set REMOTE" in out.stderr, out.stderr
    store = tmp_path.parent / "store"
    out = make("remote", tmp_path, REMOTE=str(store))
    assert out.returncode == 0, out.stderr
    config = (tmp_path / ".dvc/config").read_text()
    assert "remote = store" in config and "['remote \"store\"']" in config, config
    default = subprocess.run([str(BIN / "dvc"), "remote", "default"], cwd=tmp_path, capture_output=True, text=True)
    assert default.stdout.strip() == "store"
