"""MLflow: the only module that imports it. One run per stage execution, named after the stage.

Default store: ``sqlite:///<repo>/mlflow.db`` with artifacts in ``<repo>/mlartifacts`` (both git-ignored and
never DVC outputs, since DVC deletes a stage's outputs before rerunning it). ``tracking.uri`` in params
points elsewhere, and ``MLFLOW_TRACKING_URI`` overrides both. When a pipeline run launches the stage, the
parent run id arrives in ``KDPIPE_PARENT_RUN_ID`` and the stage run nests under it.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kdpipe.config import Config, TrackingConfig
from kdpipe.env import is_main
from kdpipe.errors import UserError

PARENT_RUN_ENV = "KDPIPE_PARENT_RUN_ID"
DB_FILE = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"


# What the user set before any of our runs: mlflow.set_tracking_uri() writes MLFLOW_TRACKING_URI into the
# environment, so reading it later would let one run's store capture every later run in the process.
_USER_URI = os.environ.get("MLFLOW_TRACKING_URI")


def tracking_uri(cfg: TrackingConfig, root: Path | None = None) -> str:
    """Environment first, then params, then a sqlite file at the repo root (absolute: `dvc exp run --temp`
    runs elsewhere and a relative path would lose the run)."""
    root = (root or Path.cwd()).resolve()
    return _user_uri() or cfg.uri or f"sqlite:///{root / DB_FILE}"


class TrackingError(UserError):
    """The MLflow store cannot be used: the message names the URI and the setting it came from."""


def check_reachable(cfg: TrackingConfig, root: Path | None = None, timeout: float = 5.0) -> None:
    """Fail in seconds, before any work, when a tracking server (http/https) does not answer: MLflow itself
    would retry for minutes, mid-stage. Any HTTP answer counts; local stores (sqlite, files) are not probed."""
    import ssl
    import urllib.error
    import urllib.request

    uri = tracking_uri(cfg, root)
    if not uri.startswith(("http://", "https://")):
        return
    env = bool(_user_uri())
    source = "MLFLOW_TRACKING_URI" if env else "tracking.uri"
    fix = "unset MLFLOW_TRACKING_URI" if env else "set tracking.uri: null to log to the local sqlite store"
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # it answered (auth, proxy or no /health route): the server is there
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, ssl.SSLError):
            return  # it answered TLS: certificates are MLflow's business (MLFLOW_TRACKING_INSECURE_TLS)
        raise TrackingError(f"{source}={uri}: cannot reach the MLflow server ({reason}); "
                            f"start it, or {fix}") from None


def _user_uri() -> str | None:
    """MLFLOW_TRACKING_URI as the user set it, unless mlflow itself put it there during this process."""
    current = os.environ.get("MLFLOW_TRACKING_URI")
    return current if current != _MLFLOW_SET.get("uri") else _USER_URI


_MLFLOW_SET: dict[str, str] = {}


def _set_uri(mlflow, uri: str) -> None:
    """Point mlflow at the store `uri`, made ready first (prepare_store)."""
    prepare_store(uri)
    mlflow.set_tracking_uri(uri)
    _MLFLOW_SET["uri"] = uri


# ---------------------------------------------------------------------------------------------------------
# Two pipelines, one store. A sqlite store is one file that processes of several checkouts may share. SQLite
# serialises their writes itself (MLflow sets a 20 s busy timeout on every session), but two processes that
# create one new store at once corrupt it, so creation happens once, under a file lock beside the database.
# A server (http://...) serialises writes for its clients; nothing to lock here.

LOCK_SUFFIX = ".lock"  # mlflow.db -> mlflow.db.lock
_READY: set[str] = set()  # stores this process has already prepared


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (relative to the cwd unless absolute); None for other stores."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?")[0]
    return Path(path) if path and path != ":memory:" else None


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock on `<database>.lock` beside a sqlite store, across processes (fcntl.flock: let go
    when the holder exits, even by a crash). A no-op for other stores."""
    path = sqlite_path(uri)
    if path is None:
        yield
        return
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}{LOCK_SUFFIX}", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def prepare_store(uri: str) -> None:
    """Create a sqlite store with MLflow's tables, once, under store_lock, before anything else opens it. An
    existing store is only checked (MLflow refuses one with an older schema: `mlflow db upgrade <uri>` after
    a backup); other stores are left to their server."""
    if uri in _READY or sqlite_path(uri) is None:
        return
    mlflow = import_mlflow()
    with store_lock(uri):
        retry_locked(lambda: mlflow.MlflowClient(uri).search_experiments(max_results=1))
    _READY.add(uri)


