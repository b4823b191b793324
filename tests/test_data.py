"""Tests for kdpipe.data.datasets and kdpipe.data.splits: loaders on real and generated files, splits, the prepared artifact, batching."""

import gzip
import subprocess
import sys

import pytest
import torch
from datagen import write_cifar10, write_cifar100, write_fashion_idx, write_imagefolder

from kdpipe.data import batches, datasets, splits
from kdpipe.data.splits import DataError

# Where the Debian package dataset-fashion-mnist puts the real files (CI's .ci/run installs it). Every other
# Fashion-MNIST test writes its own IDX files, so the suite runs offline on a fresh clone without it.
REAL_FASHION = datasets.FASHION_MNIST_SYSTEM_DIR


@pytest.fixture
def no_system_fashion(monkeypatch, tmp_path):
    """Point the Fashion-MNIST system folder at a path that does not exist."""
    monkeypatch.setattr(datasets, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "no-such-system-dir")


def toy_raw(n_per_class=(30, 20, 10), with_test=False, seed=0) -> splits.RawDataset:
    """A small RawDataset of random 3x4x4 images with the given class sizes."""
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(n_per_class)])
    y = y[torch.randperm(len(y), generator=g)]
    x = torch.randint(0, 256, (len(y), 3, 4, 4), generator=g, dtype=torch.uint8)
    test_x = torch.randint(0, 256, (6, 3, 4, 4), generator=g, dtype=torch.uint8) if with_test else None
    test_y = torch.arange(6) % len(n_per_class) if with_test else None
    return splits.RawDataset(x, y, test_x, test_y, [f"c{i}" for i in range(len(n_per_class))])


# ------------------------------------------------------------------------------------ loaders


def test_import_is_cheap():
    code = "import sys, kdpipe.data.splits, kdpipe.data.datasets; print(sorted(m for m in ('sklearn', 'torchvision', 'PIL') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_unknown_dataset():
    with pytest.raises(DataError, match="mnist3d"):
        datasets.load_raw("mnist3d", "x")


def test_digits():
    raw = datasets.load_raw("digits", "unused")
    assert raw.train_x.shape == (1797, 1, 8, 8) and raw.train_x.dtype == torch.uint8
    assert raw.train_y.dtype == torch.int64 and raw.train_y.shape == (1797,)
    assert int(raw.train_x.max()) == 255 and int(raw.train_x.min()) == 0
    assert raw.classes == [str(i) for i in range(10)] and raw.test_x is None and raw.test_y is None


@pytest.mark.skipif(not REAL_FASHION.is_dir(), reason=f"{REAL_FASHION} absent: the real files come with "
                    "`apt-get install dataset-fashion-mnist` (CI installs it); generated files cover the loader")
def test_fashion_mnist_real_files(tmp_path):
    raw = datasets.load_raw("fashion_mnist", tmp_path)
    assert raw.train_x.shape == (60000, 1, 28, 28) and raw.test_x.shape == (10000, 1, 28, 28)
    assert raw.train_x.dtype == torch.uint8 and raw.train_y.dtype == torch.int64
    assert raw.classes[:2] == ["T-shirt/top", "Trouser"] and raw.classes[-1] == "Ankle boot"
    assert len(raw.classes) == 10
    # The official splits are balanced: 6000 and 1000 per class.
    assert torch.bincount(raw.train_y).tolist() == [6000] * 10
    assert torch.bincount(raw.test_y).tolist() == [1000] * 10


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_system_dir(tmp_path, monkeypatch, gz):
    """The system folder (where the Debian package installs the files) is read first, gzipped or plain."""
    system = write_fashion_idx(tmp_path / "system", n_train=25, n_test=11, gz=gz, seed=1)
    write_fashion_idx(tmp_path / "root" / "fashion_mnist", n_train=13, n_test=10, gz=gz, seed=2)  # not read
    monkeypatch.setattr(datasets, "FASHION_MNIST_SYSTEM_DIR", system)
    raw = datasets.load_raw("fashion_mnist", tmp_path / "root")
    assert raw.train_x.shape == (25, 1, 28, 28) and raw.test_x.shape == (11, 1, 28, 28)
    assert raw.train_x.dtype == torch.uint8 and raw.train_y.dtype == torch.int64 and raw.test_y.dtype == torch.int64
    assert raw.classes[:2] == ["T-shirt/top", "Trouser"] and raw.classes[-1] == "Ankle boot"
    assert len(raw.classes) == 10 and sorted(set(raw.train_y.tolist())) == list(range(10))
    content = (system / ("t10k-images-idx3-ubyte" + (".gz" if gz else ""))).read_bytes()
    images = gzip.decompress(content) if gz else content
    assert raw.test_x.flatten().tolist() == list(images[16:])  # 16-byte header: magic + 3 dims


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_root_fallback(tmp_path, no_system_fashion, gz):
    write_fashion_idx(tmp_path / "fashion_mnist", n_train=30, n_test=12, gz=gz)
    raw = datasets.load_raw("fashion_mnist", tmp_path)
    assert raw.train_x.shape == (30, 1, 28, 28) and raw.test_x.shape == (12, 1, 28, 28)
    assert sorted(set(raw.train_y.tolist())) == list(range(10))


