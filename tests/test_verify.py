"""`kdpipe verify` on a copy of the session's DVC repo: a clean checkout passes, damaged, missing and extra
outputs are named with the stage that made them, and the hashes are DVC's own."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import subprocess_env

from kdpipe import cli, verify

KDPIPE = str(Path(sys.executable).parent / "kdpipe")


@pytest.fixture
def checkout(dvc_repo, tmp_path) -> Path:
    """A copy of the DVC repo (workspace, cache, git) that a test may damage."""
    return Path(shutil.copytree(dvc_repo.root, tmp_path / "repo", symlinks=True))


def lock_outs(root: Path) -> list[dict]:
    return [out for _, out in verify.lock_outputs(yaml.safe_load((root / "dvc.lock").read_text()))]


def flip_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def run_verify(root: Path, capsys) -> tuple[int, list[str]]:
    code = cli.main(["verify", str(root)])
    return code, capsys.readouterr().out.splitlines()


@pytest.mark.slow
def test_a_clean_checkout_verifies(checkout):
    """The real command, from the checkout: exit 0 and one line counting every file dvc.lock records."""
    files = sum(out.get("nfiles", 1) for out in lock_outs(checkout))
    out = subprocess.run([KDPIPE, "verify"], cwd=checkout, env=subprocess_env(), capture_output=True, text=True)
    assert (out.returncode, out.stdout, out.stderr) == (0, f"verified {files} files\n", "")


@pytest.mark.slow
def test_directory_hashes_are_dvcs(checkout):
    """Each directory output hashes to dvc.lock's md5, and where the cache holds the manifest our bytes are
    the ones `dvc repro` wrote."""
    folders = [out for out in lock_outs(checkout) if out["md5"].endswith(".dir")]
    assert any(verify.cached_manifest(checkout, out["md5"]) for out in folders)  # both paths are exercised
    assert any(verify.cached_manifest(checkout, out["md5"]) is None for out in folders)
    for out in folders:
        entries = verify.manifest(checkout / out["path"])
        assert verify.dir_md5(entries) == out["md5"], out["path"]
        cached = verify.cache_path(checkout, out["md5"])
        if cached.is_file():
            assert json.dumps(entries, sort_keys=True).encode() == cached.read_bytes(), out["path"]


@pytest.mark.slow
def test_flipped_bytes_are_named_with_their_stages(checkout, capsys):
    """One byte flipped in the prepared data (inside a directory output) and in the exported student: both
    named, with the stage to rerun and the command that restores them; exit 1."""
    flip_byte(checkout / "data/prepared/dataset.pt")
    flip_byte(checkout / "models/student.onnx")
    assert run_verify(checkout, capsys) == (1, [
        "data/prepared/dataset.pt: content differs from dvc.lock (stage prepare); rerun it (dvc repro -f prepare) "
        "or restore it (dvc checkout --force data/prepared)",
        "models/student.onnx: content differs from dvc.lock (stage export); rerun it (dvc repro -f export) or "
        "restore it (dvc checkout --force models/student.onnx)"])


@pytest.mark.slow
def test_missing_extra_and_uncached_outputs(checkout, capsys):
    """A missing metrics file (kept in git), a file gone from and one added to a cached directory, and an
    edited report in an uncached directory (only the directory can be named there)."""
    (checkout / "metrics/teacher.json").unlink()
    (checkout / "models/distill/seed0.pt").rename(checkout / "models/distill/seed9.pt")
    (checkout / "reports/evaluate/evaluate.md").write_text("edited\n")
    code, lines = run_verify(checkout, capsys)
    assert code == 1
    assert [line.split(";")[0] for line in lines] == [
        "metrics/teacher.json: missing (stage teacher)",
        "models/distill/seed0.pt: missing (stage distill)",
        "models/distill/seed9.pt: not in dvc.lock (stage distill)",
        "reports/evaluate: content differs from dvc.lock (stage evaluate)"]
    assert lines[0].endswith("restore it (git checkout -- metrics/teacher.json)")


def test_without_dvc_lock_it_says_so_in_one_line(tmp_path, capsys):
    assert cli.main(["verify", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdpipe verify: error: no dvc.lock in ") and err.count("\n") == 1
