"""The datasets kdpipe reads, loaded from disk as uint8 tensors (RawDataset): sklearn's digits, Fashion-MNIST
(the Debian package's IDX files, or a torchvision download), CIFAR-10/100 (torchvision's pickles) and
`imagefolder` (a user's class/image folders, kdpipe.data.imagefolder). `LOADERS` is the one list of dataset names.

Only torch and numpy are imported at module level; sklearn, torchvision and PIL are imported inside the
loaders that need them (each costs about a second).
"""

import gzip
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from kdpipe.data.splits import DataError, RawDataset

# Where the Debian package `dataset-fashion-mnist` installs the four original gzipped IDX files.
# A module constant so tests (and unusual machines) can point elsewhere.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
# Base names of the original files; each may also carry a ".gz" suffix.
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions (N, H, W)
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension (N,)


# --------------------------------------------------------------------------------------------- loading


def load_raw(
    dataset: str, root: str | Path, *, image_size: int | None = None, download: bool = False
) -> RawDataset:
    """Load `dataset` from under `root` as uint8 tensors.

    image_size is used only by "imagefolder" (required there); the other datasets have a fixed size and
    ignore it. download lets torchvision fetch Fashion-MNIST or CIFAR when no local copy is found.
    """
    if dataset not in LOADERS:
        raise DataError(f"{dataset}: unknown dataset, expected one of {', '.join(DATASETS)}")
    return LOADERS[dataset](Path(root), image_size=image_size, download=download)


def _load_digits() -> RawDataset:
    """sklearn's 8x8 digits (offline, 1797 images); values 0-16 are rescaled to 0-255."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.rint(bunch.images * 255.0 / 16.0).astype(np.uint8)  # (N, 8, 8)
    x = torch.from_numpy(pixels).unsqueeze(1)  # (N, 1, 8, 8)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    return RawDataset(x, y, None, None, [str(c) for c in range(10)])


# Fashion-MNIST ------------------------------------------------------------------------------------


def _load_fashion_mnist(root: Path, download: bool) -> RawDataset:
    """Read the four IDX files from the system dir, else from under root, else download them."""
    candidates = [FASHION_MNIST_SYSTEM_DIR, root / "fashion_mnist", root / "FashionMNIST" / "raw"]
    files = next((f for f in map(_fashion_files, candidates) if f is not None), None)
    if files is None and download:
        files = _fashion_files(_download_fashion_mnist(root))
    if files is None:
        where = " or ".join(str(c) for c in candidates)
        raise DataError(f"fashion_mnist: no IDX files in {where}, and download is off (set data.download: true)")
    train_x, train_y = _read_idx_pair(files["train_images"], files["train_labels"])
    test_x, test_y = _read_idx_pair(files["test_images"], files["test_labels"])
    return RawDataset(train_x, train_y, test_x, test_y, list(FASHION_MNIST_CLASSES))


def _fashion_files(folder: Path) -> dict[str, Path] | None:
    """Paths of the four IDX files in folder (plain preferred over .gz); None if it holds none of them.

    A folder holding only some of the four is an error rather than a reason to look elsewhere: it is
    almost always a broken copy the user would want to hear about.
    """
    found = {}
    for key, base in FASHION_MNIST_FILES.items():
        paths = [folder / base, folder / f"{base}.gz"]
        found[key] = next((p for p in paths if p.is_file()), None)
    if not any(found.values()):
        return None
    missing = [FASHION_MNIST_FILES[k] for k, p in found.items() if p is None]
    if missing:
        raise DataError(f"fashion_mnist: {folder} lacks {missing[0]}[.gz] (has only some of the IDX files)")
    return found


def _download_fashion_mnist(root: Path) -> Path:
    """Download with torchvision into root/FashionMNIST/raw and return that folder."""
    from torchvision.datasets import FashionMNIST

    try:
        FashionMNIST(str(root), train=True, download=True)
    except Exception as exc:  # network and checksum errors come in many types
        raise DataError(f"fashion_mnist: download into {root} failed: {exc}") from exc
    return root / "FashionMNIST" / "raw"


def _read_idx_pair(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read an IDX images file and its labels file into uint8 (N, 1, H, W) and int64 (N,)."""
    images = _read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = _read_idx(labels_path, IDX_LABELS_MAGIC)
    if len(images) != len(labels):
        raise DataError(f"fashion_mnist: {images_path} has {len(images)} images but "
                        f"{labels_path} has {len(labels)} labels")
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"fashion_mnist: {labels_path} has label {labels.max()}, expected 0-9")
    x = torch.from_numpy(images.copy()).unsqueeze(1)  # (N, H, W) -> (N, 1, H, W); copy: buffer is read-only
    return x, torch.from_numpy(labels.astype(np.int64))


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse one IDX file (gzipped or not) of unsigned bytes; check its magic number and length."""
    data = _read_maybe_gzip(path)
    ndim = magic & 0xFF  # the last magic byte is the number of dimensions
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"fashion_mnist: {path} is truncated ({len(data)} bytes, no full IDX header)")
    (found,) = struct.unpack(">I", data[:4])
    if found != magic:
        raise DataError(f"fashion_mnist: {path} has IDX magic 0x{found:08x}, expected 0x{magic:08x}")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    body = np.frombuffer(data, dtype=np.uint8, offset=header)
    if body.size != int(np.prod(dims)):
        raise DataError(f"fashion_mnist: {path} has {body.size} data bytes but its header says {dims}")
    return body.reshape(dims)


def _read_maybe_gzip(path: Path) -> bytes:
    """File contents, gunzipped when they start with the gzip magic (whatever the file is named)."""
    data = path.read_bytes()
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"fashion_mnist: {path} is not a valid gzip file: {exc}") from exc


# CIFAR --------------------------------------------------------------------------------------------


def _load_cifar10(root: Path, download: bool) -> RawDataset:
    """CIFAR-10 from torchvision's python pickles in root/cifar-10-batches-py."""
    folder = _cifar_folder("cifar10", root / "cifar-10-batches-py", root, download)
    batches = [_cifar_batch("cifar10", folder / f"data_batch_{i}", "labels") for i in range(1, 6)]
    train_x = torch.cat([x for x, _ in batches])
    train_y = torch.cat([y for _, y in batches])
    test_x, test_y = _cifar_batch("cifar10", folder / "test_batch", "labels")
    classes = _cifar_classes("cifar10", folder / "batches.meta", "label_names")
    return RawDataset(train_x, train_y, test_x, test_y, classes)