def test_fashion_mnist_torchvision_layout(tmp_path, no_system_fashion):
    write_fashion_idx(tmp_path / "FashionMNIST" / "raw", n_train=20, n_test=10, gz=False)
    assert datasets.load_raw("fashion_mnist", tmp_path).train_x.shape == (20, 1, 28, 28)


def test_fashion_mnist_matches_file_contents(tmp_path, no_system_fashion):
    folder = write_fashion_idx(tmp_path / "fashion_mnist", n_train=15, n_test=10, gz=True)
    images = gzip.decompress((folder / "train-images-idx3-ubyte.gz").read_bytes())
    labels = gzip.decompress((folder / "train-labels-idx1-ubyte.gz").read_bytes())
    raw = datasets.load_raw("fashion_mnist", tmp_path)
    assert raw.train_x.flatten().tolist() == list(images[16:])  # 16-byte header: magic + 3 dims
    assert raw.train_y.tolist() == list(labels[8:])  # 8-byte header: magic + 1 dim


def test_fashion_mnist_bad_magic(tmp_path, no_system_fashion):
    folder = write_fashion_idx(tmp_path / "fashion_mnist", n_train=12, n_test=10, gz=True)
    bad = folder / "t10k-images-idx3-ubyte.gz"
    content = bytearray(gzip.decompress(bad.read_bytes()))
    content[3] = 0x01  # 0x00000803 -> 0x00000801
    bad.write_bytes(gzip.compress(bytes(content)))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz.*magic"):
        datasets.load_raw("fashion_mnist", tmp_path)


def test_fashion_mnist_count_mismatch(tmp_path, no_system_fashion):
    folder = write_fashion_idx(tmp_path / "fashion_mnist", n_train=12, n_test=10, gz=False)
    write_fashion_idx(tmp_path / "other", n_train=11, n_test=10, gz=False)
    (tmp_path / "other" / "train-labels-idx1-ubyte").replace(folder / "train-labels-idx1-ubyte")
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*12 images.*11 labels"):
        datasets.load_raw("fashion_mnist", tmp_path)


def test_fashion_mnist_truncated(tmp_path, no_system_fashion):
    folder = write_fashion_idx(tmp_path / "fashion_mnist", n_train=12, n_test=10, gz=False)
    path = folder / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        datasets.load_raw("fashion_mnist", tmp_path)


def test_fashion_mnist_partial_folder(tmp_path, no_system_fashion):
    folder = write_fashion_idx(tmp_path / "fashion_mnist", n_train=12, n_test=10)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        datasets.load_raw("fashion_mnist", tmp_path)


def test_fashion_mnist_nothing_and_no_download(tmp_path, no_system_fashion):
    with pytest.raises(DataError, match="fashion_mnist: no IDX files.*download is off"):
        datasets.load_raw("fashion_mnist", tmp_path, download=False)


def test_cifar10(tmp_path):
    write_cifar10(tmp_path, n_per_batch=12)
    raw = datasets.load_raw("cifar10", tmp_path)
    assert raw.train_x.shape == (60, 3, 32, 32) and raw.test_x.shape == (12, 3, 32, 32)
    assert raw.train_x.dtype == torch.uint8 and raw.train_y.dtype == torch.int64
    assert raw.classes[0] == "airplane" and len(raw.classes) == 10
    assert sorted(set(raw.test_y.tolist())) == list(range(10))


def test_cifar_row_layout(tmp_path):
    """A CIFAR row is 1024 red, then 1024 green, then 1024 blue values, each row-major 32x32."""
    import pickle

    folder = write_cifar10(tmp_path, n_per_batch=10)
    batch = pickle.loads((folder / "data_batch_1").read_bytes())
    raw = datasets.load_raw("cifar10", tmp_path)
    row = batch["data"][0]
    assert raw.train_x[0, 1, 2, 5].item() == row[1024 + 2 * 32 + 5]
    assert raw.train_y[:10].tolist() == batch["labels"]


