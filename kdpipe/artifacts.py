"""Reading and writing artifacts: atomic writes, prepared data, checkpoints that carry their params.

Every file is written to a temporary name beside its target and renamed into place, so a crash or a
Ctrl-C never leaves half a file where DVC or the next stage would read it.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

import torch

from kdpipe.data import DataError
from kdpipe.errors import UserError

CHECKPOINT_KEYS = ("state_dict", "model", "in_channels", "num_classes", "mean", "std", "classes")


class CheckpointError(UserError):
    """A checkpoint that cannot be used: the message names the file and what is wrong."""


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


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


def load_torch(path: str | Path, error: type[UserError], *, missing: str, unreadable: str):
    """torch.load(weights_only=True) of a file another stage wrote; `error` with a one-line message naming the
    file when it is missing ("<path>: <missing>") or unreadable ("<path>: <unreadable> (<exception>)")."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {missing}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, corrupt or foreign files raise many types
        raise error(f"{path}: {unreadable} ({type(e).__name__}: {e})".splitlines()[0]) from None


def load_prepared(path: str | Path) -> dict:
    """The prepare stage's dataset file (Paths.dataset); a clear error when it is missing or not ours."""
    data = load_torch(path, DataError, missing="not found; run the prepare stage first (dvc repro prepare)",
                      unreadable="not a readable prepared dataset")
    missing = [k for k in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y", "classes") if k not in data]
    if missing:
        raise DataError(f"{path}: missing {', '.join(missing)}; rerun the prepare stage")
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
                          num_classes: int | None = None, mean=None, std=None):
    """Rebuild a model from a kdpipe checkpoint, or from a bare state dict of `fallback_model`."""
    from kdpipe.models import build_model

    ckpt = load_checkpoint(path)
    if "state_dict" in ckpt:
        missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
        if missing:
            raise CheckpointError(f"{path}: missing {', '.join(missing)}")
        name, state = ckpt["model"], ckpt["state_dict"]
        in_channels, num_classes = ckpt["in_channels"], ckpt["num_classes"]
        mean, std = ckpt["mean"], ckpt["std"]
    elif fallback_model and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        name, state = fallback_model, ckpt
    else:
        raise CheckpointError(f"{path}: neither a kdpipe checkpoint nor a state dict")
    try:
        model = build_model(name, in_channels, num_classes, mean=mean, std=std)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if "state_dict" not in ckpt:
        # A bare state dict is the network alone: prefix it as our body and keep the dataset's normalisation.
        state = {(k if k.startswith("body.") else f"body.{k}"): v for k, v in state.items()}
        state = {"mean": model.mean, "std": model.std, **state}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise CheckpointError(f"{path}: weights do not fit {name}: {first}") from None
    return model, ckpt


def load_trained(path: str | Path, digest: str, *, stage: str):
    """(model on the CPU in eval mode, checkpoint) written by `stage` on the dataset with `digest`.

    The one check every consumer of a checkpoint makes: it exists, it loads, and it was trained on the data
    prepared now (a stale checkpoint would otherwise be evaluated or shipped against other test images).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; run the {stage} stage first (dvc repro {stage})")
    model, ckpt = build_from_checkpoint(path)
    if ckpt.get("dataset_digest") not in (None, digest):
        raise CheckpointError(f"{path}: made for another dataset (digest {ckpt['dataset_digest'][:12]}, "
                              f"prepared data is {digest[:12]}); rerun the {stage} stage (dvc repro {stage})")
    return model.cpu().eval(), ckpt
