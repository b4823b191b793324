"""MLflow runs: one run per stage execution, named after the stage, with params, curves, tags and the
resources it used. When a pipeline run launches the stage, the parent run id arrives in ``KDPIPE_PARENT_RUN_ID``
and the stage run nests under it. Which store, and how it is made ready: kdpipe/store.py.

A run ends FINISHED, FAILED (an error), or KILLED: by SIGINT/SIGTERM (errors.Interrupted), or, when its process
died without a word (SIGKILL, a power cut), by the next run of its stage on the same host, which finds the dead
run still RUNNING and its process gone (the `kdpipe.pid` and `kdpipe.pid_started` tags every run carries).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kdpipe.config import Config
from kdpipe.env import is_main
from kdpipe.errors import Interrupted
from kdpipe.store import ARTIFACT_DIR, _set_uri, check_artifact_folder, import_mlflow, tracking_uri
from kdpipe.store_moves import store_dir_tag

PARENT_RUN_ENV = "KDPIPE_PARENT_RUN_ID"


def resource_usage(t0: float) -> dict[str, float]:
    """Wall time, CPU time and peak memory of this process. MLflow's system-metrics sampler only logs
    after a full interval, so short stages would otherwise record nothing about their cost."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    out = {"resources/wall_seconds": time.perf_counter() - t0, "resources/cpu_seconds": usage.ru_utime + usage.ru_stime,
           "resources/peak_rss_mb": usage.ru_maxrss / 1024}  # ru_maxrss is in KiB on Linux
    import torch

    if torch.cuda.is_available():
        out["resources/gpu_peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


PIPELINE_WRITES = ("dvc.lock", "data/prepared", "data/downloads", "models", "metrics", "plots", "reports", ".kdpipe",
                   "mlflow.db", "mlartifacts")  # paths.* defaults, dvc.lock, the local store


def git_facts(root: Path | None = None) -> dict[str, str]:
    """Commit and dirty flag of the code that ran ("unknown" outside a git checkout). Dirty counts tracked files
    changed outside PIPELINE_WRITES: what the pipeline writes is a result, not a change to the code that ran (else
    every run after `make run` said dirty, its own dvc.lock being changed)."""
    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):  # no git on PATH, or a hung one: the facts are unknown
            return ""
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                *(f":(exclude){path}" for path in PIPELINE_WRITES))
    return {"git_commit": commit, "git_dirty": str(bool(dirty)).lower(), "mlflow.source.git.commit": commit}


def _experiment_id(mlflow, name: str, root: Path) -> str:
    """Create the experiment with the artifact folder at the repo root when we own the store."""
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        if exp.artifact_location.startswith("file:"):  # a file where the folder should be: one line, before any work
            from urllib.parse import unquote, urlparse

            check_artifact_folder(Path(unquote(urlparse(exp.artifact_location).path)))
        return exp.experiment_id
    location, tags = None, store_dir_tag(mlflow.get_tracking_uri())  # how a moved store finds its artifacts
    if tags:  # a sqlite store: we own it, and its artifact folder
        location = (root / ARTIFACT_DIR).resolve().as_uri()
        check_artifact_folder(root / ARTIFACT_DIR)
    try:
        return mlflow.create_experiment(name, artifact_location=location, tags=tags)
    except mlflow.exceptions.MlflowException as e:  # another process created it since we looked
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return mlflow.get_experiment_by_name(name).experiment_id


class StageRun:
    """Thin handle on the active run: what stages log, without importing mlflow themselves."""

    def __init__(self, mlflow, run, reaped: list[str] | None = None):
        self._mlflow = mlflow
        self.run_id = run.info.run_id
        self.reaped = reaped or []  # runs of this stage found dead and marked KILLED when this one started

    def log_epoch(self, row: dict, prefix: str = "") -> None:
        step = int(row["epoch"])
        metrics = {f"{prefix}{k}": float(v) for k, v in row.items() if k != "epoch"}
        self._mlflow.log_metrics(metrics, step=step)

    def log_metrics(self, metrics: dict[str, float], prefix: str = "") -> None:
        self._mlflow.log_metrics({f"{prefix}{k}": float(v) for k, v in metrics.items()})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._mlflow.log_artifact(str(path), artifact_path=artifact_path)


class NullRun:
    """What a rank other than 0 logs into: nothing. Every StageRun method (log_epoch, log_metrics, set_tags,
    log_artifact) is there and does nothing."""

    run_id = None
    reaped: list[str] = []

    def __getattr__(self, name: str):
        if not hasattr(StageRun, name):
            raise AttributeError(name)
        return lambda *args, **kwargs: None


