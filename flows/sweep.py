"""kd-sweep: a grid of param overrides as DVC experiments, then the best point by a validation metric.

Two ways to run the points:
- here (default): each point one `dvc exp run --temp -S ...` in this checkout (a Prefect task named after the
  experiment), at most `jobs` at a time. `--temp` runs in a copy of the repo, so the workspace and its
  params.yaml stay untouched; apply a point with `dvc exp apply <name>`.
- across workers (`--deployment kd-sweep-point/point`): each point its own flow run of that deployment
  (`kd-sweep-point`, below), all submitted at once, so the work pool's workers share them out. Each runs in its
  worker's own clone of the repository (the deployment's pull steps): `dvc pull`, one DVC experiment, `dvc exp
  push` to the git remote and the DVC remote, the metric logged to the point's MLflow run. The sweep waits for
  every point, then reads the metrics back from MLflow: the store every worker must share (MLFLOW_TRACKING_URI).

MLflow: one sweep run, a run per point nested under it (tagged with the point's params, logging its metric,
and, across workers, with the worker, host and clone that ran it), and each point's stage runs nested under
the point's run.

Why not DVC's queue (`--queue`, then `--run-all --jobs N`): its points run in detached workers that share
one environment (so no MLflow run per point), their output comes only through `dvc queue logs`, and a worker
outlives the command; run one at a time, it measured the same as `--temp` here.

    python -m flows.sweep -g teacher.lr=0.05,0.1 -g teacher.epochs=1,2 --jobs 1
    python -m flows.sweep -g teacher.lr=0.05,0.1 --deployment kd-sweep-point/point --pull --push   # on workers
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from prefect import flow
from prefect.context import get_run_context
from prefect.futures import wait
from prefect.states import Failed, State

from flows import _dvc
from flows.pipeline import (
    dvc_command,
    dvc_pull,
    no_heartbeat,
    require_remote,
)
from flows.sweep_point import WHERE_TAGS, exp_push, mlflow_client
from kdpipe import store, tracking
from kdpipe.config import DEFAULT_PARAMS, load


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """{"a": [1, 2], "b": [3]} → [{"a": 1, "b": 3}, {"a": 2, "b": 3}] (the first key varies slowest)."""
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def best_point(values: dict[str, float | None]) -> str | None:
    """The experiment with the highest metric value, ignoring points that have none."""
    scored = {name: v for name, v in values.items() if v is not None}
    return max(scored, key=scored.__getitem__) if scored else None


def run_points(points: dict[str, dict], point_runs: dict[str, str], jobs: int, stages: list[str] | None,
               root: Path, uri: str) -> dict[str, State]:
    """Each point as `dvc exp run --temp`, `jobs` at a time; a failed point does not stop the others."""
    # Points running side by side share the cores instead of each taking them all (oversubscription).
    threads = {"KDPIPE_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))} if jobs > 1 else {}
    states: dict[str, State] = {}
    names = list(points)
    for batch in (names[i:i + jobs] for i in range(0, len(names), jobs)):
        futures = {}
        for name in batch:
            args = ["exp", "run", "--temp", "-n", name, *_dvc.set_args(points[name]), *(stages or [])]
            env = _dvc.environment(MLFLOW_TRACKING_URI=uri, **threads, **{tracking.PARENT_RUN_ENV: point_runs[name]})
            step = dvc_command.with_options(name=name, task_run_name=name)
            futures[name] = step.submit(args, root, env, name, f"experiment '{name}'")
        wait(list(futures.values()))
        states |= {name: future.state for name, future in futures.items()}
    return states


def check_deployment(deployment: str) -> None:
    """Fail in one line, before any point is made, when the points' deployment is not registered."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    try:
        with get_client(sync_client=True) as client:
            client.read_deployment_by_name(deployment)
    except ObjectNotFound:
        raise ValueError(f"deployment {deployment!r} is not registered at {PREFECT_API_URL.value() or 'the API'}: "
                         "register it with `make deploy`") from None


def submit_points(deployment: str, points: dict[str, dict], point_runs: dict[str, str],
                  shared: dict[str, Any]) -> dict[str, Any]:
    """Each point as its own flow run of `deployment` (named after the point), not waited for: every worker of
    the pool can take one. `shared` are the parameters all points get; returns the flow run ids."""
    from prefect.deployments import run_deployment

    return {name: run_deployment(deployment, flow_run_name=name, timeout=0, parameters={
        **shared, "name": name, "overrides": overrides, "mlflow_run_id": point_runs[name]}).id
        for name, overrides in points.items()}


