"""The prepare stage's output format: labels, statistics and digest in dataset.pt, each split's images beside it
as a plain uint8 `<split>_x.npy` (so a split larger than memory can be streamed from disk)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from kdpipe.data.splits import DataError
from kdpipe.files import WRITE_FIXES, OutputError, load_torch, save_torch

IMAGE_SPLITS = ("train_x", "val_x", "test_x")  # kept on disk as <key>.npy beside dataset.pt


PREPARED_KEYS = ("train_y", "val_y", "test_y", "classes", "mean", "std", "image_shape", "digest")


def prepared_array(path: str | Path, key: str) -> Path:
    """Where the prepared dataset at `path` (Paths.dataset) keeps split `key`'s images."""
    return Path(path).with_name(f"{key}.npy")


def save_prepared(path: str | Path, prepared: dict) -> None:
    """The prepared dataset: each split's images as `<split>_x.npy` (already on disk under a temporary name when
    prepare streamed them there, else written now), then everything else as `path` (dataset.pt), last, so a
    failure leaves the old dataset.pt; temporary files are removed either way."""
    from kdpipe.data.ondisk import OnDiskArray, stage_npy

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
    from kdpipe.data.ondisk import OnDiskArray

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
