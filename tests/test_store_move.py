"""A sqlite store that moves with its checkout (kdpipe/store_moves.py): the artifact locations under the folder it
was made in follow it; another checkout's artifacts in the same store, and a store that did not move, are left
as they are; a store made before the folder tag gets it when its artifacts lie beside it; a reader (`kdpipe
predict`'s download) finds the moved artifacts without writing to the store."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from kdpipe import store, store_moves, tracking
from kdpipe.ship import registry


@pytest.fixture(scope="module")
def mlflow():
    return store.import_mlflow()


def make_store(mlflow, folder: Path, other: Path) -> None:
    """A store in `folder` with one kdpipe experiment (artifacts beside it, one run with a file) and one whose
    artifacts are in another checkout, `other` (a shared store)."""
    folder.mkdir()
    store._set_uri(mlflow, f"sqlite:///{folder / store.DB_FILE}")
    (folder / "note.txt").write_text("from the store's own checkout")
    with mlflow.start_run(experiment_id=tracking._experiment_id(mlflow, "kdpipe", folder)):
        mlflow.log_artifact(str(folder / "note.txt"))
    mlflow.create_experiment("shared", artifact_location=(other / store.ARTIFACT_DIR).as_uri())


def locations(db: Path) -> dict[str, str]:
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("SELECT name, artifact_location FROM experiments"))


def test_a_moved_store_follows_its_folder_and_leaves_other_checkouts_alone(mlflow, tmp_path):
    first, other = tmp_path / "first", tmp_path / "other-checkout"
    make_store(mlflow, first, other)
    assert store_moves.follow_move(first / store.DB_FILE) == ([], 0)  # where it was made: nothing to do
    moved = tmp_path / "moved"
    shutil.move(first, moved)
    db = moved / store.DB_FILE
    assert locations(db)["kdpipe"].startswith(first.as_uri() + "/")

    assert store_moves.follow_move(db) == ([first], 2)  # the kdpipe experiment's folder and its run's
    assert locations(db)["kdpipe"] == (moved / store.ARTIFACT_DIR).as_uri()
    assert locations(db)["shared"] == (other / store.ARTIFACT_DIR).as_uri()  # another checkout's: untouched
    assert store_moves.follow_move(db) == ([], 0)  # once
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("kdpipe").experiment_id])
    got = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="note.txt",
                                              dst_path=str(tmp_path / "got"), tracking_uri=f"sqlite:///{db}")
    assert Path(got).read_text() == "from the store's own checkout"


def test_a_store_made_before_the_tag_is_tagged_when_its_artifacts_lie_beside_it(mlflow, tmp_path):
    folder = tmp_path / "old-store"
    make_store(mlflow, folder, tmp_path / "elsewhere")
    db = folder / store.DB_FILE
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM experiment_tags WHERE key = ?", (store_moves.STORE_DIR_TAG,))
    assert store_moves.follow_move(db) == ([], 0)
    with sqlite3.connect(db) as conn:
        tagged = dict(conn.execute("SELECT e.name, t.value FROM experiment_tags t JOIN experiments e "
                                   "ON e.experiment_id = t.experiment_id WHERE t.key = ?", (store_moves.STORE_DIR_TAG,)))
    assert tagged == {"kdpipe": str(folder.resolve())}  # not "shared", nor Default (made in the cwd)


def test_a_reader_resolves_a_moved_store_at_use_and_writes_nothing(mlflow, tmp_path):
    first = tmp_path / "first"
    make_store(mlflow, first, tmp_path / "other-checkout")
    moved = tmp_path / "moved"
    shutil.move(first, moved)  # the old folder is gone: only the moved artifacts can answer
    uri = f"sqlite:///{moved / store.DB_FILE}"
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("kdpipe").experiment_id])
    source = f"{run.info.artifact_uri}/note.txt"
    assert source.startswith(first.as_uri() + "/"), source  # what the store still says
    before = (moved / store.DB_FILE).read_bytes()
    got = registry._download("models:/note@champion", source, tmp_path / "got", uri)
    assert got.read_text() == "from the store's own checkout"
    assert (moved / store.DB_FILE).read_bytes() == before  # resolved at use: the store is as it was
    assert store_moves.moved_from(moved / store.DB_FILE) == [first]  # still to follow, by the next writer
