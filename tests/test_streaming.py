"""Datasets larger than memory: splits as on-disk arrays, an image folder decoded in parallel straight into them, and
training that streams them through DataLoader workers with exactly the results of the in-memory path."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from kdpipe import config
from kdpipe.data import datasets, imagefolder, splits
from kdpipe.data.batches import Split
from kdpipe.data.ondisk import OnDiskArray, stage_npy
from kdpipe.data.prepared import load_prepared
from kdpipe.data.splits import DataError
from kdpipe.models.zoo import build_model
from kdpipe.run.runtime import Runtime
from kdpipe.stages import distill, prepare, teacher
from kdpipe.train.engine import fit

CPU = torch.device("cpu")


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 8, 8), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _on_disk(tmp_path, x: torch.Tensor, name: str = "x.npy") -> OnDiskArray:
    staged = stage_npy(tmp_path / name, x)
    staged.path.rename(tmp_path / name)
    return OnDiskArray.open(tmp_path / name)


def test_on_disk_array_reads_what_was_written(tmp_path):
    x = _images(50)
    array = _on_disk(tmp_path, x)
    assert len(array) == 50 and array.shape == x.shape and array.nbytes == x.numel()
    assert torch.equal(array[10:20], x[10:20]) and torch.equal(array.load(), x)
    idx = torch.tensor([7, 3, 3, 49, 0])  # any order, repeats allowed
    assert torch.equal(array.take(idx), x[idx])
    assert torch.equal(torch.cat(list(array.chunks())), x)
    assert np.array_equal(np.load(tmp_path / "x.npy"), x.numpy())  # a plain .npy: numpy reads it
    clone = pickle.loads(pickle.dumps(array))  # what a DataLoader worker gets: no open file descriptor
    assert clone._fd is None and torch.equal(clone.take(idx), x[idx])


def test_on_disk_array_names_a_truncated_file(tmp_path):
    _on_disk(tmp_path, _images(20))
    path = tmp_path / "x.npy"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match=r"x.npy: truncated .*rerun the prepare stage"):
        OnDiskArray.open(path)


def test_digest_and_statistics_are_the_same_on_disk(tmp_path, monkeypatch):
    monkeypatch.setattr("kdpipe.data.ondisk.CHUNK_BYTES", 640)  # ten images a chunk: the chunked passes really chunk
    raw = datasets.load_raw("digits", tmp_path)
    prepared = splits.prepare_dataset(raw, 0.15, 0.2, seed=0)
    on_disk = {**prepared, **{k: _on_disk(tmp_path, prepared[k], f"{k}.npy") for k in ("train_x", "val_x", "test_x")}}
    assert splits.dataset_digest(on_disk) == prepared["digest"]
    assert splits.channel_stats(on_disk["train_x"]) == splits.channel_stats(prepared["train_x"])


def write_as_folder(root, x: torch.Tensor, y: torch.Tensor, classes: list[str]) -> None:
    """Grey uint8 images (N, 1, H, W) as root/<class>/<i>.png."""
    for i, (image, label) in enumerate(zip(x, y.tolist(), strict=True)):
        folder = root / classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0].numpy()).save(folder / f"{i:05d}.png")


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    """sklearn's 1797 digits as an image folder of 8x8 PNGs."""
    root = tmp_path_factory.mktemp("digits_folder") / "digits"
    raw = datasets.load_raw("digits", root)
    write_as_folder(root, raw.train_x, raw.train_y, [f"d{c}" for c in raw.classes])
    return root


