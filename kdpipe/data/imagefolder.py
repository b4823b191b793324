"""`imagefolder`: a user's root/<class>/<image> files, decoded and resized once, in parallel worker processes.
Each image becomes an image_size square by `resize` (kdpipe.data.images: its centre square by default, or stretched).

`prepare` streams the decoded images of each split straight into its on-disk array (kdpipe.data.ondisk), a chunk at
a time, so a folder of any size is never held in memory whole; `load` decodes a (small) folder into memory as a
RawDataset, for the dataset registry. Classes are the sorted sub-folder names; a folder whose images are all
single-channel loads as C=1 rather than tripling its size as RGB.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdpipe.data.images import IMAGE_EXTENSIONS
from kdpipe.data.splits import DataError, RawDataset

GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")  # PIL modes that carry a single channel
CHUNK = 256  # images a decoder handles per task: large enough to amortise the hand-over, small for the progress
PARALLEL_FROM = 2 * CHUNK  # fewer images are decoded in this process: a pool costs more than it saves


@dataclass(frozen=True)
class FolderIndex:
    """The files of an image folder in a stable order, their labels, the class names and the colour mode."""

    files: list[Path]
    labels: torch.Tensor  # int64 (N,)
    classes: list[str]
    mode: str  # "L" or "RGB"


def index_folder(root: Path, workers: int = 1) -> FolderIndex:
    """List root/<class>/<images> (classes sorted by name, files sorted within) and read every header once."""
    if not root.is_dir():
        raise DataError(f"imagefolder: no folder {root}")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(class_dirs) < 2:
        raise DataError(f"imagefolder: {root} has {len(class_dirs)} class folder(s), need at least 2")
    files, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        images = _image_files(class_dir)
        if not images:
            raise DataError(f"imagefolder: class folder {class_dir} has no images ({' '.join(IMAGE_EXTENSIONS)})")
        files += images
        labels += [label] * len(images)
    gray = all(mode in GRAY_MODES for modes in _parallel(_modes, _chunked(files), workers) for mode in modes)
    return FolderIndex(files, torch.tensor(labels, dtype=torch.int64), [d.name for d in class_dirs],
                       "L" if gray else "RGB")


def load(root: Path, image_size: int | None, workers: int = 1, resize: str = "center_crop") -> RawDataset:
    """The whole folder decoded into memory (small folders; prepare streams large ones to disk instead)."""
    size = _require_size(root, image_size)
    index = index_folder(root, workers)
    x = torch.cat(list(decode(index.files, index.mode, size, workers, resize)))
    return RawDataset(x, index.labels, None, None, index.classes)


def prepare_to_disk(root: Path, image_size: int | None, path: Path, *, val_fraction: float, test_fraction: float,
                    seed: int, train_subset: int | None, workers: int, resize: str = "center_crop") -> dict:
    """prepare for an image folder: the seeded stratified splits chosen from the labels alone, then each split's
    images decoded straight into its on-disk array beside `path` (Paths.dataset), never all in memory. The
    same splits, images and digest as data.prepare_dataset on the folder loaded whole."""
    from kdpipe.data.splits import class_counts, require_every_class, stratified_split, subset_rows, summarise

    size = _require_size(root, image_size)
    if test_fraction <= 0:
        raise DataError("imagefolder: the dataset has no official test split, so data.test_fraction must be > 0")
    index = index_folder(root, workers)
    pool = subset_rows(index.labels, train_subset, seed) if train_subset else torch.arange(len(index.labels))
    splits = stratified_split(index.labels[pool], val_fraction, test_fraction, seed)
    chosen = {"train": pool[splits.train_idx], "val": pool[splits.val_idx], "test": pool[splits.test_idx]}
    prepared: dict = {f"{name}_y": index.labels[rows] for name, rows in chosen.items()}
    carved = ("train", "val", "test")
    # Before hours of decoding: every class must reach every split.
    require_every_class(class_counts(prepared, len(index.classes)), index.classes, carved, val_fraction,
                        test_fraction)
    try:
        for name, rows in chosen.items():
            array_path = path.with_name(f"{name}_x.npy")
            prepared[f"{name}_x"] = write_split(index, rows, size, array_path, workers, f"prepare {name}", resize)
        return summarise(prepared, index.classes, carved, val_fraction, test_fraction)
    except BaseException:
        for name in chosen:
            array = prepared.get(f"{name}_x")
            if array is not None:
                array.path.unlink(missing_ok=True)
        raise


def write_split(index: FolderIndex, rows: torch.Tensor, size: int, path: Path, workers: int, desc: str,
                resize: str = "center_crop"):
    """Decode the images at `rows` of the index, in that order, into the on-disk array at `path` (under its
    temporary name: see ondisk.NpyWriter), with progress on stderr. Returns the ondisk.OnDiskArray."""
    from kdpipe.data.ondisk import NpyWriter

    files = [index.files[i] for i in rows.tolist()]
    channels = 1 if index.mode == "L" else 3
    writer = NpyWriter(path, (len(files), channels, size, size))
    progress = _Progress(len(files), desc)
    try:
        for chunk in decode(files, index.mode, size, workers, resize):
            writer.write(chunk)
            progress.update(len(chunk))
    except BaseException:
        writer.discard()
        raise
    return writer.close()


def decode(files: list[Path], mode: str, size: int, workers: int, resize: str = "center_crop"
           ) -> Iterator[torch.Tensor]:
    """uint8 (n, C, size, size) chunks of the decoded, resized images, in the order of `files`."""
    for pixels in _parallel(_decode_chunk, [(chunk, mode, size, resize) for chunk in _chunked(files)], workers):
        x = torch.from_numpy(pixels)
        yield x.unsqueeze(1) if mode == "L" else x.permute(0, 3, 1, 2).contiguous()  # -> (n, C, H, W)


def _require_size(root: Path, image_size: int | None) -> int:
    if image_size is None:
        raise DataError(f"imagefolder: image_size is required to resize the images in {root}")
    return image_size


def _chunked(items: list) -> list[list]:
    return [items[i : i + CHUNK] for i in range(0, len(items), CHUNK)]


def _parallel(fn, tasks: list, workers: int) -> Iterator:
    """fn over tasks, results in order: in `workers` processes when there is enough work to pay for them."""
    if workers <= 1 or len(tasks) * CHUNK < PARALLEL_FROM:
        yield from map(fn, tasks)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(fn, tasks)


def _image_files(folder: Path) -> list[Path]:
    """Image files under folder (any depth), by extension, case-insensitive, sorted for a stable order."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _modes(files: list[Path]) -> list[str]:
    """PIL modes of the images, read from their headers only."""
    from PIL import Image

    modes = []
    for path in files:
        try:
            with Image.open(path) as img:
                modes.append(img.mode)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"imagefolder: cannot read image {path}: {exc}") from None
    return modes


def _decode_chunk(task: tuple[list[Path], str, int, str]) -> np.ndarray:
    """Decode, convert and resize a chunk of images (kdpipe.data.images, as predict reads them): uint8 (n, size, size)
    or (n, size, size, 3)."""
    from PIL import Image

    from kdpipe.data.images import load_image

    files, mode, size, resize = task
    out = []
    for path in files:
        try:
            out.append(load_image(path, mode, (size, size), resize))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"imagefolder: cannot read image {path}: {exc}") from None
    return np.stack(out)


class _Progress:
    """A tqdm bar on a terminal; in logs a plain line at every tenth of the images."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.done, self.next_line, self.t0 = total, desc, 0, total / 10, time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="img")

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            if self.done >= self.total:
                self.bar.close()
        elif self.done >= self.next_line or self.done >= self.total:
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
            print(f"{self.desc}: {self.done}/{self.total} images ({rate:.0f}/s)", file=sys.stderr, flush=True)
            self.next_line += self.total / 10
