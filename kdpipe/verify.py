"""`kdpipe verify`: are the pipeline's outputs in the workspace the ones dvc.lock records?

DVC trusts the files it finds: `dvc status` compares modification times and sizes with its state cache, and
`dvc checkout` re-links what it believes is there, so a file edited or damaged in place can pass unnoticed.
This re-hashes every output of every stage in dvc.lock (data, models, metrics, plots, reports) the way DVC 3
hashes them and names the stage that produced each mismatch:

  * a file: md5 of its bytes (DVC 3's `hash: md5`; DVC 2's md5-dos2unix differs only for CRLF text files);
  * a directory: md5 of its manifest, the JSON list `[{"md5": ..., "relpath": ...}]` sorted by relpath and
    dumped with sorted keys, plus ".dir". When the cache holds the manifest (`.dvc/cache/files/md5/ab/cd….dir`)
    each file is checked against it, so a mismatch names the file; otherwise the manifest is rebuilt from the
    workspace and only the directory can be named.

Reads dvc.lock with yaml and imports no dvc: the library never does.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from kdpipe.errors import EXIT_USER_ERROR, UserError
from kdpipe.files import file_md5

LOCK_FILE = "dvc.lock"
CACHE = Path(".dvc/cache/files/md5")  # DVC 3's default cache, relative to the repo root


@dataclass(frozen=True)
class Mismatch:
    """One output (or one file of a directory output) that is not what dvc.lock records."""

    path: str  # as dvc.lock spells it, or <directory>/<file> for a file inside a directory output
    stage: str
    problem: str  # "content differs from dvc.lock" | "missing" | "not in dvc.lock"
    restore: str  # the command that puts the recorded output back

    def line(self) -> str:
        return (f"{self.path}: {self.problem} (stage {self.stage}); rerun it (dvc repro -f {self.stage}) or "
                f"restore it ({self.restore})")


def files_in(folder: Path) -> list[str]:
    """The files under `folder` as posix relpaths, in DVC's manifest order (sorted by relpath)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def manifest(folder: Path) -> list[dict[str, str]]:
    """A directory's manifest as DVC writes it: [{"md5", "relpath"}] in files_in order."""
    return [{"md5": file_md5(folder / rel), "relpath": rel} for rel in files_in(folder)]


def dir_md5(entries: list[dict[str, str]]) -> str:
    """DVC 3's hash of a directory output from its manifest (dvc_data's Tree.as_bytes, then md5 + ".dir")."""
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode(), usedforsecurity=False).hexdigest() + ".dir"


def cache_path(root: Path, md5: str) -> Path:
    return root / CACHE / md5[:2] / md5[2:]


def cached_manifest(root: Path, md5: str) -> list[dict[str, str]] | None:
    """The manifest `dvc repro` stored in the cache for a directory hash; None for an uncached output (or a
    cache moved elsewhere by `dvc cache dir`)."""
    try:
        return json.loads(cache_path(root, md5).read_text())
    except (OSError, ValueError):
        return None


class LockError(UserError):
    """dvc.lock (or dvc.yaml, params.yaml) cannot be read: the message names the file, the problem and the fix."""


FIXES = {LOCK_FILE: "restore it (git checkout -- dvc.lock) or rebuild it (dvc repro)",
         "dvc.yaml": "restore it (git checkout -- dvc.yaml)", "params.yaml": "fix it (kdpipe check-params says how)"}


def read_yaml(path: Path) -> dict:
    """A YAML mapping file of the repo ({} when it is missing or empty); LockError naming it when it is not one."""
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        problem = " ".join(str(getattr(e, "problem", None) or getattr(e, "strerror", None) or e).split())
        raise LockError(f"{path}: not readable YAML{where}: {problem}; {FIXES.get(path.name, 'restore it')}") from None
    if data is not None and not isinstance(data, dict):
        raise LockError(f"{path}: not a mapping (got {type(data).__name__}); {FIXES.get(path.name, 'restore it')}")
    return data or {}


def read_lock(root: Path) -> dict:
    """dvc.lock as a mapping whose stages each list their outs as {path, ...} entries; LockError otherwise."""
    path = root / LOCK_FILE
    lock, fix = read_yaml(path), FIXES[LOCK_FILE]
    stages = lock.get("stages") or {}
    if not isinstance(stages, dict):
        raise LockError(f"{path}: `stages` is not a mapping of stage names; {fix}")
    for stage, entry in stages.items():
        outs = (entry.get("outs") or []) if isinstance(entry, dict) else None
        if not isinstance(outs, list) or not all(isinstance(o, dict) and isinstance(o.get("path"), str)
                                                 and isinstance(o.get("md5", ""), str) for o in outs):
            raise LockError(f"{path}: stage {stage!r} does not list its outs as entries with a path; {fix}")
    return lock


