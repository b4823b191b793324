"""A sqlite MLflow store that moved with its checkout. MLflow keeps every artifact location absolute (it
resolves relative ones against the cwd), so a copied or moved checkout would read, and write, the old folder's
artifacts. kdpipe tags each experiment it creates with the folder its sqlite file was in (STORE_DIR_TAG); when
that file is found in another folder, the locations under the old folder are rewritten to the new one
(follow_move, run by store.prepare_store before a stage logs, and by `kdpipe store`). Readers that must not
write (`kdpipe predict`) resolve a location at use instead (rebased). No lock is needed: a rewrite changes only
values that still start with the old folder, so two processes doing it at once do it once.
Plain sqlite3 on MLflow's schema (LOCATION_COLUMNS), no mlflow import: it runs before MLflow opens the file.
"""

from __future__ import annotations

from pathlib import Path

STORE_DIR_TAG = "kdpipe.store_dir"
# Where MLflow 3's sqlite schema keeps artifact locations (experiments, runs, logged models, model versions).
LOCATION_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                    ("logged_models", "artifact_location"), ("model_versions", "source"),
                    ("model_versions", "storage_location"))


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (relative to the cwd unless absolute); None for other stores."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?")[0]
    return Path(path) if path and path != ":memory:" else None


def store_dir_tag(uri: str) -> dict[str, str]:
    """The experiment tag kdpipe gives a new experiment of the sqlite store `uri` (none for other stores)."""
    db = sqlite_path(uri)
    return {} if db is None else {STORE_DIR_TAG: str(db.resolve().parent)}


def follow_move(db: Path | None) -> tuple[list[Path], int]:
    """Rewrite the artifact locations of a sqlite store `db` that was moved or copied from the folder its
    experiments' STORE_DIR_TAG names to the folder it is in now: the old folders found, and the number of
    locations rewritten. Untagged experiments whose artifacts lie beside the file are tagged (stores made
    before the tag). Locations outside the old folder (a store shared by checkouts, each with its own
    artifacts) are left as they are. Silent: stages keep their one-line errors; `kdpipe store` reports it."""
    import sqlite3

    if not made(db):
        return [], 0
    try:
        return _follow(db, db.resolve().parent)
    except sqlite3.OperationalError as e:
        if "readonly" not in str(e):
            raise
        return [], 0  # a read-only store (a mounted copy) is read as it is; see rebased()


def moved_from(db: Path | None) -> list[Path]:
    """The folders the store `db` was moved or copied from and not yet followed (read only, nothing written)."""
    import sqlite3
    from contextlib import closing

    if not made(db):
        return []
    try:
        with closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=20)) as conn:
            return old_folders(conn, db.resolve().parent)
    except sqlite3.OperationalError:  # not an MLflow store yet (no such table), or locked: nothing known
        return []


def made(db: Path | None) -> bool:
    """Is there a sqlite file at `db` with something in it (a missing or empty one is a store not made yet)?"""
    return db is not None and db.is_file() and db.stat().st_size > 0


def old_folders(conn, here: Path) -> list[Path]:
    """The folders other than `here` that the store's experiments were tagged with (STORE_DIR_TAG)."""
    rows = conn.execute("SELECT DISTINCT value FROM experiment_tags WHERE key = ? AND value != ?",
                        (STORE_DIR_TAG, str(here))).fetchall()
    return [Path(value) for (value,) in rows]


def rebased(location: str, db: Path | None) -> str:
    """An artifact `location` of the store `db` as it is now: under its folder when the store was moved from
    the folder the location names. What readers (`kdpipe predict`) use, so that reading never writes."""
    for old in moved_from(db):
        for old_prefix, new_prefix in prefixes(old, db.resolve().parent):
            if location.startswith(old_prefix):
                return new_prefix + location[len(old_prefix):]
    return location


def prefixes(old: Path, new: Path) -> tuple[tuple[str, str], ...]:
    """How a location under folder `old` starts, as a file: URI or a plain path, and what it becomes under `new`."""
    return (old.as_uri() + "/", new.as_uri() + "/"), (f"{old}/", f"{new}/")


def _follow(db: Path, here: Path) -> tuple[list[Path], int]:
    """follow_move's work in one transaction: the old folders found, and the locations rewritten."""
    import sqlite3
    from contextlib import closing

    with closing(sqlite3.connect(db, timeout=20)) as conn, conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not {"experiments", "experiment_tags"} <= tables:
            return [], 0  # not made yet: MLflow creates its tables after this
        tag_untagged(conn, here)
        moved = old_folders(conn, here)
        count = 0
        for old in moved:
            for table, column in LOCATION_COLUMNS:
                if table in tables:
                    count += rebase_column(conn, table, column, old, here)
            conn.execute("UPDATE experiment_tags SET value = ? WHERE key = ? AND value = ?",
                         (str(here), STORE_DIR_TAG, str(old)))
    return moved, count


def tag_untagged(conn, here: Path) -> None:
    """STORE_DIR_TAG on experiments without it whose artifact location lies in the store's folder `here`."""
    prefix = here.as_uri() + "/"
    conn.execute("INSERT OR IGNORE INTO experiment_tags (key, value, experiment_id) SELECT ?, ?, experiment_id FROM "
                 "experiments WHERE substr(artifact_location, 1, ?) = ? AND experiment_id NOT IN (SELECT "
                 "experiment_id FROM experiment_tags WHERE key = ?)",
                 (STORE_DIR_TAG, str(here), len(prefix), prefix, STORE_DIR_TAG))


def rebase_column(conn, table: str, column: str, old: Path, new: Path) -> int:
    """`table.column` values under folder `old` (as file: URIs or plain paths) moved under `new`; rows changed."""
    count = 0
    for old_prefix, new_prefix in prefixes(old, new):
        count += conn.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) "  # noqa: S608 (names above)
                              f"WHERE substr({column}, 1, ?) = ?",
                              (new_prefix, len(old_prefix) + 1, len(old_prefix), old_prefix)).rowcount
    return count
