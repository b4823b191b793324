"""Raw datasets as uint8 tensors, stratified splits, digests, and on-device batching/augmentation.

Everything here keeps whole datasets in memory as tensors: Fashion-MNIST is 55 MB as uint8, so the
training stages move it to the device once and batch with index tensors instead of a DataLoader.

Only torch and numpy are imported at module level; sklearn, torchvision and PIL are imported inside the
functions that need them, because every stage imports this module and most of them never touch those.
"""

import gzip
import hashlib
import json
import pickle
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DATASETS = ("digits", "fashion_mnist", "cifar10", "cifar100", "imagefolder")

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

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
# PIL modes that carry a single channel; a folder made only of these loads as C=1.
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")

SPLIT_TENSORS = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")


class DataError(Exception):
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


# --------------------------------------------------------------------------------------------- loading


def load_raw(
    dataset: str, root: str | Path, *, image_size: int | None = None, download: bool = False
) -> RawDataset:
    """Load `dataset` from under `root` as uint8 tensors.

    image_size is used only by "imagefolder" (required there); the other datasets have a fixed size and
    ignore it. download lets torchvision fetch Fashion-MNIST or CIFAR when no local copy is found.
    """
    root = Path(root)
    if dataset == "digits":
        return _load_digits()
    if dataset == "fashion_mnist":
        return _load_fashion_mnist(root, download)
    if dataset == "cifar10":
        return _load_cifar10(root, download)
    if dataset == "cifar100":
        return _load_cifar100(root, download)
    if dataset == "imagefolder":
        return _load_imagefolder(root, image_size)
    raise DataError(f"{dataset}: unknown dataset, expected one of {', '.join(DATASETS)}")


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
        raise DataError(f"{name}: cannot unpickle {path}: {exc}") from exc
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


# Image folder -------------------------------------------------------------------------------------


def _load_imagefolder(root: Path, image_size: int | None) -> RawDataset:
    """root/<class>/<images>: classes sorted by name, every image resized to image_size x image_size."""
    if image_size is None:
        raise DataError(f"imagefolder: image_size is required to resize the images in {root}")
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
    # A folder of grayscale scans should stay C=1 rather than triple its size as RGB.
    mode = "L" if all(_image_mode(f) in GRAY_MODES for f in files) else "RGB"
    pixels = np.stack([_read_image(f, mode, image_size) for f in files])
    x = torch.from_numpy(pixels)
    x = x.unsqueeze(1) if mode == "L" else x.permute(0, 3, 1, 2).contiguous()  # -> (N, C, H, W)
    y = torch.tensor(labels, dtype=torch.int64)
    return RawDataset(x, y, None, None, [d.name for d in class_dirs])


def _image_files(folder: Path) -> list[Path]:
    """Image files under folder (any depth), by extension, case-insensitive, sorted for a stable order."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _image_mode(path: Path) -> str:
    """PIL mode of an image, read from its header only."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.mode
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"imagefolder: cannot read image {path}: {exc}") from exc


def _read_image(path: Path, mode: str, size: int) -> np.ndarray:
    """Decode, convert to mode and resize one image; uint8 (size, size) or (size, size, 3)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert(mode).resize((size, size), Image.Resampling.BILINEAR)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"imagefolder: cannot read image {path}: {exc}") from exc
    return np.asarray(img, dtype=np.uint8)


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


def subset(raw: RawDataset, n: int, seed: int) -> RawDataset:
    """A stratified, seeded sample of n images of the training pool (the official test split is kept
    whole): a smaller, faster, limited-data version of a dataset."""
    if not 0 < n < len(raw.train_y):
        raise DataError(f"data.train_subset: must be between 1 and {len(raw.train_y) - 1} "
                        f"(the training pool's size), got {n}")
    keep = stratified_split(raw.train_y, n / len(raw.train_y), 0.0, seed).val_idx
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
    prepared["classes"] = list(raw.classes)
    prepared["mean"], prepared["std"] = channel_stats(prepared["train_x"])
    prepared["class_counts"] = {
        split: torch.bincount(prepared[f"{split}_y"], minlength=len(raw.classes)).tolist()
        for split in ("train", "val", "test")
    }
    prepared["image_shape"] = list(raw.train_x.shape[1:])
    prepared["digest"] = dataset_digest(prepared)
    return prepared


def channel_stats(x_uint8: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of x/255, exact, via a 256-bin histogram per channel.

    The histogram avoids a float copy of the whole dataset (60k x 784 floats for Fashion-MNIST).
    """
    values = torch.arange(256, dtype=torch.float64)
    means, stds = [], []
    for channel in x_uint8.transpose(0, 1):  # (C, N, H, W): one channel at a time
        hist = torch.bincount(channel.reshape(-1), minlength=256).cpu().to(torch.float64)
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
        t = prepared[key].detach().cpu().contiguous()
        # Hash the shape and dtype too, so that the same bytes in another layout get another digest.
        h.update(f"{key}:{t.dtype}:{list(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    h.update(json.dumps(list(prepared["classes"])).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------- batching


def to_float(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1], on the same device."""
    if x_uint8.dtype != torch.uint8:
        raise TypeError(f"to_float expects uint8, got {x_uint8.dtype}")
    return x_uint8.to(torch.float32).div_(255.0)


def augment_batch(
    x: torch.Tensor, crop_padding: int, flip: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip (p=0.5), per image, without a Python loop.

    Each image is padded by crop_padding on every side and an H x W window is taken at a random offset;
    a flipped image reads its window's columns in reverse. Random draws, in this order, on the
    generator's device (x's device without one): flips as `torch.rand(N) < 0.5` (if flip), then row and
    column offsets as `torch.randint(0, 2 * crop_padding + 1, (2, N))` (if crop_padding > 0).
    crop_padding 0 and flip False return x itself.
    """
    if crop_padding == 0 and not flip:
        return x
    n, _, h, w = x.shape
    draw_device = generator.device if generator is not None else x.device
    rows = torch.arange(h, device=x.device).expand(n, h)  # (N, H)
    cols = torch.arange(w, device=x.device).expand(n, w)  # (N, W)
    if flip:
        flipped = (torch.rand(n, generator=generator, device=draw_device) < 0.5).to(x.device)
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    if crop_padding > 0:
        offsets = torch.randint(0, 2 * crop_padding + 1, (2, n), generator=generator, device=draw_device)
        dy, dx = offsets.to(x.device)  # (N,) row and column offsets into the padded image
        x = F.pad(x, (crop_padding,) * 4)  # (N, C, H + 2p, W + 2p), zeros outside the image
        rows, cols = rows + dy[:, None], cols + dx[:, None]
    batch = torch.arange(n, device=x.device)[:, None, None]
    # Advanced indices on dims 0, 2, 3 broadcast to (N, H, W) and go first: the result is (N, H, W, C).
    out = x.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()  # (N, H, W, C) -> (N, C, H, W)


def iterate_batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (idx, x[idx], y[idx]) batches over in-memory tensors; idx are int64 positions on x's device.

    With shuffle, the order is torch.randperm on the generator's device (x's device without one).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(y) != len(x):
        raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
    n = len(x)
    if shuffle:
        draw_device = generator.device if generator is not None else x.device
        order = torch.randperm(n, generator=generator, device=draw_device).to(x.device)
    else:
        order = torch.arange(n, device=x.device)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield idx, x[idx], y[idx]
