"""kd-sweep-point: one point of a sweep across workers, a flow run of its own in a worker's clone (see
flows/sweep.py, which submits the points and reads their metrics back)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context

from flows import _dvc
from flows.pipeline import (
    RETRY_DELAY_S,
    StageFailed,
    dvc_pull,
    require_remote,
    run_experiment,
    stage_logger,
    where_tags,
)
from kdpipe import store, tracking
from kdpipe.config import DEFAULT_PARAMS, load


@task(name="dvc exp push", task_run_name="dvc exp push", cache_policy=NO_CACHE)
def exp_push(names: list[str], root: Path, env: dict[str, str]) -> None:
    """`dvc exp push origin`: the experiments' commits to the git remote the clone came from, their outputs to
    the default DVC remote; anyone can then `dvc exp pull origin <name>` and `dvc exp apply` it."""
    out = _dvc.run(["exp", "push", "origin", *names], root, env, stage_logger("exp push").info)
    if out.returncode != 0:
        raise StageFailed(f"dvc exp push origin {' '.join(names)} failed: {_dvc.error_summary(out.lines)}")


def mlflow_client(cfg, root: Path):
    """An MLflow client of the store the runs go to (made ready first: a new sqlite store is created once)."""
    uri = store.tracking_uri(cfg.tracking, root)
    store.prepare_store(uri)
    return store.import_mlflow().MlflowClient(uri), uri


WHERE_TAGS = ("prefect_worker", "host", "workdir", "prefect_flow_run_id")  # a point's MLflow tags: where it ran


@flow(name="kd-sweep-point")
def kd_sweep_point(name: str, overrides: dict[str, Any], mlflow_run_id: str, stages: list[str] | None = None,
                   metric_file: str = "metrics/teacher.json", metric: str = "val_accuracy", pull: bool = True,
                   push: bool = True, retries: int = 2, repo: str = ".") -> dict[str, Any]:
    """One point of a sweep across workers: DVC experiment `name` with `overrides`, in this run's own clone.

    Made by kd-sweep through the `point` deployment, whose pull steps clone the repository for this run:
    `dvc pull` (pull) restores the upstream outputs, `dvc exp run` runs the point in the clone's workspace (not
    --temp: in the shallow clone Prefect makes, a --temp experiment is silently not recorded), `dvc exp push
    origin` (push) keeps it; `metric` from `metric_file` and where the point ran go to the point's MLflow run
    `mlflow_run_id`, made by the sweep, which this run ends.
    """
    root = Path(repo).resolve()
    cfg = load(root / DEFAULT_PARAMS)
    client, uri = mlflow_client(cfg, root)
    try:
        client.get_run(mlflow_run_id)
    except Exception:  # MLflow raises its own error types per store
        raise ValueError(f"the point's MLflow run {mlflow_run_id} is not in {uri}: every worker must log to the "
                         "sweep's store (set MLFLOW_TRACKING_URI on the workers)") from None
    where = {**where_tags(root), "prefect_flow_run_id": str(get_run_context().flow_run.id)}
    env = _dvc.environment(MLFLOW_TRACKING_URI=uri, **{tracking.PARENT_RUN_ENV: mlflow_run_id})
    value = None
    ok = False
    try:
        if pull:
            remote = require_remote(root, env, "dvc pull")
            dvc_pull.with_options(retries=retries, retry_delay_seconds=RETRY_DELAY_S)(stages, remote, root, env)
        run_experiment(name, overrides, stages, False, root, env)
        value = _dvc.experiment_metrics(root, env, metric_file, metric).get(name)
        if value is None:
            raise StageFailed(f"experiment '{name}' recorded no {metric} in {metric_file}")
        if push:
            exp_push.with_options(retries=retries, retry_delay_seconds=RETRY_DELAY_S)([name], root, env)
        ok = True
    finally:
        tracking.end_parent_run(mlflow_run_id, cfg, ok=ok, root=root, tags=where,
                                metrics={metric: value} if value is not None else None)
    return {"name": name, metric: value, **where}
