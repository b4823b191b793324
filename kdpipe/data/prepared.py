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
# A text dataset (modality "text"): each split's token ids (N, max_length) int32 as <split>_ids.npy and lengths
# (N,) int32 as <split>_lengths.npy beside dataset.pt, and the tokenizer as tokenizer.json (Paths.tokenizer)
TEXT_ARRAYS = ("ids", "lengths")
TEXT_KEYS = ("train_y", "val_y", "test_y", "classes", "digest", "modality", "pad_id", "max_length", "vocab_size")
SPLIT_NAMES = ("train", "val", "test")


def text_array(path: str | Path, split: str, what: str) -> Path:
    """Where the prepared text dataset at `path` (Paths.dataset) keeps `split`'s `what` (ids or lengths)."""
    return Path(path).with_name(f"{split}_{what}.npy")


def tokenizer_file(path: str | Path) -> Path:
    """The tokenizer.json beside the prepared dataset at `path` (Paths.dataset)."""
    return Path(path).with_name("tokenizer.json")


def is_text(prepared: dict) -> bool:
    return prepared.get("modality", "image") == "text"


def prepared_array(path: str | Path, key: str) -> Path:
    """Where the prepared dataset at `path` (Paths.dataset) keeps split `key`'s images."""
    return Path(path).with_name(f"{key}.npy")


def save_prepared(path: str | Path, prepared: dict) -> None:
    """The prepared dataset: each split's images as `<split>_x.npy` (already on disk under a temporary name when
    prepare streamed them there, else written now), then everything else as `path` (dataset.pt), last, so a
    failure leaves the old dataset.pt; temporary files are removed either way."""
    from kdpipe.data.ondisk import OnDiskArray, stage_npy

    if is_text(prepared):
        return save_text(path, prepared)
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


def save_text(path: str | Path, prepared: dict) -> None:
    """A text dataset: the id and length arrays and tokenizer.json, each written to a temporary name and moved
    into place, then dataset.pt last (so a failure leaves the old dataset.pt)."""
    import numpy as np

    from kdpipe.files import atomic_write_bytes

    current = Path(path)
    try:
        current.parent.mkdir(parents=True, exist_ok=True)
        for split in SPLIT_NAMES:
            for what, key in zip(TEXT_ARRAYS, (f"{split}_x", f"{split}_lengths"), strict=True):
                current = text_array(path, split, what)
                tmp = current.with_name(f".{current.name}.tmp")
                with open(tmp, "wb") as f:
                    np.save(f, prepared[key].numpy().astype(np.int32))
                os.replace(tmp, current)
    except OSError as e:
        fix = WRITE_FIXES.get(e.errno, "check that the folder is writable and the disk has room")
        raise OutputError(f"{current}: cannot write it ({e.strerror or e}); {fix}") from None
    atomic_write_bytes(tokenizer_file(path), prepared["tokenizer_json"].encode())
    arrays = {f"{split}_{k}" for split in SPLIT_NAMES for k in ("x", "lengths")} | {"tokenizer_json"}
    save_torch(path, {k: v for k, v in prepared.items() if k not in arrays})


def load_text(path: Path, data: dict, rerun: str) -> dict:
    """The text arrays beside dataset.pt as int32 tensors (<split>_x ids, <split>_lengths), checked against it."""
    import numpy as np

    missing = [k for k in TEXT_KEYS if k not in data]
    if missing:
        raise DataError(f"{path}: missing {', '.join(missing)}; {rerun}")
    for split in SPLIT_NAMES:
        arrays = []
        for what in TEXT_ARRAYS:
            file = text_array(path, split, what)
            try:
                arrays.append(np.load(file, mmap_mode="r"))
            except (OSError, ValueError) as e:
                raise DataError(f"{file}: not a readable .npy file ({str(e).splitlines()[0]}); {rerun}") from None
        ids, lengths = arrays
        n = len(data[f"{split}_y"])
        if ids.dtype != np.int32 or ids.shape != (n, data["max_length"]) or lengths.shape != (n,):
            raise DataError(f"{text_array(path, split, 'ids')}: {ids.dtype} {ids.shape}, but {path} has {n} labels "
                            f"of up to {data['max_length']} tokens; {rerun}")
        data[f"{split}_x"], data[f"{split}_lengths"] = torch.from_numpy(np.array(ids)), torch.from_numpy(np.array(lengths))
    return data


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
    if is_text(data):
        return load_text(Path(path), data, rerun)
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
