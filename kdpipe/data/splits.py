"""Prepared data: stratified splits, statistics and digests of a RawDataset, and on-device batching/augmentation.

A split that fits (Fashion-MNIST is 55 MB as uint8) lives on the training device as one tensor and is batched
with index tensors, without a DataLoader; a larger one stays on disk (kdpipe.data.ondisk) and is streamed. Whole-split
passes (statistics, digest) go a chunk at a time so they work on both. The loaders that produce a RawDataset
live in kdpipe.data.datasets.
"""

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from kdpipe.errors import UserError

SPLIT_TENSORS = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")


class DataError(UserError):
    """Bad or missing data; the message is one line naming the dataset, folder or file at fault."""


@dataclass(frozen=True)
class RawDataset:
    """A dataset as loaded from disk, before any splitting.

    train_x is uint8 (N, C, H, W) and train_y int64 (N,); test_x/test_y hold the official test split
    when the dataset has one, else None.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor | None
    test_y: torch.Tensor | None
    classes: list[str]

    def __post_init__(self) -> None:
        _check_pair("train", self.train_x, self.train_y, len(self.classes))
        if (self.test_x is None) != (self.test_y is None):
            raise DataError("RawDataset: test_x and test_y must both be set or both be None")
        if self.test_x is not None:
            _check_pair("test", self.test_x, self.test_y, len(self.classes))
            if self.test_x.shape[1:] != self.train_x.shape[1:]:
                raise DataError(f"RawDataset: test images {tuple(self.test_x.shape[1:])} differ from "
                                f"train images {tuple(self.train_x.shape[1:])}")


def _check_pair(name: str, x: torch.Tensor, y: torch.Tensor, n_classes: int) -> None:
    """Check one (images, labels) pair: dtypes, shapes, matching lengths, labels in range."""
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise DataError(f"RawDataset: {name}_x must be uint8 (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
    if y.dtype != torch.int64 or y.dim() != 1 or len(y) != len(x):
        raise DataError(f"RawDataset: {name}_y must be int64 ({len(x)},), got {y.dtype} {tuple(y.shape)}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise DataError(f"RawDataset: {name}_y has labels outside [0, {n_classes}) for {n_classes} classes")


@dataclass(frozen=True)
class Splits:
    """Sorted int64 indices into RawDataset.train_x; test_idx is None when the official test split is used."""

    train_idx: torch.Tensor
    val_idx: torch.Tensor
    test_idx: torch.Tensor | None


# ------------------------------------------------------------------------------------ splitting


def stratified_split(labels: torch.Tensor, val_fraction: float, test_fraction: float, seed: int) -> Splits:
    """Split positions 0..N-1 into sorted, disjoint train/val/test index tensors, stratified by label.

    Split sizes are round(N * fraction); each class gives its share to within one sample (largest
    remainder). Deterministic for a given seed. test_idx is None when test_fraction is 0.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"need 0 <= val_fraction, test_fraction and their sum < 1, "
                         f"got {val_fraction} and {test_fraction}")
    y = labels.detach().cpu().numpy()
    if y.size == 0:
        raise ValueError("stratified_split: no labels to split")
    classes, counts = np.unique(y, return_counts=True)
    n_test = _allocate(counts, round(len(y) * test_fraction))
    n_val = _allocate(counts, round(len(y) * val_fraction))
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c, k_test, k_val in zip(classes, n_test, n_val, strict=True):
        members = rng.permutation(np.flatnonzero(y == c))
        parts["test"].append(members[:k_test])
        parts["val"].append(members[k_test : k_test + k_val])
        parts["train"].append(members[k_test + k_val :])
    idx = {k: torch.from_numpy(np.sort(np.concatenate(v)).astype(np.int64)) for k, v in parts.items()}
    return Splits(idx["train"], idx["val"], idx["test"] if test_fraction > 0 else None)


def _allocate(counts: np.ndarray, total: int) -> np.ndarray:
    """Share `total` among classes in proportion to counts (largest remainder), each within 1 of exact."""
    exact = counts * (total / counts.sum())
    share = np.floor(exact).astype(np.int64)
    # Stable sort: ties go to the earlier class, so the result does not depend on the sort algorithm.
    order = np.argsort(-(exact - share), kind="stable")
    share[order[: total - share.sum()]] += 1
    return share