def redacted_params(params: dict) -> dict[str, str]:
    """Params as MLflow logs them (str values) for anyone who can read the store: credentials in URIs masked
    (scheme://user:token@host → scheme://***@host; ?token=, ?…Signature=, ?…Key= values → ***) and the user's
    home directory written as ~ (/home/me/data → ~/data)."""
    import re

    home = str(Path.home())

    def clean(value) -> str:
        text = re.sub(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s?#]+@", r"\1***@", str(value))
        text = re.sub(r"([?&][^=&\s]*(?:token|secret|password|signature|credential|key)[^=&\s]*=)[^&\s'\"]+",
                      r"\1***", text, flags=re.IGNORECASE)
        return re.sub(re.escape(home) + r"(?![\w.-])", "~", text) if len(Path(home).parts) > 1 else text

    return {key: clean(value) for key, value in params.items()}


@contextmanager
def stage_run(
    stage: str, cfg: Config, *, tags: dict[str, str] | None = None, root: Path | None = None
) -> Iterator[StageRun]:
    """Start the MLflow run of one stage execution: flattened params, git/stage tags, system metrics. In a
    data-parallel rank other than 0, a run that logs nothing: one stage execution is one MLflow run."""
    if not is_main():
        yield NullRun()
        return
    mlflow = import_mlflow()

    root = (root or Path.cwd()).resolve()
    _set_uri(mlflow, tracking_uri(cfg.tracking, root))
    experiment_id = _experiment_id(mlflow, cfg.tracking.experiment, root)
    if cfg.tracking.system_metrics:
        mlflow.set_system_metrics_sampling_interval(1)
        mlflow.set_system_metrics_samples_before_logging(1)
    mode = {"stage": stage, "reproducible": cfg.runtime.reproducible}  # the mode: kdpipe/run/kernels.py
    run_tags = {k: str(v) for k, v in {**mode, **git_facts(root), **process_tags(), **(tags or {})}.items()}
    with mlflow.start_run(
        experiment_id=experiment_id,
        run_name=stage,
        parent_run_id=os.environ.get(PARENT_RUN_ENV) or None,
        tags=run_tags,
        log_system_metrics=cfg.tracking.system_metrics,
    ) as run:
        try:
            t0 = time.perf_counter()
            mlflow.log_params(redacted_params(cfg.flat()))
            if run_tags.get("dataset_digest"):
                log_dataset(mlflow, cfg, stage, run_tags["dataset_digest"], root)
            reaped = reap_dead_runs(mlflow.MlflowClient(), experiment_id, stage, run.info.run_id)
            yield StageRun(mlflow, run, reaped)
            mlflow.log_metrics(resource_usage(t0))
        except Interrupted:
            mlflow.end_run("KILLED")  # not FAILED: nothing went wrong, and the stage can be resumed
            raise


TRAINING = ("teacher", "scratch", "distill")  # the stages whose dataset input is logged as "training"


def log_dataset(mlflow, cfg: Config, stage: str, digest: str, root: Path) -> None:
    """The prepared data as the run's MLflow dataset input (the run page's *Datasets*): a metadata-only dataset
    named after data.dataset, its source the prepared folder, its digest kdpipe's prepared-data digest (its first
    36 characters, the most MLflow's store column holds; the whole one in the input's `dataset_digest` tag)."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    dataset = MetaDataset(LocalArtifactDatasetSource(str(root / cfg.paths.prepared)),
                          name=f"{cfg.data.dataset}-prepared", digest=digest[:36])
    mlflow.log_input(dataset, context="training" if stage in TRAINING else stage, tags={"dataset_digest": digest})


CHECKPOINT_MD5 = "checkpoint_md5"  # `checkpoint_md5.<file name>` tags: which run wrote which checkpoint


def record_checkpoints(files: list[Path], artifact_path: str = "checkpoints") -> None:
    """After a training stage's run ended in this process: its checkpoints logged into it, and their md5 as tags,
    so export can name the run that wrote the very files it ships (source_runs), even when DVC restored them."""
    from kdpipe.files import file_md5

    if not is_main():
        return
    mlflow = import_mlflow()
    run_id, client = mlflow.last_active_run().info.run_id, mlflow.MlflowClient()
    for path in files:  # the last active run: the one this process just ended
        client.log_artifact(run_id, str(path), artifact_path)
        client.set_tag(run_id, f"{CHECKPOINT_MD5}.{Path(path).name}", file_md5(path))


def source_runs(cfg: Config, files: dict[str, Path], root: Path | None = None) -> dict[str, str]:
    """stage → id of the newest run of that stage, in this experiment, that recorded `files[stage]` with its
    current md5 (record_checkpoints); "unknown" when none did (a store that was not the one it trained in)."""
    from kdpipe.files import file_md5

    client = import_mlflow().MlflowClient(tracking_uri(cfg.tracking, (root or Path.cwd()).resolve()))
    experiment, found = client.get_experiment_by_name(cfg.tracking.experiment), {}
    for stage, path in files.items():
        query = f"tags.stage = '{stage}' and tags.`{CHECKPOINT_MD5}.{Path(path).name}` = '{file_md5(path)}'"
        runs = client.search_runs([experiment.experiment_id], query, order_by=["attributes.start_time DESC"],
                                  max_results=1) if experiment else []
        found[stage] = runs[0].info.run_id if runs else "unknown"
    return found


HOST_TAG, PID_TAG, STARTED_TAG = "kdpipe.host", "kdpipe.pid", "kdpipe.pid_started"
KILLED_TAG = "kdpipe.killed"  # why a run that was found dead is KILLED


def process_tags() -> dict[str, str]:
    """Which process runs this stage: host, pid and the process's start time (a pid can be reused)."""
    import socket

    import psutil

    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()),
            STARTED_TAG: f"{psutil.Process().create_time():.2f}"}