def test_image_folder_decodes_in_parallel_to_the_same_dataset(digits_folder, tmp_path):
    """The streamed prepare (4 decoder processes, a chunk at a time) gives the splits, images and digest of loading
    the folder whole and splitting it in memory; a train_subset is taken before the split, as in memory."""
    whole = splits.prepare_dataset(splits.subset(imagefolder.load(digits_folder, 8), 1000, 0), 0.15, 0.2, seed=0)
    path = tmp_path / "prepared" / "dataset.pt"
    streamed = imagefolder.prepare_to_disk(digits_folder, 8, path, val_fraction=0.15, test_fraction=0.2, seed=0,
                                           train_subset=1000, workers=4)
    assert isinstance(streamed["train_x"], OnDiskArray) and streamed["train_x"].path.name.startswith(".")
    assert streamed["digest"] == whole["digest"]
    for key in ("train_x", "val_x", "test_x"):
        assert torch.equal(streamed[key].load(), whole[key])


def _fit(train: Split, val: Split, seed: int = 0):
    model = build_model("tiny_cnn", 1, 10)
    recipe = config.StudentConfig(model="tiny_cnn", epochs=2, batch_size=32, crop_padding=1, patience=0)
    result = fit(model, train, val, recipe, Runtime(CPU), seed=seed)
    return model, result


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_training_is_the_in_memory_run(tmp_path, workers):
    """Same index batches, same bytes: a run streamed from disk through DataLoader workers ends with the weights
    and curves of the run on in-memory tensors, bit for bit."""
    x, y = _images(300), torch.randint(0, 10, (300,), generator=torch.Generator().manual_seed(1))
    val = Split(x[:60], y[:60])
    torch.manual_seed(0)
    in_memory, a = _fit(Split(x, y), val)
    torch.manual_seed(0)
    streamed, b = _fit(Split(_on_disk(tmp_path, x), y, workers), val)
    assert a.history == [{**row, "seconds": r["seconds"]} for row, r in zip(b.history, a.history, strict=True)]
    for p, q in zip(in_memory.state_dict().values(), streamed.state_dict().values(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.slow
def test_image_folder_through_teacher_and_distill_streamed(digits_folder, tiny_pipeline, tmp_path, monkeypatch,
                                                           capfd):
    """prepare → teacher → distill on an image folder with data.in_memory: false: the splits stay on disk
    (.npy files), training streams them through a worker, and the metrics are those of data.in_memory: true."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    folder = {"dataset": "imagefolder", "folder": str(digits_folder), "image_size": 8, "workers": 1}
    results = {}
    for in_memory in (False, True):
        root = tmp_path / str(in_memory)
        params = tiny_pipeline.workspace(root)
        params["data"].update(folder, in_memory=in_memory)
        params["paths"].update(prepared=str(root / "data/prepared"), raw=str(digits_folder.parent))  # folder in raw
        params["student"].update(seeds=[0])
        cfg = config.from_dict(params)
        prepare.run(cfg)
        assert sorted(p.name for p in (root / "data/prepared").iterdir()) == [
            "dataset.pt", "meta.json", "test_x.npy", "train_x.npy", "val_x.npy"]
        teacher.run(cfg)
        distill.run(cfg)
        results[in_memory] = [json.loads((root / f"metrics/{s}.json").read_text())
                              for s in ("teacher", "distill")]
    streamed_log = capfd.readouterr().err
    assert "streamed from disk" in streamed_log
    for streamed, resident in zip(results[False], results[True], strict=True):
        assert streamed["test_accuracy"] == resident["test_accuracy"]
        assert streamed["val_accuracy"] == resident["val_accuracy"]


def test_load_prepared_names_a_missing_array(tiny_pipeline, tmp_path):
    folder = tmp_path / "prepared"
    folder.mkdir()
    (folder / "dataset.pt").write_bytes((tiny_pipeline.work / "data/prepared/dataset.pt").read_bytes())
    with pytest.raises(DataError, match=r"train_x.npy: not found; rerun the prepare stage"):
        load_prepared(folder / "dataset.pt")


@pytest.mark.parametrize(("value", "message"), [("sometimes", "data.in_memory"), (-1, "data.workers")])
def test_bad_streaming_params_name_the_key(value, message):
    key = message.split(".")[1]
    with pytest.raises(config.ConfigError, match=message):
        config.from_dict({"data": {key: value}})