def wait_for_runs(run_ids: dict[str, Any], timeout_s: float | None, poll_s: float = 2.0) -> dict[str, State]:
    """The final state of every flow run. Runs not final after `timeout_s` are cancelled (a worker would go on
    training a point nobody waits for) and reported as failed."""
    from prefect import get_client
    from prefect.states import Cancelling

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            states = {name: client.read_flow_run(run_id).state for name, run_id in run_ids.items()}
            pending = [name for name, state in states.items() if not state.is_final()]
            if not pending:
                return states
            if deadline is not None and time.monotonic() > deadline:
                for name in pending:
                    client.set_flow_run_state(run_ids[name], Cancelling(message="the sweep stopped waiting"),
                                              force=True)
                return {**states, **{name: Failed(message=f"still {states[name].name} after {timeout_s:.0f} s; "
                                                          "cancelled") for name in pending}}
            time.sleep(poll_s)


def logged_points(cfg, root: Path, point_runs: dict[str, str], metric: str) -> dict[str, tuple[float | None, dict]]:
    """Each point's `metric` and tags as its flow run logged them to its MLflow run (None when it logged none)."""
    client, _ = mlflow_client(cfg, root)
    runs = {name: client.get_run(run_id).data for name, run_id in point_runs.items()}
    return {name: (data.metrics.get(metric), data.tags) for name, data in runs.items()}


@flow(name="kd-sweep")
def kd_sweep(grid: dict[str, list[Any]], jobs: int = 1, metric_file: str = "metrics/teacher.json",
             metric: str = "val_accuracy", stages: list[str] | None = None, deployment: str | None = None,
             pull: bool = False, push: bool = False, timeout_s: float | None = None,
             repo: str = ".") -> dict[str, Any]:
    """Run every point of `grid` as a DVC experiment and name the one with the highest `metric` in
    `metric_file`. Choosing on test metrics would leak the test split: refused.

    jobs: points run here at once, each with cores/jobs torch threads; stages: targets of each `dvc exp run`
    (default all); deployment: run each point as a flow run of this deployment instead (e.g.
    "kd-sweep-point/point"), on the pool's workers; pull: `dvc pull` before the points; push: `dvc exp push
    origin` after each; timeout_s: across workers, how long to wait for the points (default: as long as they
    take); repo: the DVC repository (default the working directory).
    """
    if jobs < 1:
        raise ValueError(f"jobs: must be >= 1, got {jobs}")
    if "test" in metric or "test" in Path(metric_file).stem:
        raise ValueError(f"choose on a validation metric, not {metric_file}:{metric} (the test split stays unseen)")
    root = Path(repo).resolve()
    cfg = load(root / DEFAULT_PARAMS)
    if deployment:
        check_deployment(deployment)
    elif _dvc.is_shallow(root):
        raise ValueError(f"{root} is a shallow git clone, where `dvc exp run --temp` records nothing: run the "
                         "points across workers (deployment=...) or `git fetch --unshallow` first")
    run = get_run_context().flow_run
    points = {f"{run.name}-{i}": point for i, point in enumerate(grid_points(grid), start=1)}
    sweep_run = tracking.start_parent_run(run.name, cfg, root=root, tags={
        "prefect_flow": "kd-sweep", "prefect_flow_run_id": str(run.id), "grid": json.dumps(grid)})
    point_runs = {name: tracking.start_parent_run(name, cfg, root=root, parent_run_id=sweep_run, tags={
        "dvc_experiment": name, **{k: str(v) for k, v in point.items()}})
        for name, point in points.items()}
    values: dict[str, float | None] = {}
    where: dict[str, dict[str, str]] = {}
    states: dict[str, State] = {}
    try:
        if deployment:
            shared = {"stages": stages, "metric_file": metric_file, "metric": metric, "pull": pull, "push": push}
            run_ids = submit_points(deployment, points, point_runs, shared)
            states = wait_for_runs(run_ids, timeout_s)
            logged = logged_points(cfg, root, point_runs, metric)
            done = [name for name, state in states.items() if state.is_completed()]
            values = {name: logged[name][0] for name in done}
            where = {name: {k: tags.get(k) for k in WHERE_TAGS} for name, (_, tags) in logged.items()}
        else:
            states = run_local(points, point_runs, jobs, stages, pull, push, root, cfg)
            done = [name for name, state in states.items() if state.is_completed()]
            shown = _dvc.experiment_metrics(root, _dvc.environment(), metric_file, metric) if done else {}
            values = {name: shown.get(name) for name in done}
    finally:  # close every MLflow run, whatever happened (across workers, the points logged their metric)
        best = best_point(values)
        for name, run_id in point_runs.items():
            value = values.get(name)
            log = {metric: value} if value is not None and not deployment else None
            tracking.end_parent_run(run_id, cfg, ok=value is not None, root=root, metrics=log)
        tags = {"best_experiment": best, **{f"best.{k}": v for k, v in points[best].items()}} if best else {}
        tracking.end_parent_run(sweep_run, cfg, ok=best is not None and len(values) == len(points), root=root,
                                tags=tags, metrics={f"best_{metric}": values[best]} if best else None)

    failed = {name: state.message for name, state in states.items() if not state.is_completed()}
    if failed or best is None:
        raise RuntimeError(f"sweep: {len(failed)} of {len(points)} point(s) failed (best so far: {best}): {failed}")
    return {"best_experiment": best, "best_params": points[best], "best_value": values[best],
            "metric": f"{metric_file}:{metric}", "mlflow_run_id": sweep_run,
            "points": {name: {"params": points[name], metric: values[name], **where.get(name, {})} for name in points}}


