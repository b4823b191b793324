"""Writers of tiny fake datasets in the on-disk formats kdpipe.data.splits reads (helpers for tests, no tests here)."""

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np


def _labels_with_every_class(rng: np.random.Generator, n: int, n_classes: int) -> np.ndarray:
    """n labels in shuffled order, every class present (needs n >= n_classes)."""
    assert n >= n_classes, f"need at least {n_classes} samples to cover every class, got {n}"
    labels = np.concatenate([np.arange(n_classes), rng.integers(0, n_classes, n - n_classes)])
    return rng.permutation(labels)


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: magic 0x0000_08_<ndim>, big-endian uint32 dims, then the data."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_fashion_idx(folder: str | Path, n_train: int, n_test: int, gz: bool = True, seed: int = 0) -> Path:
    """Write the four Fashion-MNIST IDX files (random 28x28 images, labels 0-9 all present) into folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = _labels_with_every_class(rng, n, 10).astype(np.uint8)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            path = folder / f"{prefix}-{kind}-ubyte"
            data = idx_bytes(array)
            if gz:
                path.with_name(path.name + ".gz").write_bytes(gzip.compress(data))
            else:
                path.write_bytes(data)
    return folder


def _write_pickle(path: Path, obj: dict) -> None:
    with path.open("wb") as f:
        pickle.dump(obj, f)


def _cifar_arrays(rng: np.random.Generator, n: int, n_classes: int) -> tuple[np.ndarray, list[int]]:
    """Random CIFAR rows (N, 3072) uint8 and labels with every class present."""
    data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
    return data, _labels_with_every_class(rng, n, n_classes).tolist()


def write_cifar10(root: str | Path, n_per_batch: int, seed: int = 0) -> Path:
    """Write root/cifar-10-batches-py as torchvision does: data_batch_1..5, test_batch, batches.meta."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data, labels = _cifar_arrays(rng, n_per_batch, 10)
        _write_pickle(folder / name, {"batch_label": name, "data": data, "labels": labels})
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _write_pickle(folder / "batches.meta", {"label_names": names, "num_vis": 3072})
    return folder


def write_cifar100(root: str | Path, n: int, seed: int = 0) -> Path:
    """Write root/cifar-100-python as torchvision does: train and test (n images each) and meta."""
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in ("train", "test"):
        data, fine = _cifar_arrays(rng, n, 100)
        coarse = [label // 5 for label in fine]
        _write_pickle(folder / name, {"data": data, "fine_labels": fine, "coarse_labels": coarse})
    fine_names = [f"fine_{i:02d}" for i in range(100)]
    _write_pickle(folder / "meta", {"fine_label_names": fine_names, "coarse_label_names": [f"c{i}" for i in range(20)]})
    return folder


def write_imagefolder(
    root: str | Path,
    classes: tuple[str, ...] = ("cat", "dog", "fish"),
    per_class: int = 6,
    size: tuple[int, int] = (12, 10),
    mode: str = "RGB",
    seed: int = 0,
) -> Path:
    """Write root/<class>/<i>.png random images of the given (width, height) and PIL mode."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(pixels).convert(mode).save(root / name / f"{i}.png")
    return root


PHOTO_COLOURS = ((200, 60, 50), (60, 170, 70), (50, 80, 200))  # a class's tint: red, green, blue


def photo(rng: np.random.Generator, label: int, size: tuple[int, int]) -> np.ndarray:
    """A learnable fake photo (H, W, 3) uint8 of `size` = (width, height): class `label`'s tint in stripes
    (horizontal for even labels, vertical for odd: both survive crops and flips), plus noise."""
    w, h = size
    period = max(2, min(w, h) // 6)
    coords = np.arange(h)[:, None] if label % 2 == 0 else np.arange(w)[None, :]
    stripes = ((coords // period) % 2).astype(np.float64)  # (H, 1) or (1, W)
    base = np.array(PHOTO_COLOURS[label % len(PHOTO_COLOURS)], dtype=np.float64)
    pixels = base * (0.55 + 0.45 * stripes[..., None]) + rng.normal(0, 18, (h, w, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def write_photo_folder(root: str | Path, classes: tuple[str, ...] = ("apple", "leaf", "sky"), per_class: int = 20,
                       seed: int = 0, sizes: tuple[int, int] = (40, 90)) -> Path:
    """Write root/<class>/<i>.jpg RGB JPEGs of varied width and height (each in `sizes`, so aspect ratios from
    about 1:2 to 2:1), learnable from their tint and stripes (`photo`)."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            size = tuple(int(v) for v in rng.integers(sizes[0], sizes[1] + 1, 2))
            Image.fromarray(photo(rng, label, size)).save(root / name / f"{i}.jpg", quality=90)
    return root
