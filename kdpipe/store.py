"""The MLflow store: which one (environment, params, or the sqlite file at the repo root), reaching a server,
creating a sqlite store once under a file lock, and importing mlflow quietly.

Default store: ``sqlite:///<repo>/mlflow.db`` with artifacts in ``<repo>/mlartifacts`` (both git-ignored and
never DVC outputs, since DVC deletes a stage's outputs before rerunning it). ``tracking.uri`` in params
points elsewhere, and ``MLFLOW_TRACKING_URI`` overrides both.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kdpipe.config import TrackingConfig
from kdpipe.errors import UserError
from kdpipe.store_moves import follow_move, sqlite_path

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


def check_local(cfg: TrackingConfig, root: Path | None = None) -> None:
    """Fail before any work, writing nothing, when the local store is damaged: its sqlite file a folder, not a
    database or cut short (check_sqlite), or a file where its artifact folder (mlartifacts) goes."""
    root = (root or Path.cwd()).resolve()
    path = sqlite_path(tracking_uri(cfg, root))
    if path is not None:
        check_sqlite(path)
        check_artifact_folder(root / ARTIFACT_DIR)


def check_artifact_folder(folder: Path) -> None:
    """TrackingError when a file stands where the runs' artifact folder is (or one of the folders above it)."""
    folder = Path(folder).absolute()
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise TrackingError(f"{existing}: a file where MLflow keeps the runs' artifacts ({folder}); move it aside "
                            f"(mv {existing} {existing}.broken) and rerun")


SQLITE_MAGIC = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite 3 database


def check_sqlite(path: Path) -> None:
    """TrackingError naming `path` and the way out when it is not a readable SQLite database: a folder, other
    bytes, or shorter than the pages its header counts (cut short: confirmed by SQLite's own quick_check, which
    takes its lock, so a writer mid-commit is not mistaken for damage). A missing or empty file is a new store."""
    if not path.exists():
        return
    if path.is_dir():
        raise TrackingError(damaged(path, "a folder, not a database"))
    try:
        with open(path, "rb") as f:
            header = f.read(100)
    except OSError as e:
        raise TrackingError(damaged(path, f"cannot read it: {e.strerror or e}")) from None
    if not header:
        return
    if len(header) < 100 or not header.startswith(SQLITE_MAGIC):
        raise TrackingError(damaged(path, "not an SQLite database"))
    page_size = int.from_bytes(header[16:18], "big")
    pages = int.from_bytes(header[28:32], "big") if header[24:28] == header[92:96] else 0  # 0: count not kept
    expected, size = pages * (65536 if page_size == 1 else page_size), path.stat().st_size
    if size < expected and (problem := quick_check(path)):
        raise TrackingError(damaged(path, f"cut short: {size} of {expected} bytes; SQLite: {problem}"))


def quick_check(path: Path) -> str | None:
    """SQLite's PRAGMA quick_check on `path`, opened read-only: None when it says ok, else its first complaint."""
    import sqlite3
    from contextlib import closing

    try:
        with closing(sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=20)) as db:
            rows = db.execute("PRAGMA quick_check").fetchall()
    except sqlite3.OperationalError:  # locked, or a hot journal a read-only reader cannot roll back: not damage
        return None
    except sqlite3.DatabaseError as e:
        return str(e)
    return None if rows == [("ok",)] else str(rows[0][0])


def damaged(path: Path, problem: str) -> str:
    """The one line for an MLflow store that cannot be used, and the way out."""
    return (f"{path}: not a usable MLflow store ({problem}); move it aside (mv {path} {path}.broken) and rerun: a "
            f"new store is made, and rerunning export (dvc repro -f export) registers the models again")


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
    check_sqlite(sqlite_path(uri))  # before the lock file is made: a damaged store writes nothing
    mlflow = import_mlflow()
    with store_lock(uri):
        follow_move(sqlite_path(uri))
        try:
            retry_locked(lambda: mlflow.MlflowClient(uri).search_experiments(max_results=1))
        except Exception as e:  # damage the header check cannot see (SQLAlchemy wraps sqlite3's error)
            if not any(word in str(e) for word in ("file is not a database", "malformed")):
                raise
            raise TrackingError(damaged(sqlite_path(uri), "SQLite: " + str(e).splitlines()[0][:200])) from None
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
