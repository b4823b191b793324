"""Reading and writing artifacts: atomic writes, prepared data, checkpoints that carry their params.

Every file is written to a temporary name beside its target and renamed into place, so a crash or a
Ctrl-C never leaves half a file where DVC or the next stage would read it.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from kdpipe.data import DataError
from kdpipe.env import is_main
from kdpipe.errors import UserError

CHECKPOINT_KEYS = ("state_dict", "model", "in_channels", "num_classes", "mean", "std", "classes")


class CheckpointError(UserError):
    """A checkpoint that cannot be used: the message names the file and what is wrong."""


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


def save_torch(path: str | Path, obj: Any) -> Path:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_torch(path: str | Path, error: type[UserError], *, missing: str, unreadable: str, fix: str = ""):
    """torch.load(weights_only=True) of a file another stage wrote; `error` with a one-line message naming the
    file when it is missing ("<path>: <missing>") or unreadable ("<path>: <unreadable> (<reason>)[; <fix>]")."""
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


IMAGE_SPLITS = ("train_x", "val_x", "test_x")  # kept on disk as <key>.npy beside dataset.pt
PREPARED_KEYS = ("train_y", "val_y", "test_y", "classes", "mean", "std", "image_shape", "digest")


def prepared_array(path: str | Path, key: str) -> Path:
    """Where the prepared dataset at `path` (Paths.dataset) keeps split `key`'s images."""
    return Path(path).with_name(f"{key}.npy")


def save_prepared(path: str | Path, prepared: dict) -> None:
    """The prepared dataset: each split's images as `<split>_x.npy` (already on disk under a temporary name when
    prepare streamed them there, else written now), then everything else as `path` (dataset.pt), last, so a
    failure leaves the old dataset.pt; temporary files are removed either way."""
    from kdpipe.ondisk import OnDiskArray, stage_npy

    staged: list[Path] = []
    current = Path(path)
    try:
        arrays = {}
        for key in IMAGE_SPLITS:
            x, current = prepared[key], prepared_array(path, key)
            arrays[key] = x if isinstance(x, OnDiskArray) else stage_npy(current, x)
            staged.append(arrays[key].path)
        for key, array in arrays.items():
            current = prepared_array(path, key)
            os.replace(array.path, current)
    except OSError as e:
        fix = WRITE_FIXES.get(e.errno, "check that the folder is writable and the disk has room")
        raise OutputError(f"{current}: cannot write it ({e.strerror or e}); {fix}") from None
    finally:
        for tmp in staged:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
    save_torch(path, {k: v for k, v in prepared.items() if k not in IMAGE_SPLITS})


def load_prepared(path: str | Path, *, lazy: bool = False) -> dict:
    """The prepare stage's dataset (Paths.dataset and the `<split>_x.npy` beside it); a clear error when a file is
    missing, truncated or not ours. `lazy`: images stay on disk as ondisk.OnDiskArray (read when used), else
    they are read into uint8 tensors."""
    from kdpipe.ondisk import OnDiskArray

    rerun = "rerun the prepare stage (dvc repro prepare)"
    data = load_torch(path, DataError, missing="not found; run the prepare stage first (dvc repro prepare)",
                      unreadable="not readable, truncated or corrupt", fix=rerun)
    if not isinstance(data, dict):
        raise DataError(f"{path}: holds a {type(data).__name__}, not a prepared dataset; {rerun}")
    missing = [k for k in PREPARED_KEYS if k not in data]
    if missing:
        raise DataError(f"{path}: missing {', '.join(missing)}; {rerun}")
    for key in IMAGE_SPLITS:
        if isinstance(data.get(key), torch.Tensor):  # a dataset.pt from before images moved to .npy files
            continue
        array = OnDiskArray.open(prepared_array(path, key))
        labels = data[key.replace("_x", "_y")]
        if len(array) != len(labels) or list(array.shape[1:]) != list(data["image_shape"]):
            raise DataError(f"{array.path}: {tuple(array.shape)} images, but {path} has {len(labels)} labels of "
                            f"shape {data['image_shape']}; {rerun}")
        data[key] = array if lazy else array.load()
    return data


def save_checkpoint(path: str | Path, model, *, classes: list[str], params: dict, extra: dict | None = None) -> Path:
    """Weights plus everything needed to rebuild and audit them; loadable with weights_only=True."""
    ckpt = {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model": model.name,
        "in_channels": model.in_channels,
        "num_classes": model.num_classes,
        "mean": [float(v) for v in model.mean.flatten()],
        "std": [float(v) for v in model.std.flatten()],
        "input_size": model.input_size,
        "classes": list(classes),
        "params": params,
        **(extra or {}),
    }
    return save_torch(path, ckpt)


def load_checkpoint(path: str | Path) -> dict:
    """A kdpipe checkpoint dict (weights_only load); CheckpointError naming the file otherwise."""
    ckpt = load_torch(path, CheckpointError, missing="checkpoint not found", unreadable="not a loadable torch checkpoint")
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: expected a dict, got {type(ckpt).__name__}")
    return ckpt