def _load_cifar100(root: Path, download: bool) -> RawDataset:
    """CIFAR-100 (fine labels) from torchvision's python pickles in root/cifar-100-python."""
    folder = _cifar_folder("cifar100", root / "cifar-100-python", root, download)
    train_x, train_y = _cifar_batch("cifar100", folder / "train", "fine_labels")
    test_x, test_y = _cifar_batch("cifar100", folder / "test", "fine_labels")
    classes = _cifar_classes("cifar100", folder / "meta", "fine_label_names")
    return RawDataset(train_x, train_y, test_x, test_y, classes)


def _cifar_folder(name: str, folder: Path, root: Path, download: bool) -> Path:
    """Return folder, downloading it with torchvision first if it is missing and download is on."""
    if folder.is_dir():
        return folder
    if not download:
        raise DataError(f"{name}: no folder {folder}, and download is off (set data.download: true)")
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        cls(str(root), train=True, download=True)
    except Exception as exc:  # network and checksum errors come in many types
        raise DataError(f"{name}: download into {root} failed: {exc}") from exc
    return folder


def _unpickle(name: str, path: Path) -> dict:
    """Load one CIFAR pickle; latin1 decodes the Python 2 strings the files were written with."""
    if not path.is_file():
        raise DataError(f"{name}: missing file {path}")
    try:
        with path.open("rb") as f:
            obj = pickle.load(f, encoding="latin1")
    except Exception as exc:  # a corrupt pickle can fail in many ways
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        raise DataError(f"{name}: cannot unpickle {path} ({reason}); the copy is damaged: delete "
                        f"{path.parent} and fetch it again (data.download: true)") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{name}: {path} holds a {type(obj).__name__}, expected a dict")
    return obj


def _cifar_batch(name: str, path: Path, label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One pickle's images as uint8 (N, 3, 32, 32) and labels as int64 (N,)."""
    batch = _unpickle(name, path)
    if "data" not in batch or label_key not in batch:
        raise DataError(f"{name}: {path} lacks the 'data' or '{label_key}' entry")
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DataError(f"{name}: {path} has data {data.shape} and {len(labels)} labels, "
                        f"expected (N, 3072) and N labels")
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32))  # rows are channel-major: (N, 3072) -> (N, C, H, W)
    return x, torch.from_numpy(labels)


def _cifar_classes(name: str, path: Path, key: str) -> list[str]:
    """Class names from a CIFAR meta pickle."""
    meta = _unpickle(name, path)
    if key not in meta:
        raise DataError(f"{name}: {path} lacks the '{key}' entry")
    return [str(c) for c in meta[key]]


def _load_imagefolder(root: Path, image_size: int | None) -> RawDataset:
    from kdpipe.data import imagefolder

    return imagefolder.load(root, image_size)


# Dataset name (params' data.dataset) → loader(root, image_size=, download=): the one list of datasets.
LOADERS = {
    "digits": lambda root, image_size, download: _load_digits(),
    "fashion_mnist": lambda root, image_size, download: _load_fashion_mnist(root, download),
    "cifar10": lambda root, image_size, download: _load_cifar10(root, download),
    "cifar100": lambda root, image_size, download: _load_cifar100(root, download),
    "imagefolder": lambda root, image_size, download: _load_imagefolder(root, image_size),  # kdpipe.data.imagefolder
}
DATASETS = tuple(LOADERS)
