"""kd-pipeline: the DVC stages as Prefect tasks under one MLflow parent run, then an optional `dvc push`.

A plain run is one task per stage, named after it, in DVC's dependency order (`dvc dag`). DVC decides what
runs: a stage that `dvc status` names, or whose upstream just changed, runs `dvc repro --single-item <stage>`
(its output streamed into the task's logs, `dvc.lock` recording it); the others end at once in a Completed
state with the message "up to date". A run with param overrides is one `dvc exp run -S ...` task named after
the experiment: DVC records one experiment per run, so that run cannot be cut per stage. With `pull`, a
`dvc pull` from the default DVC remote comes first: a fresh clone (a worker's) restores what was built elsewhere
instead of rebuilding it; with `push`, a `dvc push` comes last.

    python -m flows.pipeline                          # every stage, DVC skips what is up to date
    python -m flows.pipeline --stages teacher --force # rerun teacher (upstream only if out of date)
    python -m flows.pipeline -S teacher.lr=0.1        # a recorded DVC experiment; params.yaml is not hand-edited
    python -m flows.pipeline --pull --push            # restore from the DVC remote first, send results back after
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
from prefect.states import Completed, State

from flows import _dvc
from kdpipe import store, tracking
from kdpipe.config import DEFAULT_PARAMS, load

RETRY_DELAY_S = 5
UP_TO_DATE = "up to date"


class StageFailed(RuntimeError):
    """A DVC command failed: the message names the stage (or experiment) and quotes its last lines."""


def where_tags(root: Path) -> dict[str, str]:
    """Where a run ran, for its MLflow run: runs come from many machines and throwaway clones once workers run
    them (the worker's name is in the environment of the runs it starts)."""
    worker = os.environ.get("PREFECT__WORKER_NAME")
    return {"host": socket.gethostname(), "workdir": str(root), **({"prefect_worker": worker} if worker else {})}


def stage_logger(name: str) -> logging.Logger:
    """Stage output at INFO into the run's Prefect logs while Prefect's own loggers stay at WARNING:
    loggers of our own (`kdpipe.stage.<name>`) with Prefect's API handler, which finds the flow and task
    run from the context."""
    from prefect.logging.handlers import APILogHandler

    logger = logging.getLogger("kdpipe.stage")
    if not any(isinstance(h, APILogHandler) for h in logger.handlers):
        logger.setLevel(logging.INFO)
        logger.addHandler(APILogHandler())
    return logger.getChild(name)


@task(cache_policy=NO_CACHE)
def dvc_command(args: list[str], root: Path, env: dict[str, str], name: str, label: str) -> State:
    """Run one DVC command, its output streamed line by line into the logs; fail with `label` and its tail."""
    out = _dvc.run(args, root, env, stage_logger(name).info)
    if out.returncode != 0:
        raise StageFailed(f"{label} failed (dvc exit {out.returncode}):\n{out.tail}")
    if any(line.startswith("Running stage") for line in out.lines):
        return Completed(message="ran")
    if any("is cached - skipping run" in line for line in out.lines):
        return Completed(message="restored from the run cache")
    return Completed(message=UP_TO_DATE)


@task(cache_policy=NO_CACHE)
def up_to_date() -> State:
    """A stage that `dvc status` found up to date (and nothing upstream of it ran): no process to start,
    but the run still shows the stage."""
    return Completed(message=UP_TO_DATE)


def repro_stages(stages: list[str] | None, force: bool, root: Path, env: dict[str, str]) -> dict[str, str]:
    """One task per stage: the selected stages (default all) plus what they depend on, in DVC's order.
    `force` reruns the selected stages only; upstream stages run only when out of date.

    One `dvc status` up front spares a `dvc repro` process (~0.7 s) per up-to-date stage; a stage still goes
    through `dvc repro` when status names it, when forced, or when something upstream of it just changed.
    """
    order, upstream = _dvc.stage_graph(root, env)
    stale = _dvc.stale_stages(root, env)
    wanted = _dvc.with_upstream(stages, upstream) if stages else set(order)
    forced = set(stages or order) if force else set()
    messages: dict[str, str] = {}
    for stage in (s for s in order if s in wanted):
        changed_upstream = any(messages.get(s, UP_TO_DATE) != UP_TO_DATE for s in upstream[stage])
        if stage in forced or stage in stale or changed_upstream:
            args = ["repro", "--single-item", stage, *(["--force"] if stage in forced else [])]
            step = dvc_command.with_options(name=stage, task_run_name=stage)
            state = step(args, root, env, stage, f"stage '{stage}'", return_state=True)
        else:
            state = up_to_date.with_options(name=stage, task_run_name=stage)(return_state=True)
        state.result()  # raises StageFailed: the flow fails with the stage's name and last lines
        messages[stage] = state.message
    return messages


def run_experiment(name: str, overrides: dict[str, Any], stages: list[str] | None, force: bool, root: Path,
                   env: dict[str, str]) -> dict[str, str]:
    """One `dvc exp run` over the selected stages (default all), recorded as experiment `name`.

    DVC applies a finished experiment to the workspace (params.yaml included, as `dvc exp run` always does);
    a failed one would leave its overrides in params.yaml, so then the file is put back as it was.
    """
    params = root / DEFAULT_PARAMS
    before = params.read_bytes()
    args = ["exp", "run", "-n", name, *_dvc.set_args(overrides), *(["--force"] if force else []), *(stages or [])]
    step = dvc_command.with_options(name=name, task_run_name=name)
    state = step(args, root, env, name, f"experiment '{name}'", return_state=True)
    if state.is_failed():
        params.write_bytes(before)
    state.result()
    return {name: state.message}


def require_remote(root: Path, env: dict[str, str], why: str) -> str:
    """The default DVC remote's name; without one, the remote `make deploy` handed the deployments in
    KDPIPE_DVC_REMOTE (the checkout's own, in its .dvc/config.local, which a clone lacks), added to this
    checkout's .dvc/config.local; else fail before any work, saying how to set one. A folder that is not on
    this machine fails in one line too: that remote cannot serve a worker elsewhere."""
    remote = _dvc.default_remote(root, env)
    handed = os.environ.get(_dvc.REMOTE_ENV, "").strip()
    if remote is None and handed:
        if _dvc.is_folder(handed) and not Path(handed).is_dir():
            raise ValueError(f"{why}: the DVC remote {handed} ({_dvc.REMOTE_ENV}, a folder on the machine that ran "
                             f"make deploy) is not a folder on {socket.gethostname()}; for workers on other "
                             "machines set a shared remote (`make remote REMOTE=<url>`, commit .dvc/config) and "
                             "run make deploy again")
        remote = _dvc.add_local_remote(root, env, handed)
    if remote is None:
        raise ValueError(f"{why}: no default DVC remote in {root / '.dvc/config'}; "
                          "set one with `make remote REMOTE=<url or path>` (or `dvc remote add -d NAME URL`)")
    return remote


def can_miss(remote: str, root: Path, env: dict[str, str]) -> bool:
    """Outputs missing from `remote` were never pushed, rather than unreachable: the folder `make deploy` made
    (kdpipe-local) and it exists here. Its first nightly finds it empty and builds what it lacks."""
    url = _dvc.remote_url(root, env, remote)
    return remote == _dvc.EMBEDDED_REMOTE and _dvc.is_folder(url) and (root / ".dvc" / url).is_dir()


@task(name="dvc pull", task_run_name="dvc pull", cache_policy=NO_CACHE)
def dvc_pull(stages: list[str] | None, remote: str, root: Path, env: dict[str, str]) -> None:
    """Restore, from the default DVC remote, the outputs that dvc.lock names for `stages` and their upstream
    (default all): stages whose outputs come back are then up to date. I/O, so this step retries too."""
    out = _dvc.run(_dvc.pull_args(stages, can_miss(remote, root, env)), root, env, stage_logger("pull").info)
    if out.returncode != 0:
        url = _dvc.remote_url(root, env, remote)
        raise StageFailed(f"dvc pull from remote '{remote}' ({url}) failed: {_dvc.error_summary(out.lines)}")


@task(name="dvc push", task_run_name="dvc push", cache_policy=NO_CACHE)
def dvc_push(root: Path, env: dict[str, str]) -> None:
    """Send the run's outputs to the default DVC remote: I/O, so this is the step that retries."""
    out = _dvc.run(["push"], root, env, stage_logger("push").info)
    if out.returncode != 0:
        raise StageFailed(f"dvc push failed (exit {out.returncode}):\n{out.tail}")


@flow(name="kd-pipeline")
def kd_pipeline(stages: list[str] | None = None, force: bool = False, overrides: dict[str, Any] | None = None,
                pull: bool = False, push: bool = False, retries: int = 2, repo: str = ".") -> dict[str, Any]:
    """Bring the pipeline up to date through DVC (or run an experiment when `overrides` are given), with
    every stage's MLflow run nested under one parent run named after this flow run.

    stages: stage names from dvc.yaml (default all); force: rerun them even when up to date;
    overrides: {"teacher.lr": 0.1, ...} run as one `dvc exp run -S`; pull: `dvc pull` from the default DVC
    remote first; push: `dvc push` after success; both with `retries`; repo: the DVC repository (default the
    working directory).
    """
    root = Path(repo).resolve()
    cfg = load(root / DEFAULT_PARAMS)
    remote = require_remote(root, _dvc.environment(), "dvc pull" if pull else "dvc push") if pull or push else None
    run = get_run_context().flow_run
    parent = tracking.start_parent_run(run.name, cfg, root=root, tags={
        "prefect_flow": "kd-pipeline", "prefect_flow_run_id": str(run.id), **where_tags(root),
        **({"dvc_experiment": run.name, "dvc_overrides": str(overrides)} if overrides else {})})
    # Absolute tracking URI: an experiment may run in another directory, where a relative store is lost.
    env = _dvc.environment(MLFLOW_TRACKING_URI=store.tracking_uri(cfg.tracking, root),
                           **{tracking.PARENT_RUN_ENV: parent})
    ok = False
    try:
        if pull:  # before `dvc status`, so that it sees the restored outputs
            dvc_pull.with_options(retries=retries, retry_delay_seconds=RETRY_DELAY_S)(stages, remote, root, env)
        if overrides:
            results = run_experiment(run.name, overrides, stages, force, root, env)
        else:
            results = repro_stages(stages, force, root, env)
        if push:
            dvc_push.with_options(retries=retries, retry_delay_seconds=RETRY_DELAY_S)(root, env)
        ok = True
    finally:
        digest = _dvc.lock_digest(root)
        tracking.end_parent_run(parent, cfg, ok=ok, root=root, tags={"dvc_lock_sha256": digest})
    return {"results": results, "mlflow_run_id": parent, "dvc_lock_sha256": digest}


def no_heartbeat() -> AbstractContextManager:
    """Local runs skip the crash-detection heartbeat: its thread costs ~1 s per flow run (STACK_NOTES).
    Runs started by a worker keep it, where spotting a crashed run matters."""
    return temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


def parse_set(items: list[str]) -> dict[str, str]:
    """["teacher.lr=0.1"] → {"teacher.lr": "0.1"}; values stay text, DVC reads them as YAML."""
    pairs = [item.partition("=") for item in items]
    bad = [key for key, eq, _ in pairs if not eq or not key]
    if bad:
        raise SystemExit(f"-S needs KEY=VALUE, got {bad}")
    return {key: value for key, _, value in pairs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--stages", nargs="+", help="stages to run (default all; upstream included)")
    parser.add_argument("--force", action="store_true", help="rerun the stages even when up to date")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="param override; any makes the run one DVC experiment")
    parser.add_argument("--pull", action="store_true", help="dvc pull from the default DVC remote first")
    parser.add_argument("--push", action="store_true", help="dvc push after a successful run")
    parser.add_argument("--retries", type=int, default=2, help="retries of the pull and of the push")
    parser.add_argument("--repo", default=".", help="the DVC repository (default: here)")
    args = parser.parse_args(argv)
    with no_heartbeat():
        state = kd_pipeline(stages=args.stages, force=args.force, overrides=parse_set(args.overrides) or None,
                            pull=args.pull, push=args.push, retries=args.retries, repo=args.repo,
                            return_state=True)
    if not state.is_completed():
        print(f"kd-pipeline: {state.name}: {state.message}", file=sys.stderr)
        return 1
    for name, message in state.result()["results"].items():
        print(f"{name}: {message}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