def run_local(points: dict[str, dict], point_runs: dict[str, str], jobs: int, stages: list[str] | None, pull: bool,
              push: bool, root: Path, cfg) -> dict[str, State]:
    """The points here (run_points), with the optional `dvc pull` before and `dvc exp push` of the finished
    points after."""
    env = _dvc.environment()
    if pull:
        dvc_pull(stages, require_remote(root, env, "dvc pull"), root, env)
    states = run_points(points, point_runs, jobs, stages, root, store.tracking_uri(cfg.tracking, root))
    done = [name for name, state in states.items() if state.is_completed()]
    if push and done:
        exp_push(done, root, env)
    return states


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """["teacher.lr=0.05,0.1"] → {"teacher.lr": [0.05, 0.1]} (each value read as YAML)."""
    grid = {}
    for item in items:
        key, eq, values = item.partition("=")
        if not eq or not key or not values:
            raise SystemExit(f"-g needs KEY=V1,V2,..., got {item!r}")
        grid[key] = [yaml.safe_load(v) for v in values.split(",")]
    return grid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("-g", "--grid", action="append", required=True, metavar="KEY=V1,V2",
                        help="one grid axis (repeat for more)")
    parser.add_argument("--jobs", type=int, default=1, help="points run at once")
    parser.add_argument("--metric-file", default="metrics/teacher.json")
    parser.add_argument("--metric", default="val_accuracy")
    parser.add_argument("--stages", nargs="+", help="targets of each experiment (default all)")
    parser.add_argument("--deployment", help="run each point as a flow run of this deployment, on its workers "
                        "(e.g. kd-sweep-point/point; needs PREFECT_API_URL)")
    parser.add_argument("--pull", action="store_true", help="dvc pull from the default DVC remote first")
    parser.add_argument("--push", action="store_true", help="dvc exp push origin each finished point")
    parser.add_argument("--timeout", type=float, help="across workers: seconds to wait for the points")
    parser.add_argument("--repo", default=".")
    args = parser.parse_args(argv)
    with no_heartbeat():
        state = kd_sweep(grid=parse_grid(args.grid), jobs=args.jobs, metric_file=args.metric_file,
                         metric=args.metric, stages=args.stages, deployment=args.deployment, pull=args.pull,
                         push=args.push, timeout_s=args.timeout, repo=args.repo, return_state=True)
    if not state.is_completed():
        print(f"kd-sweep: {state.name}: {state.message}", file=sys.stderr)
        return 1
    result = state.result()
    for name, point in result["points"].items():
        print(f"{name}: {point}")
    print(f"best: {result['best_experiment']} {result['best_params']} {result['metric']} = {result['best_value']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