def test_cifar100(tmp_path):
    write_cifar100(tmp_path, n=120)
    raw = datasets.load_raw("cifar100", tmp_path)
    assert raw.train_x.shape == (120, 3, 32, 32) and raw.test_x.shape == (120, 3, 32, 32)
    assert len(raw.classes) == 100 and raw.classes[7] == "fine_07"
    assert int(raw.train_y.max()) == 99


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_missing_no_download(tmp_path, dataset):
    with pytest.raises(DataError, match=f"{dataset}: no folder .*download is off"):
        datasets.load_raw(dataset, tmp_path)


def test_cifar_missing_batch(tmp_path):
    folder = write_cifar10(tmp_path, n_per_batch=10)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        datasets.load_raw("cifar10", tmp_path)


def test_imagefolder_rgb(tmp_path):
    write_imagefolder(tmp_path / "imgs", classes=("fish", "cat", "dog"), per_class=4)
    raw = datasets.load_raw("imagefolder", tmp_path / "imgs", image_size=16)
    assert raw.train_x.shape == (12, 3, 16, 16) and raw.train_x.dtype == torch.uint8
    assert raw.classes == ["cat", "dog", "fish"]
    assert torch.bincount(raw.train_y).tolist() == [4, 4, 4] and raw.test_x is None


def test_imagefolder_grayscale_and_upper_case_extension(tmp_path):
    root = write_imagefolder(tmp_path / "imgs", classes=("a", "b"), per_class=3, mode="L")
    (root / "a" / "0.png").rename(root / "a" / "0.PNG")
    (root / "b" / "notes.txt").write_text("not an image")
    raw = datasets.load_raw("imagefolder", root, image_size=8)
    assert raw.train_x.shape == (6, 1, 8, 8)


def test_imagefolder_mixed_modes_load_as_rgb(tmp_path):
    write_imagefolder(tmp_path / "imgs", classes=("a",), per_class=2, mode="L")
    write_imagefolder(tmp_path / "imgs", classes=("b",), per_class=2, mode="RGB")
    assert datasets.load_raw("imagefolder", tmp_path / "imgs", image_size=5).train_x.shape == (4, 3, 5, 5)


def test_imagefolder_pixels_survive_same_size(tmp_path):
    import numpy as np
    from PIL import Image

    root = write_imagefolder(tmp_path / "imgs", classes=("a", "b"), per_class=1, size=(6, 6))
    expected = torch.from_numpy(np.array(Image.open(root / "b" / "0.png")))  # (H, W, C)
    raw = datasets.load_raw("imagefolder", root, image_size=6)
    assert torch.equal(raw.train_x[1].permute(1, 2, 0), expected)


def test_imagefolder_16_bit_grey_is_scaled_like_predict_reads_it(tmp_path):
    """A 16-bit copy (v·257) of an 8-bit grey image prepares to the 8-bit pixels (Pillow's own convert would
    clip every value above 255 to white), as `kdpipe predict` reads it (both use kdpipe.data.images)."""
    import numpy as np
    from PIL import Image

    grey = np.random.default_rng(0).integers(0, 256, size=(6, 6), dtype=np.uint8)
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "imgs" / cls / "0.png")
    assert Image.open(tmp_path / "imgs" / "a" / "0.png").mode.startswith("I")
    raw = datasets.load_raw("imagefolder", tmp_path / "imgs", image_size=6)
    assert raw.train_x.shape == (2, 1, 6, 6) and torch.equal(raw.train_x[0, 0], torch.from_numpy(grey))


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="image_size is required"):
        datasets.load_raw("imagefolder", tmp_path)
    with pytest.raises(DataError, match="no folder .*missing"):
        datasets.load_raw("imagefolder", tmp_path / "missing", image_size=8)
    one = write_imagefolder(tmp_path / "one", classes=("only",), per_class=2)
    with pytest.raises(DataError, match=f"{one}.*1 class folder"):
        datasets.load_raw("imagefolder", one, image_size=8)


def test_imagefolder_empty_class(tmp_path):
    root = write_imagefolder(tmp_path / "imgs", classes=("a", "b"), per_class=2)
    (root / "empty").mkdir()
    with pytest.raises(DataError, match="empty.*no images"):
        datasets.load_raw("imagefolder", root, image_size=8)