def reap_dead_runs(client, experiment_id: str, stage: str, by_run: str) -> list[str]:
    """The RUNNING runs of `stage` whose process on this host is gone, marked KILLED with a tag saying so; their
    ids. A run of another host, or without process tags (made before kdpipe tagged them), is left as it is: its
    process may be alive."""
    import socket

    host = socket.gethostname()
    runs = client.search_runs([experiment_id], f"tags.stage = '{stage}' and attributes.status = 'RUNNING'")
    dead = [r for r in runs if r.info.run_id != by_run and r.data.tags.get(HOST_TAG) == host
            and _process_gone(r.data.tags.get(PID_TAG), r.data.tags.get(STARTED_TAG))]
    for r in dead:
        client.set_tag(r.info.run_id, KILLED_TAG, f"its process {r.data.tags[PID_TAG]} on {host} ended without "
                       f"ending the run (SIGKILL or a crash); found by {stage} run {by_run}")
        client.set_terminated(r.info.run_id, "KILLED")
    return [r.info.run_id for r in dead]


def _process_gone(pid: str | None, started: str | None) -> bool:
    """No process `pid` started at `started` (STARTED_TAG's format) is running; False when the tags are missing."""
    import psutil

    if not pid or not started:
        return False
    try:
        return f"{psutil.Process(int(pid)).create_time():.2f}" != started or psutil.Process(int(pid)).status() == "zombie"
    except psutil.NoSuchProcess:
        return True
    except (psutil.Error, ValueError):
        return False


def start_parent_run(name: str, cfg: Config, *, tags: dict[str, str] | None = None,
                     root: Path | None = None, parent_run_id: str | None = None) -> str:
    """Open the run that a pipeline execution's stage runs nest under; returns its id.

    With `parent_run_id` it nests under that run (a sweep's points under the sweep). The caller passes the id
    to the stage processes through ``KDPIPE_PARENT_RUN_ID`` and ends the run with
    :func:`end_parent_run`. The run is not left active in this process, so nothing logs into it by accident.
    """
    mlflow = import_mlflow()

    root = (root or Path.cwd()).resolve()
    _set_uri(mlflow, tracking_uri(cfg.tracking, root))  # first: it prepares the store the client opens
    client = mlflow.MlflowClient(tracking_uri(cfg.tracking, root))
    experiment_id = _experiment_id(mlflow, cfg.tracking.experiment, root)
    nested = {}
    if parent_run_id:  # a sweep point under its sweep: MLflow's own nesting tag, as start_run(nested=True) sets
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        nested = {MLFLOW_PARENT_RUN_ID: parent_run_id}
    run = client.create_run(experiment_id, run_name=name, tags={**git_facts(root), **(tags or {}), **nested})
    return run.info.run_id


def end_parent_run(run_id: str, cfg: Config, *, ok: bool, tags: dict[str, str] | None = None,
                   metrics: dict[str, float] | None = None, root: Path | None = None) -> None:
    client = import_mlflow().MlflowClient(tracking_uri(cfg.tracking, (root or Path.cwd()).resolve()))
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, str(value))
    for key, value in (metrics or {}).items():
        client.log_metric(run_id, key, float(value))
    client.set_terminated(run_id, status="FINISHED" if ok else "FAILED")
