"""kd-sweep: a grid of param overrides as DVC experiments, then the best point by a validation metric.

Each point is one `dvc exp run --temp -S ...` (a Prefect task named after the experiment), at most `jobs` at a
time. `--temp` runs in a copy of the repo, so the workspace and its params.yaml stay untouched; apply a point
with `dvc exp apply <name>`. MLflow: one sweep run, a run per point nested under it (tagged with the
point's params, logging its metric), and each point's stage runs nested under the point's run.

Why not DVC's queue (`--queue`, then `--run-all --jobs N`): its points run in detached workers that share
one environment (so no MLflow run per point), their output comes only through `dvc queue logs`, and a worker
outlives the command; run one at a time, it measured the same as `--temp` here.

    python -m flows.sweep -g teacher.lr=0.05,0.1 -g teacher.epochs=1,2 --jobs 1
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from prefect import flow
from prefect.context import get_run_context
from prefect.futures import wait
from prefect.states import State

from flows import _dvc
from flows.pipeline import dvc_command, no_heartbeat
from kdpipe import tracking
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


@flow(name="kd-sweep")
def kd_sweep(grid: dict[str, list[Any]], jobs: int = 1, metric_file: str = "metrics/teacher.json",
             metric: str = "val_accuracy", stages: list[str] | None = None, repo: str = ".") -> dict[str, Any]:
    """Run every point of `grid` as a DVC experiment and name the one with the highest `metric` in
    `metric_file` (as `dvc exp show` keys it). Choosing on test metrics would leak the test split: refused.

    jobs: points run at once, each with cores/jobs torch threads; stages: targets of each `dvc exp run`
    (default all); repo: the DVC repository (default the working directory).
    """
    if jobs < 1:
        raise ValueError(f"jobs: must be >= 1, got {jobs}")
    if "test" in metric or "test" in Path(metric_file).stem:
        raise ValueError(f"choose on a validation metric, not {metric_file}:{metric} (the test split stays unseen)")
    root = Path(repo).resolve()
    cfg = load(root / DEFAULT_PARAMS)
    run = get_run_context().flow_run
    points = {f"{run.name}-{i}": point for i, point in enumerate(grid_points(grid), start=1)}
    sweep_run = tracking.start_parent_run(run.name, cfg, root=root, tags={
        "prefect_flow": "kd-sweep", "prefect_flow_run_id": str(run.id), "grid": json.dumps(grid)})
    point_runs = {name: tracking.start_parent_run(name, cfg, root=root, parent_run_id=sweep_run, tags={
        "dvc_experiment": name, **{k: str(v) for k, v in point.items()}})
        for name, point in points.items()}
    values: dict[str, float | None] = {}
    states: dict[str, State] = {}
    try:
        states = run_points(points, point_runs, jobs, stages, root, tracking.tracking_uri(cfg.tracking, root))
        done = [name for name, state in states.items() if state.is_completed()]
        shown = _dvc.experiment_metrics(root, _dvc.environment(), metric_file, metric) if done else {}
        values = {name: shown.get(name) for name in done}
    finally:  # close every MLflow run, whatever happened
        best = best_point(values)
        for name, run_id in point_runs.items():
            value = values.get(name)
            tracking.end_parent_run(run_id, cfg, ok=value is not None, root=root,
                                    metrics={metric: value} if value is not None else None)
        tags = {"best_experiment": best, **{f"best.{k}": v for k, v in points[best].items()}} if best else {}
        tracking.end_parent_run(sweep_run, cfg, ok=best is not None and len(values) == len(points), root=root,
                                tags=tags, metrics={f"best_{metric}": values[best]} if best else None)

    failed = {name: state.message for name, state in states.items() if not state.is_completed()}
    if failed or best is None:
        raise RuntimeError(f"sweep: {len(failed)} of {len(points)} point(s) failed (best so far: {best}): {failed}")
    return {"best_experiment": best, "best_params": points[best], "best_value": values[best],
            "metric": f"{metric_file}:{metric}", "mlflow_run_id": sweep_run,
            "points": {name: {"params": points[name], metric: values[name]} for name in points}}


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
    parser.add_argument("--repo", default=".")
    args = parser.parse_args(argv)
    with no_heartbeat():
        state = kd_sweep(grid=parse_grid(args.grid), jobs=args.jobs, metric_file=args.metric_file,
                         metric=args.metric, stages=args.stages, repo=args.repo, return_state=True)
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