@pytest.mark.parametrize("content", [b"this is not a png", None])
def test_imagefolder_unreadable_image(tmp_path, content):
    root = write_imagefolder(tmp_path / "imgs", classes=("a", "b"), per_class=2)
    bad = root / "b" / "1.png"
    # None: a real PNG cut short, whose header reads fine but whose pixels do not decode.
    bad.write_bytes(content if content is not None else bad.read_bytes()[:60])
    with pytest.raises(DataError, match="b/1.png"):
        datasets.load_raw("imagefolder", root, image_size=8)


def test_raw_dataset_validates():
    x = torch.zeros(3, 1, 2, 2, dtype=torch.uint8)
    with pytest.raises(DataError, match="train_x must be uint8"):
        splits.RawDataset(x.float(), torch.zeros(3, dtype=torch.int64), None, None, ["a"])
    with pytest.raises(DataError, match="labels outside"):
        splits.RawDataset(x, torch.tensor([0, 1, 2]), None, None, ["a", "b"])


# ------------------------------------------------------------------------------------- splits


def test_split_stratified_disjoint_covering():
    labels = toy_raw((50, 31, 17, 9)).train_y
    s = splits.stratified_split(labels, val_fraction=0.2, test_fraction=0.1, seed=3)
    parts = [s.train_idx, s.val_idx, s.test_idx]
    assert torch.equal(torch.sort(torch.cat(parts)).values, torch.arange(len(labels)))  # disjoint + covering
    for idx in parts:
        assert idx.dtype == torch.int64 and torch.equal(idx, torch.sort(idx).values)
    assert (len(s.val_idx), len(s.test_idx)) == (round(107 * 0.2), round(107 * 0.1))
    counts = torch.bincount(labels).double()
    for idx, frac in ((s.val_idx, 0.2), (s.test_idx, 0.1)):
        per_class = torch.bincount(labels[idx], minlength=4).double()
        assert torch.all((per_class - counts * frac).abs() <= 1), (per_class, counts * frac)


def test_split_deterministic_and_seeded():
    labels = toy_raw().train_y
    a = splits.stratified_split(labels, 0.25, 0.0, seed=0)
    b = splits.stratified_split(labels, 0.25, 0.0, seed=0)
    c = splits.stratified_split(labels, 0.25, 0.0, seed=1)
    assert a.test_idx is None
    assert torch.equal(a.train_idx, b.train_idx) and torch.equal(a.val_idx, b.val_idx)
    assert not torch.equal(a.val_idx, c.val_idx)


def test_split_rejects_bad_fractions():
    with pytest.raises(ValueError, match="fraction"):
        splits.stratified_split(torch.arange(10) % 2, 0.6, 0.5, seed=0)


# ------------------------------------------------------------------------------ prepared dataset


def test_prepare_carves_test_when_no_official():
    raw = toy_raw()
    p = splits.prepare_dataset(raw, 0.2, 0.1, seed=0)
    sizes = {k: len(p[f"{k}_y"]) for k in ("train", "val", "test")}
    assert sizes == {"train": 42, "val": 12, "test": 6}
    assert {k: sum(v) for k, v in p["class_counts"].items()} == sizes
    assert p["class_counts"]["val"] == [6, 4, 2]
    assert p["image_shape"] == [3, 4, 4] and p["classes"] == ["c0", "c1", "c2"]
    assert p["train_x"].dtype == torch.uint8 and p["train_y"].dtype == torch.int64


def test_prepare_uses_official_test():
    raw = toy_raw(with_test=True)
    p = splits.prepare_dataset(raw, 0.2, 0.0, seed=0)
    assert torch.equal(p["test_x"], raw.test_x) and len(p["train_y"]) + len(p["val_y"]) == 60


def test_prepare_needs_test_fraction_without_official_test():
    with pytest.raises(DataError, match="test_fraction"):
        splits.prepare_dataset(toy_raw(), 0.2, 0.0, seed=0)