def uncached_outputs(root: Path) -> set[str]:
    """The outputs dvc.yaml declares with `cache: false` (kept in git, which `dvc checkout` does not restore),
    their ${...} filled from params.yaml as DVC fills them."""
    spec, params = read_yaml(root / "dvc.yaml"), read_yaml(root / "params.yaml")
    stages = spec.get("stages") if isinstance(spec.get("stages"), dict) else {}
    declared = (item for stage in stages.values() if isinstance(stage, dict) for key in ("outs", "metrics", "plots")
                for item in stage.get(key) or [] if isinstance(item, dict))
    return {posixpath.normpath(_fill(path, params or {})) for item in declared for path, options in item.items()
            if (options or {}).get("cache") is False}


def _fill(text: str, params: dict) -> str:
    """`${section.key}` replaced by its value in params (left as it is when params lack it)."""
    def value(match: re.Match) -> str:
        node = params
        for key in match[1].split("."):
            if not isinstance(node, dict) or key not in node:
                return match[0]
            node = node[key]
        return str(node)

    return re.sub(r"\$\{\s*([\w.-]+)\s*\}", value, text)


def lock_outputs(lock: dict) -> Iterator[tuple[str, dict]]:
    """(stage, out entry) for every output dvc.lock records."""
    for stage, entry in (lock.get("stages") or {}).items():
        for out in entry.get("outs") or []:
            yield stage, out


def check_output(root: Path, stage: str, out: dict, uncached: set[str]) -> tuple[int, list[Mismatch]]:
    """(files checked, mismatches) for one output entry of dvc.lock; `uncached`: see uncached_outputs."""
    rel, md5 = out["path"], out.get("md5", "")
    path = root / rel
    # --force: without it `dvc checkout` refuses to overwrite a changed file
    restore = f"git checkout -- {rel}" if posixpath.normpath(rel) in uncached else f"dvc checkout --force {rel}"
    differs = [Mismatch(rel, stage, "content differs from dvc.lock", restore)]
    if not path.exists():
        return out.get("nfiles", 1), [Mismatch(rel, stage, "missing", restore)]
    if not md5.endswith(".dir"):
        return 1, [] if path.is_file() and file_md5(path) == md5 else differs
    if not path.is_dir():
        return 1, differs
    recorded = cached_manifest(root, md5)
    if recorded is None:
        entries = manifest(path)
        return len(entries), [] if dir_md5(entries) == md5 else differs
    return len(recorded), check_folder(path, recorded, stage, rel, restore)


def check_folder(folder: Path, recorded: list[dict[str, str]], stage: str, rel: str, restore: str) -> list[Mismatch]:
    """Each file of a directory output against the manifest from the cache, then the files it does not list."""
    out = []
    for entry in recorded:
        path, name = folder / entry["relpath"], f"{rel}/{entry['relpath']}"
        if not path.is_file():
            out.append(Mismatch(name, stage, "missing", restore))
        elif file_md5(path) != entry["md5"]:
            out.append(Mismatch(name, stage, "content differs from dvc.lock", restore))
    listed = {entry["relpath"] for entry in recorded}
    return out + [Mismatch(f"{rel}/{extra}", stage, "not in dvc.lock", restore)
                  for extra in files_in(folder) if extra not in listed]


def verify(root: Path) -> tuple[int, list[Mismatch]]:
    """(files checked, mismatches) for every output in root/dvc.lock. FileNotFoundError without dvc.lock."""
    lock = read_lock(root)
    checked, mismatches, uncached = 0, [], uncached_outputs(root)
    for stage, out in lock_outputs(lock):
        n, bad = check_output(root, stage, out, uncached)
        checked, mismatches = checked + n, mismatches + bad
    return checked, mismatches


def main(root: str | Path = ".", lock_only: bool = False) -> int:
    """Print every mismatch (exit 1) or "verified N files" (exit 0); exit 2 and one line when there is no
    dvc.lock or it cannot be read. `lock_only`: only read dvc.lock (no hashing; a missing one is fine: nothing
    has run yet), as `make run` does before `dvc repro`, whose own error would not name the file."""
    root = Path(root)
    try:
        if lock_only:
            stages = read_lock(root).get("stages") or {}
            print(f"{LOCK_FILE}: ok ({len(stages)} stages)" if (root / LOCK_FILE).exists() else f"no {LOCK_FILE} yet")
            return 0
        if not (root / LOCK_FILE).is_file():
            print(f"kdpipe verify: error: no {LOCK_FILE} in {root.resolve()}; run `dvc repro` first", file=sys.stderr)
            return EXIT_USER_ERROR
        checked, mismatches = verify(root)
    except LockError as e:
        print(f"kdpipe verify: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    for mismatch in mismatches:
        print(mismatch.line())
    if mismatches:
        print(f"kdpipe verify: {len(mismatches)} mismatches with {LOCK_FILE} ({checked} files checked)", file=sys.stderr)
        return 1
    print(f"verified {checked} files")
    return 0