def subset_rows(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Sorted positions of a stratified, seeded sample of n of `labels` (data.train_subset)."""
    if not 0 < n < len(labels):
        raise DataError(f"data.train_subset: must be between 1 and {len(labels) - 1} "
                        f"(the training pool's size), got {n}")
    return stratified_split(labels, n / len(labels), 0.0, seed).val_idx


def subset(raw: RawDataset, n: int, seed: int) -> RawDataset:
    """A stratified, seeded sample of n images of the training pool (the official test split is kept
    whole): a smaller, faster, limited-data version of a dataset."""
    keep = subset_rows(raw.train_y, n, seed)
    return RawDataset(raw.train_x[keep], raw.train_y[keep], raw.test_x, raw.test_y, raw.classes)


def prepare_dataset(raw: RawDataset, val_fraction: float, test_fraction: float, seed: int) -> dict:
    """The prepared artifact: split tensors plus classes, train-only mean/std, digest and class counts.

    val_fraction (and test_fraction, used only when there is no official test split) are fractions of
    raw.train_x. Only plain types and tensors, so torch.load(weights_only=True) reads it back.
    """
    if raw.test_x is None and test_fraction <= 0:
        raise DataError("prepare_dataset: the dataset has no official test split, so test_fraction must be > 0")
    official = raw.test_x is not None
    splits = stratified_split(raw.train_y, val_fraction, 0.0 if official else test_fraction, seed)
    prepared: dict = {
        "train_x": raw.train_x[splits.train_idx], "train_y": raw.train_y[splits.train_idx],
        "val_x": raw.train_x[splits.val_idx], "val_y": raw.train_y[splits.val_idx],
    }  # fmt: skip
    if official:
        prepared["test_x"], prepared["test_y"] = raw.test_x.contiguous(), raw.test_y.contiguous()
    else:
        prepared["test_x"], prepared["test_y"] = raw.train_x[splits.test_idx], raw.train_y[splits.test_idx]
    carved = ("train", "val") if official else ("train", "val", "test")  # the splits taken from raw.train_x
    return summarise(prepared, raw.classes, carved, val_fraction, test_fraction)


def summarise(prepared: dict, classes: list[str], carved: tuple[str, ...], val_fraction: float,
              test_fraction: float) -> dict:
    """Add classes, train-only mean/std, class counts (every class in every carved split), image shape and
    digest to the six split arrays (in-memory tensors, or on-disk arrays streamed there by prepare)."""
    prepared["classes"] = list(classes)
    prepared["mean"], prepared["std"] = channel_stats(prepared["train_x"])
    prepared["class_counts"] = class_counts(prepared, len(classes))
    require_every_class(prepared["class_counts"], classes, carved, val_fraction, test_fraction)
    prepared["image_shape"] = list(prepared["train_x"].shape[1:])
    prepared["digest"] = dataset_digest(prepared)
    return prepared


def class_counts(prepared: dict, n_classes: int) -> dict[str, list[int]]:
    """Images per class in each split, from the `<split>_y` labels."""
    return {split: torch.bincount(prepared[f"{split}_y"], minlength=n_classes).tolist()
            for split in ("train", "val", "test")}


def require_every_class(counts: dict[str, list[int]], classes: list[str], carved: tuple[str, ...],
                        val_fraction: float, test_fraction: float) -> None:
    """Refuse splits carved from the training pool (`carved`) that lack a class: a model never trained on it,
    or chosen and scored on splits without it, would hide that silently. Names the first such class."""
    lacking = [i for i in range(len(classes)) if any(counts[split][i] == 0 for split in carved)]
    if not lacking:
        return
    i, name = lacking[0], classes[lacking[0]]
    empty = [split for split in carved if counts[split][i] == 0]
    total = sum(counts[split][i] for split in carved)
    if total < len(carved):
        fix = f"add images of {name!r}: it needs at least {len(carved)}, one per split"
    elif "train" in empty:
        fix = f"add images of {name!r} or lower the fractions"
    else:
        fix = f"add images of {name!r} or raise " + " and ".join(f"data.{split}_fraction" for split in empty)
    fractions = f"data.val_fraction {val_fraction}"
    if "test" in carved:
        fractions += f", data.test_fraction {test_fraction}"
    others = f" (and {len(lacking) - 1} more classes)" if len(lacking) > 1 else ""
    raise DataError(f"class {name!r} has {total} image(s), which leaves {' and '.join(empty)} without any "
                    f"({fractions}){others}; {fix}")


def channel_stats(x_uint8: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of x/255, exact, via a 256-bin histogram per channel.

    The histogram avoids a float copy of the whole dataset (60k x 784 floats for Fashion-MNIST).
    """
    values = torch.arange(256, dtype=torch.float64)
    hists = torch.zeros(x_uint8.shape[1], 256, dtype=torch.float64)
    for chunk in _chunks(x_uint8):  # an on-disk split a chunk at a time; counts add up exactly
        for c, channel in enumerate(chunk.transpose(0, 1)):  # (C, N, H, W): one channel at a time
            hists[c] += torch.bincount(channel.reshape(-1), minlength=256).cpu().to(torch.float64)
    means, stds = [], []
    for hist in hists:
        n = hist.sum()
        mean = (hist * values).sum() / n
        var = (hist * (values - mean) ** 2).sum() / n
        means.append(float(mean / 255))
        stds.append(float(var.sqrt() / 255))
    return means, stds


def dataset_digest(prepared: dict) -> str:
    """sha256 hex over the six split tensors (name, dtype, shape, bytes) and the class names, in a fixed order."""
    h = hashlib.sha256()
    for key in SPLIT_TENSORS:
        t = prepared[key]
        # Hash the shape and dtype too, so that the same bytes in another layout get another digest.
        h.update(f"{key}:{t.dtype}:{list(t.shape)};".encode())
        for chunk in _chunks(t):
            h.update(memoryview(chunk.detach().cpu().contiguous().numpy()).cast("B"))
    h.update(json.dumps(list(prepared["classes"])).encode())
    return h.hexdigest()


def _chunks(x) -> Iterable[torch.Tensor]:
    """An in-memory tensor as one chunk; an on-disk array (kdpipe.data.ondisk.OnDiskArray) a chunk at a time."""
    return x.chunks() if hasattr(x, "chunks") else (x,)