def retry_locked(call, attempts: int = 5):
    """call(), again after a growing pause when sqlite still answers "database is locked" once its busy timeout
    ran out (a burst of writers from other processes); the failed transaction was rolled back, so it is safe."""
    for attempt in range(attempts):
        try:
            return call()
        except Exception as e:
            if "database is locked" not in str(e) or attempt == attempts - 1:
                raise
            time.sleep(0.5 * 2**attempt)


def import_mlflow():
    """mlflow, imported quietly: telemetry off, and its INFO chatter (which it configures on import) hushed.
    The tracking layer (this module and registry) gets mlflow only through here."""
    import logging

    from kdpipe.env import quiet_defaults

    quiet_defaults()
    import mlflow

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    return mlflow


def resource_usage(t0: float) -> dict[str, float]:
    """Wall time, CPU time and peak memory of this process. MLflow's system-metrics sampler only logs
    after a full interval, so short stages would otherwise record nothing about their cost."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    out = {
        "resources/wall_seconds": time.perf_counter() - t0,
        "resources/cpu_seconds": usage.ru_utime + usage.ru_stime,
        "resources/peak_rss_mb": usage.ru_maxrss / 1024,  # ru_maxrss is in KiB on Linux
    }
    import torch

    if torch.cuda.is_available():
        out["resources/gpu_peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def git_facts(root: Path | None = None) -> dict[str, str]:
    """Commit and dirty flag of the code that ran ("unknown" outside a git checkout)."""
    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):  # no git on PATH, or a hung one: the facts are unknown
            return ""
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": str(bool(dirty)).lower(), "mlflow.source.git.commit": commit}


def _experiment_id(mlflow, name: str, root: Path) -> str:
    """Create the experiment with the artifact folder at the repo root when we own the store."""
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if mlflow.get_tracking_uri().startswith("sqlite:"):
        location = (root / ARTIFACT_DIR).resolve().as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException as e:  # another process created it since we looked
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return mlflow.get_experiment_by_name(name).experiment_id


class StageRun:
    """Thin handle on the active run: what stages log, without importing mlflow themselves."""

    def __init__(self, mlflow, run):
        self._mlflow = mlflow
        self.run_id = run.info.run_id

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
    """What a rank other than 0 logs into: nothing."""

    run_id = None

    def log_epoch(self, row: dict, prefix: str = "") -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], prefix: str = "") -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass


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
    run_tags = {k: str(v) for k, v in {"stage": stage, **git_facts(root), **(tags or {})}.items()}
    with mlflow.start_run(
        experiment_id=experiment_id,
        run_name=stage,
        parent_run_id=os.environ.get(PARENT_RUN_ENV) or None,
        tags=run_tags,
        log_system_metrics=cfg.tracking.system_metrics,
    ) as run:
        t0 = time.perf_counter()
        mlflow.log_params(redacted_params(cfg.flat()))
        yield StageRun(mlflow, run)
        mlflow.log_metrics(resource_usage(t0))


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
    mlflow = import_mlflow()

    client = mlflow.MlflowClient(tracking_uri(cfg.tracking, (root or Path.cwd()).resolve()))
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, str(value))
    for key, value in (metrics or {}).items():
        client.log_metric(run_id, key, float(value))
    client.set_terminated(run_id, status="FINISHED" if ok else "FAILED")
