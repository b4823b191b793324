"""Files: atomic writes, JSON/CSV/text, torch save/load with one-line errors, and the md5 DVC hashes with.

Every file is written to a temporary name beside its target and renamed into place, so a crash or a
Ctrl-C never leaves half a file where DVC or the next stage would read it.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

from kdpipe.env import is_main
from kdpipe.errors import UserError


class OutputError(UserError):
    """An output that cannot be written (read-only folder, a file in the way, full disk): the message names the
    file or folder; whatever was there before stays as it was."""


# What to do about the OSErrors a write meets: the environment's fault, not kdpipe's.
WRITE_FIXES = {
    errno.ENOSPC: "free disk space and rerun", errno.EDQUOT: "free disk space (quota) and rerun",
    errno.EFBIG: "the file exceeds the size limit (ulimit -f); raise it or free space, and rerun",
    errno.EROFS: "the file system is read-only; point paths.* at a writable folder",
    errno.EACCES: "make the folder writable or point paths.* elsewhere",
    errno.EPERM: "make the folder writable or point paths.* elsewhere",
    errno.ENOTDIR: "a file stands where a folder is expected; move it or point paths.* elsewhere",
    errno.EEXIST: "a file stands where a folder is expected; move it or point paths.* elsewhere",
}


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write to a temporary name beside `path`, then rename: `path` is either the old file or the new one.
    A failed write (full disk, read-only folder) is an OutputError naming the file, the old file untouched."""
    path = Path(path)
    if not is_main():  # a data-parallel rank other than 0: rank 0 writes every output
        return path
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        where = f": {e.filename}" if e.filename and Path(e.filename) not in (tmp, path) else ""
        fix = WRITE_FIXES.get(e.errno, "check that the folder is writable and the disk has room")
        raise OutputError(f"{path}: cannot write it ({e.strerror or e}{where}); {fix}") from None
    finally:
        with contextlib.suppress(OSError):  # a missing folder or a file in the way has no temp file to remove
            tmp.unlink(missing_ok=True)
    return path


def require_writable(folders: dict[str, str | Path]) -> None:
    """Fail before any work when an output folder (`paths.<key>` → folder) cannot be created or written:
    a file in the way, or a read-only place. Creates nothing."""
    for key, folder in folders.items():
        folder = Path(folder)
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        if not existing.is_dir():
            raise OutputError(f"{key}: {folder} cannot be a folder, {existing} is a file; "
                              f"move that file or point {key} elsewhere")
        if not os.access(existing, os.W_OK):  # also false for root on a read-only file system
            raise OutputError(f"{key}: {existing} is not writable; make it writable or point {key} elsewhere")


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def write_csv(path: str | Path, rows: list[dict]) -> Path:
    """Rows as CSV with the union of their keys as columns (first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, buf.getvalue())


def write_npz(path: str | Path, arrays: dict[str, Any]) -> Path:
    """numpy arrays as an .npz that np.load reads, byte-identical for identical arrays: numpy's own savez stamps
    each member with the current time, which would make DVC see a new file on every run."""
    import zipfile

    import numpy as np

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(info, "w") as member:
                np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)
    return atomic_write_bytes(path, buf.getvalue())


def save_torch(path: str | Path, obj: Any) -> Path:
    import torch  # here, not at the top: `kdpipe verify` reads file_md5 from this module without torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_torch(path: str | Path, error: type[UserError], *, missing: str, unreadable: str, fix: str = ""):
    """torch.load(weights_only=True) of a file another stage wrote; `error` with a one-line message naming the
    file when it is missing ("<path>: <missing>") or unreadable ("<path>: <unreadable> (<reason>)[; <fix>]")."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {missing}")
    try:
        with warnings.catch_warnings():  # foreign pickles warn about their protocol: the error says enough
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, corrupt or foreign files raise many types
        raise error(f"{path}: {unreadable} ({load_failure(e)})" + (f"; {fix}" if fix else "")) from None


def load_failure(e: Exception) -> str:
    """The informative part of a torch.load exception, on one line (weights-only failures wrap it in a
    paragraph about PyTorch 2.6's defaults)."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    detail = " ".join(text.split())
    if len(detail) > 200:
        detail = detail[:200] + "..."
    return f"{type(e).__name__}: {detail}" if detail else f"{type(e).__name__}, the file is empty or truncated"


CHUNK = 1 << 20


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