def build_from_checkpoint(path: str | Path, *, fallback_model: str | None = None, in_channels: int | None = None,
                          num_classes: int | None = None, mean=None, std=None, finetune: bool = False):
    """Rebuild a model from a kdpipe checkpoint, or from a bare state dict of `fallback_model` (with `finetune`,
    tensors that do not fit this dataset are adapted or left freshly initialised: see bare_state)."""
    from kdpipe.models import build_model

    ckpt = load_checkpoint(path)
    if "state_dict" in ckpt:
        missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
        if missing:
            raise CheckpointError(f"{path}: missing {', '.join(missing)}")
        name, state = ckpt["model"], ckpt["state_dict"]
        in_channels, num_classes = ckpt["in_channels"], ckpt["num_classes"]
        mean, std = ckpt["mean"], ckpt["std"]
        input_size = ckpt.get("input_size")  # absent from checkpoints older than teacher.input_size
    elif fallback_model and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        name, state, input_size = fallback_model, ckpt, None
    else:
        raise CheckpointError(f"{path}: neither a kdpipe checkpoint nor a state dict")
    try:
        model = build_model(name, in_channels, num_classes, mean=mean, std=std, input_size=input_size)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if "state_dict" not in ckpt:
        state = bare_state(model, state, finetune)
    misfit = _misfit(model, state)
    if not misfit:
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            misfit = str(e).splitlines()[0]
    if misfit:
        raise CheckpointError(f"{path}: weights do not fit {name} ({misfit})")
    return model, ckpt


def bare_state(model, state: dict, finetune: bool) -> dict:
    """A bare network state dict (a torchvision model's, or one saved through DDP with "module." keys) keyed as
    `model`, a Classifier: its body under "body." (a tv: model's network under "body.net."), the dataset's
    normalisation kept. With `finetune`, a first conv for RGB is summed to grey (the usual transfer to one
    channel) and a tensor that still does not fit (the old classification head) keeps its fresh initialisation."""
    prefix = "body.net." if hasattr(model.body, "net") else "body."
    own = model.state_dict()
    out = {"mean": model.mean, "std": model.std}
    for key, value in state.items():
        key = key.removeprefix("module.")
        key = key if key.startswith("body.") else prefix + key
        if finetune and key in own and isinstance(value, torch.Tensor) and value.shape != own[key].shape:
            grey = value.dim() == 4 and own[key].shape[1] == 1 and value.shape[0] == own[key].shape[0]
            value = value.sum(1, keepdim=True) if grey else own[key]
        out[key] = value
    return out


def _misfit(model, state: dict) -> str:
    """Why `state` would not load into `model`, in a few words ("" when it fits): the first tensor of another
    shape, else how many keys are missing and unexpected (another architecture)."""
    own = model.state_dict()
    for key, value in state.items():
        if key in own and (not isinstance(value, torch.Tensor) or value.shape != own[key].shape):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            return f"{key} is {shape} in the file, {tuple(own[key].shape)} in {model.name}"
    missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    parts = [f"{len(missing)} missing keys such as {missing[0]}"] if missing else []
    parts += [f"{len(unexpected)} unexpected keys such as {unexpected[0]}"] if unexpected else []
    return ", ".join(parts)


def require_same_data(path: str | Path, found: object, digest: str, *, stage: str) -> None:
    """A file that records the dataset digest it was made from (`found`; None in files older than the digest)
    must have been made from the data prepared now; CheckpointError naming it and the stage to rerun otherwise."""
    if found not in (None, digest):
        raise CheckpointError(f"{path}: made for another dataset (digest {str(found)[:12]}, prepared data is "
                              f"{digest[:12]}); rerun the {stage} stage (dvc repro {stage})")


def load_trained(path: str | Path, digest: str, *, stage: str):
    """(model on the CPU in eval mode, checkpoint) written by `stage` on the dataset with `digest`.

    The one check every consumer of a checkpoint makes: it exists, it loads, and it was trained on the data
    prepared now (a stale checkpoint would otherwise be evaluated or shipped against other test images).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; run the {stage} stage first (dvc repro {stage})")
    try:
        model, ckpt = build_from_checkpoint(path)
    except CheckpointError as e:  # corrupt, truncated or foreign: the stage that writes it can write it again
        raise CheckpointError(f"{e}; rerun the {stage} stage (dvc repro {stage})") from None
    require_same_data(path, ckpt.get("dataset_digest"), digest, stage=stage)
    return model.cpu().eval(), ckpt


def ensemble_members(teacher: torch.nn.Module, ckpt: dict) -> list[torch.nn.Module]:
    """The teacher, followed by the other members of its ensemble (teacher.ensemble), which its checkpoint holds
    as state dicts of the same architecture."""
    import copy

    members = [teacher]
    for member in ckpt.get("ensemble", []):
        model = copy.deepcopy(teacher)
        model.load_state_dict(member["state_dict"])
        members.append(model)
    return members