def test_prepare_stats_are_train_only():
    raw = toy_raw()
    p = splits.prepare_dataset(raw, 0.2, 0.1, seed=0)
    train_f = p["train_x"].double() / 255
    assert p["mean"] == pytest.approx(train_f.mean(dim=(0, 2, 3)).tolist(), abs=1e-9)
    assert p["std"] == pytest.approx(train_f.std(dim=(0, 2, 3), unbiased=False).tolist(), abs=1e-9)
    # Overwrite every val and test image: the statistics must not move.
    split = splits.stratified_split(raw.train_y, 0.2, 0.1, seed=0)
    changed_x = raw.train_x.clone()
    changed_x[torch.cat([split.val_idx, split.test_idx])] = 255
    changed = splits.prepare_dataset(splits.RawDataset(changed_x, raw.train_y, None, None, raw.classes), 0.2, 0.1, 0)
    assert changed["mean"] == p["mean"] and changed["std"] == p["std"]
    assert changed["digest"] != p["digest"]


def test_digest_stable_and_sensitive():
    raw = toy_raw(with_test=True)
    p = splits.prepare_dataset(raw, 0.2, 0.0, seed=0)
    assert splits.prepare_dataset(raw, 0.2, 0.0, seed=0)["digest"] == p["digest"] == splits.dataset_digest(p)
    assert len(p["digest"]) == 64
    for key in splits.SPLIT_TENSORS:
        q = dict(p, **{key: p[key].clone()})
        q[key].view(-1)[0] ^= 1  # one pixel (or label) changes by one
        assert splits.dataset_digest(q) != p["digest"], key
    assert splits.dataset_digest(dict(p, classes=["x", "c1", "c2"])) != p["digest"]


def test_prepared_round_trips_weights_only(tmp_path):
    p = splits.prepare_dataset(toy_raw(), 0.2, 0.1, seed=0)
    torch.save(p, tmp_path / "prepared.pt")
    q = torch.load(tmp_path / "prepared.pt", weights_only=True)
    assert q.keys() == p.keys() and splits.dataset_digest(q) == p["digest"]
    assert q["class_counts"] == p["class_counts"] and q["mean"] == p["mean"]


def test_to_float():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8)
    assert torch.allclose(batches.to_float(x), torch.tensor([0.0, 0.2, 1.0]))
    assert batches.to_float(x).dtype == torch.float32
    with pytest.raises(TypeError):
        batches.to_float(x.float())


# ----------------------------------------------------------------------------------- batching


def images(n=16, c=2, h=6, w=5, seed=0) -> torch.Tensor:
    """Float images with distinct, non-zero, asymmetric content (so flips and shifts are visible)."""
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed)) + 1.0


def test_augment_identity_and_shape():
    x = images()
    assert batches.augment_batch(x, 0, False) is x
    assert batches.augment_batch(x, 2, True, torch.Generator().manual_seed(0)).shape == x.shape


def test_augment_flip_only_flips_the_drawn_images():
    x = images(n=32)
    out = batches.augment_batch(x, 0, True, torch.Generator().manual_seed(7))
    # The docstring fixes the draw: flips = torch.rand(N) < 0.5 from the generator.
    flipped = torch.rand(32, generator=torch.Generator().manual_seed(7)) < 0.5
    assert 0 < flipped.sum() < 32
    expected = torch.where(flipped[:, None, None, None], torch.flip(x, dims=[3]), x)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("flip", [False, True])
def test_augment_crop_is_a_shifted_window(flip):
    pad = 2
    x = images(n=24)
    out = batches.augment_batch(x, pad, flip, torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(x, (pad,) * 4)
    h, w = x.shape[2:]
    shifts = set()
    for i in range(len(x)):
        windows = {
            (dy, dx, f): padded[i, :, dy : dy + h, dx : dx + w].flip(2) if f else padded[i, :, dy : dy + h, dx : dx + w]
            for dy in range(2 * pad + 1) for dx in range(2 * pad + 1) for f in ((False, True) if flip else (False,))
        }  # fmt: skip
        matches = [k for k, win in windows.items() if torch.equal(out[i], win)]
        assert matches, f"image {i} is not a window of its padded input"
        shifts.add(matches[0])
    assert len(shifts) > 3  # offsets really vary between images


def test_augment_deterministic():
    x = images()
    a = batches.augment_batch(x, 3, True, torch.Generator().manual_seed(5))
    b = batches.augment_batch(x, 3, True, torch.Generator().manual_seed(5))
    c = batches.augment_batch(x, 3, True, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_augment_on_gpu():
    x = images().cuda()
    out = batches.augment_batch(x, 2, True, torch.Generator().manual_seed(0))
    cpu = batches.augment_batch(x.cpu(), 2, True, torch.Generator().manual_seed(0))
    assert out.device == x.device and torch.equal(out.cpu(), cpu)
