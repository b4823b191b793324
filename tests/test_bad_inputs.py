"""Bad input to the stages (artifacts between stages, data, environment; params: tests/test_config.py).

The rule every case checks: a non-zero exit (2 for user input), one stderr line naming the culprit (file, key,
class or URI) and what to do, no traceback, and every file produced earlier byte for byte as it was. Each case
runs on a copy of the session's tiny workspace (`ws`), never on the shared one. Environment cases that are
correct behaviour (no git on PATH, no DVC repository) assert that the stage succeeds.

The second half covers `kdpipe predict` and the rest of the CLI the same way (one line naming the file, folder,
URI or store; no file changed or created), what predict accepts on purpose (RGBA and 16-bit images, folders,
registry URIs in a given store), and every printing command piped into a reader that has gone (`| head`), on
tiny linear ONNX classifiers built with onnx.helper and a registry in a temp sqlite store.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import onnx
import pytest
import torch
from conftest import REPO, subprocess_env, with_overrides, write_params
from datagen import write_cifar10, write_imagefolder
from mlflow.tracking._model_registry import utils as registry_utils
from mlflow.tracking._tracking_service import utils as tracking_utils
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from kdpipe import cli
from kdpipe import store as mlflow_store
from kdpipe.files import OutputError, atomic_write_bytes
from kdpipe.models.checkpoint import save_checkpoint
from kdpipe.models.zoo import build_model
from kdpipe.ship import registrations

# ------------------------------------------------------------------------------ helpers (shared with CLI cases)


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@contextmanager
def unchanged(*roots: Path):
    """Assert that no file under any of `roots` is added, removed or changed by the body."""
    before = [snapshot(root) for root in roots]
    yield
    for root, old in zip(roots, before, strict=True):
        new = snapshot(root)
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        assert not changed, f"files changed under {root}: {changed[:10]}"


def assert_one_line_error(code: int, err: str, *words: str, exit_code: int = 2) -> str:
    """The exit code, exactly one stderr line holding every one of `words`, no traceback; returns the line."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert code == exit_code, (code, err)
    assert len(lines) == 1, err
    missing = [w for w in words if w not in lines[0]]
    assert not missing, f"{missing} not in: {lines[0]}"
    return lines[0]


def run_main(stage: str, params: Path, capfd) -> tuple[int, str]:
    """`python -m kdpipe.stages.<stage> --params <params>`, in-process: (exit code, stderr)."""
    capfd.readouterr()
    code = importlib.import_module(f"kdpipe.stages.{stage}").main(["--params", str(params)])
    return code, capfd.readouterr().err


@dataclass
class Workspace:
    """A copy of the tiny pipeline's outputs in `root` (the cwd), its own MLflow store in `store`; inputs a test
    makes (params files, checkpoints, raw data) go to `tmp`, outside both."""

    root: Path
    store: Path
    tmp: Path
    base: dict  # params with every path inside root

    @property
    def produced(self) -> tuple[Path, Path]:
        """What a refused stage must leave as it was: every artifact and the MLflow store."""
        return self.root, self.store

    def params(self, **overrides) -> Path:
        """A params file (outside root) with `section__key=value` overrides."""
        params = with_overrides(json.loads(json.dumps(self.base)), **overrides)
        return write_params(self.tmp / f"params-{len(list(self.tmp.glob('params-*')))}.yaml", params)

    def run(self, stage: str, capfd, **overrides) -> tuple[int, str]:
        return run_main(stage, self.params(**overrides), capfd)

    def shipped_seed(self) -> int:
        return json.loads((self.root / "metrics/evaluate.json").read_text())["shipped"]["seed"]


@pytest.fixture
def ws(tiny_pipeline, tmp_path, monkeypatch) -> Workspace:
    work, root = tiny_pipeline.work, tmp_path / "ws"
    shutil.copytree(work, root, ignore=shutil.ignore_patterns("mlartifacts", "mlflow.db*", "params.yaml"))
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(work / "mlflow.db", store / "mlflow.db")
    params = tiny_pipeline.params_with()
    params["paths"] = {k: v.replace(str(work), str(root)) for k, v in params["paths"].items()}
    # Its own experiment, so that runs which succeed put their artifacts under root, not the shared workspace.
    params["tracking"].update(uri=f"sqlite:///{store / 'mlflow.db'}", experiment="bad-inputs",
                              system_metrics=False)
    monkeypatch.chdir(root)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return Workspace(root, store, tmp_path, params)


CACHED = {"student__crop_padding": 0, "student__flip": False, "distill__method": "kd"}  # distill reads the cache


def _corrupt(path: Path) -> None:
    path.write_bytes(torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:5000])


def _edit(path: Path, **changes) -> None:
    """Rewrite a torch file with some entries changed (callables get the old value)."""
    obj = torch.load(path, weights_only=True)
    obj.update({k: v(obj[k]) if callable(v) else v for k, v in changes.items()})
    torch.save(obj, path)


# ------------------------------------------------------------------------------- artifacts between stages

TEACHER_OUTPUTS_CASES = {
    "truncated": (_truncate, ["not readable, truncated or corrupt"]),
    "corrupt": (_corrupt, ["not readable, truncated or corrupt"]),
    "stale": (lambda p: _edit(p, dataset_digest="f" * 64), ["made for another dataset", "ffffffffffff"]),
    "wrong rows": (lambda p: _edit(p, train_logits=lambda t: t[:-3]), ["logits (", "the train split needs"]),
    "no logits": (lambda p: torch.save({"difficulty": torch.zeros(3)}, p), ["lacks the train_logits"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", TEACHER_OUTPUTS_CASES)
def test_distill_refuses_a_bad_teacher_outputs_cache(ws, capfd, case):
    damage, words = TEACHER_OUTPUTS_CASES[case]
    damage(ws.root / "models/teacher_outputs.pt")
    with unchanged(*ws.produced):
        code, err = ws.run("distill", capfd, **CACHED)
    assert_one_line_error(code, err, "models/teacher_outputs.pt", *words,
                          "rerun the teacher stage (dvc repro teacher)")


def test_the_cache_cases_above_do_read_the_cache(ws, capfd):
    """Control: with these params and an intact cache, distill succeeds and reads the teacher's cached logits."""
    code, err = ws.run("distill", capfd, **CACHED)
    assert code == 0, err
    assert json.loads((ws.root / "metrics/distill.json").read_text())["teacher_outputs"] == "cached"


STUDENT_CASES = {
    "corrupt": (_corrupt, ["not a loadable torch checkpoint", "rerun the distill stage (dvc repro distill)"]),
    "missing": (Path.unlink, ["not found; run the distill stage first (dvc repro distill)"]),
    "stale": (lambda p: _edit(p, dataset_digest="f" * 64),
              ["made for another dataset", "rerun the distill stage"]),
}


@pytest.mark.parametrize("stage", ["evaluate", "export"])
@pytest.mark.parametrize("case", STUDENT_CASES)
def test_evaluate_and_export_refuse_a_bad_student_checkpoint(ws, capfd, stage, case):
    damage, words = STUDENT_CASES[case]
    seed = ws.shipped_seed() if stage == "export" else 0  # export reads only the seed evaluate chose
    damage(ws.root / f"models/distill/seed{seed}.pt")
    with unchanged(*ws.produced):
        code, err = ws.run(stage, capfd)
    assert_one_line_error(code, err, f"models/distill/seed{seed}.pt", *words)


def test_a_training_stage_refuses_a_corrupt_prepared_dataset(ws, capfd):
    _truncate(ws.root / "data/prepared/dataset.pt")
    with unchanged(*ws.produced):
        code, err = ws.run("scratch", capfd)
    assert_one_line_error(code, err, "data/prepared/dataset.pt", "truncated or corrupt",
                          "rerun the prepare stage (dvc repro prepare)")


def _kdpipe_teacher(path: Path, in_channels: int, classes: list[str]) -> None:
    save_checkpoint(path, build_model("small_cnn", in_channels, len(classes)), classes=classes, params={})


BROUGHT_CASES = {
    "other classes": (lambda p: _kdpipe_teacher(p, 1, ["a", "b", "c"]), ["has 3 classes, the dataset has 10"]),
    "other channels": (lambda p: _kdpipe_teacher(p, 3, [str(i) for i in range(10)]),
                       ["takes 3 channels, the dataset has 1"]),
    "other architecture": (lambda p: torch.save(build_model("tiny_cnn", 1, 10).body.state_dict(), p),
                           ["weights do not fit small_cnn", "in the file", "teacher.model (small_cnn)"]),
}


@pytest.mark.parametrize("case", BROUGHT_CASES)
def test_teacher_refuses_a_brought_checkpoint_made_for_something_else(ws, capfd, case):
    make, words = BROUGHT_CASES[case]
    brought = ws.tmp / "brought.pt"
    make(brought)
    with unchanged(*ws.produced):
        code, err = ws.run("teacher", capfd, teacher__source="checkpoint", teacher__checkpoint=str(brought))
    assert_one_line_error(code, err, "teacher.checkpoint", "brought.pt", *words, "teacher.source: train")


# -------------------------------------------------------------------------------------------------- data


def test_prepare_refuses_a_corrupt_cifar_pickle(ws, capfd):
    folder = write_cifar10(ws.tmp / "raw", n_per_batch=20)
    _corrupt(folder / "data_batch_2")
    with unchanged(*ws.produced):
        code, err = ws.run("prepare", capfd, data__dataset="cifar10", paths__raw=str(ws.tmp / "raw"))
    assert_one_line_error(code, err, "cifar10: cannot unpickle", "data_batch_2", "data.download: true")


@pytest.mark.parametrize("per_class, words", [
    ({"cat": 6, "dog": 6, "emu": 1}, ["class 'emu' has 1 image(s)", "val and test without any",
                                      "it needs at least 3, one per split"]),
    ({"cat": 20, "dog": 20, "emu": 3}, ["class 'emu' has 3 image(s)", "leaves val without any",
                                        "data.val_fraction 0.15", "raise data.val_fraction"]),
], ids=["single image", "none for val"])
def test_prepare_refuses_splits_without_a_class(ws, capfd, per_class, words):
    folder = ws.tmp / "images"
    for name, n in per_class.items():
        write_imagefolder(folder, classes=(name,), per_class=n, size=(8, 8))
    with unchanged(*ws.produced):
        code, err = ws.run("prepare", capfd, data__dataset="imagefolder", data__folder=str(folder),
                           data__image_size=8, paths__raw=str(ws.tmp))  # the folder lies under paths.raw
    assert_one_line_error(code, err, *words)


# ------------------------------------------------------------------------------------------- environment


@pytest.mark.parametrize("where", ["MLFLOW_TRACKING_URI", "tracking.uri"])
def test_an_unreachable_tracking_server_fails_before_any_work(ws, capfd, monkeypatch, where):
    uri = "http://127.0.0.1:9"  # the discard port: nothing listens
    for proxy in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    overrides = {}
    if where == "MLFLOW_TRACKING_URI":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    else:
        overrides["tracking__uri"] = uri
    t0 = time.perf_counter()
    with unchanged(*ws.produced):
        for stage in ("prepare", "teacher"):
            code, err = ws.run(stage, capfd, **overrides)
            assert_one_line_error(code, err, f"{where}={uri}", "cannot reach the MLflow server", "start it")
    assert time.perf_counter() - t0 < 10


def test_an_output_folder_that_cannot_exist_fails_before_any_work(ws, capfd):
    """Root writes through chmod, so the unwritable folder here is one under a file."""
    (ws.tmp / "blocker").write_text("a file where paths.metrics expects a folder")
    with unchanged(*ws.produced):
        code, err = ws.run("evaluate", capfd, paths__metrics=str(ws.tmp / "blocker/metrics"))
    assert_one_line_error(code, err, "paths.metrics", "blocker is a file", "point paths.metrics elsewhere")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod 0o555; the test above covers root")
def test_a_read_only_output_folder_fails_before_any_work(ws, capfd):
    reports = ws.root / "reports"
    reports.chmod(0o555)
    try:
        with unchanged(*ws.produced):
            code, err = ws.run("evaluate", capfd)
    finally:
        reports.chmod(0o755)
    assert_one_line_error(code, err, "paths.reports", "not writable")


def test_a_failed_write_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    """The disk fills up mid-write (ENOSPC from fsync): the old file stays, no temp file is left."""
    target = tmp_path / "metrics.json"
    target.write_text("old")

    def full(_fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError) as e:
        atomic_write_bytes(target, b"new")
    assert str(e.value) == f"{target}: cannot write it (No space left on device); free disk space and rerun"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"] and target.read_text() == "old"


FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (3_000_000, 3_000_000))
from kdpipe.stages import prepare
sys.exit(prepare.main(["--params", sys.argv[1]]))
"""


@pytest.mark.slow
def test_a_full_disk_is_one_line_in_a_real_process_and_the_old_dataset_stays(ws):
    """prepare of a 6 MB dataset with files limited to 3 MB (the MLflow store stays below): exit 2, one line
    naming the file (the train images, the first too large), no traceback, the old dataset.pt, meta.json and
    image arrays untouched, no temp file left."""
    write_cifar10(ws.tmp / "raw", n_per_batch=300)
    params = ws.params(data__dataset="cifar10", paths__raw=str(ws.tmp / "raw"))
    with unchanged(ws.root):  # the MLflow store (outside root) records the failed run
        out = subprocess.run([sys.executable, "-c", FULL_DISK, str(params)], cwd=ws.root, env=subprocess_env(),
                             capture_output=True, text=True, timeout=120)
    assert_one_line_error(out.returncode, out.stderr, "data/prepared/train_x.npy",
                          "cannot write it (File too large)", "ulimit -f")


def test_no_git_on_path_the_stage_still_runs(ws, capfd, monkeypatch):
    import mlflow

    monkeypatch.setenv("PATH", str(ws.tmp / "empty-bin"))  # no git (nor anything else) to find
    monkeypatch.setenv("GIT_PYTHON_REFRESH", "quiet")  # mlflow's GitPython would warn about the missing git
    code, err = ws.run("scratch", capfd)
    assert code == 0, err
    client = mlflow.MlflowClient(ws.base["tracking"]["uri"])
    [run] = client.search_runs([client.get_experiment_by_name("bad-inputs").experiment_id])
    assert run.data.tags["stage"] == "scratch" and run.data.tags["git_commit"] == "unknown"


def test_no_dvc_repository_the_stage_still_runs(ws, capfd, monkeypatch):
    """Stages pass artifacts through files; DVC only orchestrates: no repository, no dvc on PATH, still fine."""
    assert not any((d / name).exists() for d in (ws.root, *ws.root.parents) for name in (".dvc", "dvc.yaml"))
    monkeypatch.setenv("PATH", str(ws.tmp / "empty-bin"))
    code, err = ws.run("evaluate", capfd)
    assert code == 0, err
    assert json.loads((ws.root / "metrics/evaluate.json").read_text())["shipped"]["seed"] in (0, 1)


@pytest.mark.parametrize("variable, value, words", [
    pytest.param("KDPIPE_DEVICE", "cuda", ["KDPIPE_DEVICE=cuda: not usable on this machine", "KDPIPE_DEVICE=cpu"],
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
    ("KDPIPE_DEVICE", "gpu", ["KDPIPE_DEVICE='gpu': not a device name", "use cpu, cuda"]),
    ("KDPIPE_THREADS", "two", ["KDPIPE_THREADS='two': must be a whole number", "unset it"]),
], ids=["cuda without a GPU", "unknown device", "threads not a number"])
def test_an_unusable_device_or_thread_count_is_one_line(ws, capfd, monkeypatch, variable, value, words):
    monkeypatch.setenv(variable, value)
    with unchanged(*ws.produced):
        code, err = ws.run("teacher", capfd)
    assert_one_line_error(code, err, *words)


# -------------------------------------------------------------------------------- kdpipe predict and the CLI

CLASSES = ["ant", "bee", "cat"]
NAME = "kdpipe-student"


def tiny_onnx(path: Path, channels: int = 1) -> Path:
    """A linear classifier, images (N, C, 4, 4) in [0, 1] → 3 logits, carrying kdpipe's metadata."""
    weights = np.random.default_rng(0).normal(size=(channels * 16, len(CLASSES))).astype(np.float32)
    nodes = [helper.make_node("Flatten", ["images"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", channels, 4, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(weights, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, {"classes": json.dumps(CLASSES), "input_size": f"{channels}x4x4"})
    onnx.save(model, path)
    return path


def pixels(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def save(array: np.ndarray, path: Path) -> Path:
    Image.fromarray(array).save(path)
    return path


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """The cwd: a grey and an RGB model, one good 4×4 grey image; no MLflow URI set anywhere (env or mlflow's
    globals), so a lookup that ignores --tracking-uri falls back to ./mlflow.db here and shows."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(mlflow_store, "_USER_URI", None)  # the variable as kdpipe.store saw it at import
    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)
    monkeypatch.setattr(registry_utils, "_registry_uri", None)
    tiny_onnx(tmp_path / "grey.onnx", channels=1)
    tiny_onnx(tmp_path / "rgb.onnx", channels=3)
    save(pixels((4, 4)), tmp_path / "good.png")
    return tmp_path


def predict(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["predict", *args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_predict_error(result: tuple[int, str, str], *culprits: str) -> str:
    """`kdpipe predict` failed as a user error: nothing on stdout, one stderr line naming every culprit."""
    code, out, err = result
    assert out == "", result
    line = assert_one_line_error(code, err, *culprits)
    assert line.startswith("kdpipe predict: error: "), line
    return line


def top_lines(out: str) -> list[str]:
    """The ranked lines of one image's result, without the image name."""
    return out.strip().splitlines()[1:]


# --------------------------------------------------------------------------------------- bad models

@pytest.mark.parametrize("model", ["missing.onnx", "junk.onnx", "truncated.onnx"])
def test_bad_model_file_is_one_line(work, capsys, model):
    (work / "junk.onnx").write_bytes(b"this is not an ONNX model\n" * 4)
    (work / "truncated.onnx").write_bytes((work / "grey.onnx").read_bytes()[:200])
    before = snapshot(work)
    message = assert_predict_error(predict(capsys, "--model", model, "good.png"), model)
    assert "not found" in message if model == "missing.onnx" else "not a readable ONNX model" in message
    assert snapshot(work) == before


# --------------------------------------------------------------------------------------- bad images

def test_corrupt_and_truncated_images_are_one_line(work, capsys):
    (work / "junk.png").write_bytes(b"\x89PNG but not really" * 8)
    whole = save(pixels((64, 64)), work / "whole.png").read_bytes()
    (work / "cut.png").write_bytes(whole[: len(whole) // 2])
    before = snapshot(work)
    message = assert_predict_error(predict(capsys, "--model", "grey.onnx", "good.png", "junk.png"), "junk.png")
    assert "not an image" in message
    message = assert_predict_error(predict(capsys, "--model", "grey.onnx", "cut.png"), "cut.png")
    assert "unreadable image (image file is truncated)" in message
    assert snapshot(work) == before


def test_rgba_reads_as_its_rgb(work, capsys):
    """Alpha is dropped (as prepare reads an image folder): an RGBA file predicts exactly like its RGB part."""
    rgb = pixels((4, 4, 3), seed=1)
    save(rgb, work / "rgb.png")
    save(np.dstack([rgb, pixels((4, 4), seed=2)]), work / "rgba.png")
    before = snapshot(work)
    code, rgba_out, err = predict(capsys, "--model", "rgb.onnx", "rgba.png")
    assert code == 0 and err == ""
    assert top_lines(rgba_out) == top_lines(predict(capsys, "--model", "rgb.onnx", "rgb.png")[1])
    assert snapshot(work) == before


def test_16_bit_grey_is_scaled_not_clipped(work, capsys):
    """A 16-bit copy (v·257) of an 8-bit image predicts exactly like it; Pillow's own convert would clip every
    value above 255 to white."""
    grey = pixels((4, 4), seed=3)
    save(grey, work / "grey8.png")
    save(grey.astype(np.uint16) * 257, work / "grey16.png")
    save(np.full((4, 4), 255, np.uint8), work / "white.png")
    assert Image.open(work / "grey16.png").mode.startswith("I")
    before = snapshot(work)
    code, out16, err = predict(capsys, "--model", "grey.onnx", "grey16.png")
    assert code == 0 and err == ""
    assert top_lines(out16) == top_lines(predict(capsys, "--model", "grey.onnx", "grey8.png")[1])
    assert top_lines(out16) != top_lines(predict(capsys, "--model", "grey.onnx", "white.png")[1])
    assert snapshot(work) == before


# --------------------------------------------------------------------------------------- folders

def test_folder_is_its_images(work, capsys):
    folder = work / "batch"
    folder.mkdir()
    for i in (2, 1):
        save(pixels((4, 4), seed=i), folder / f"img{i}.png")
    (folder / "notes.txt").write_text("not an image")
    code, out, err = predict(capsys, "--model", "grey.onnx", "batch", "good.png")
    assert code == 0 and err == ""
    names = [line for line in out.splitlines() if not line.startswith(" ")]
    assert names == ["batch/img1.png", "batch/img2.png", "good.png"]  # sorted, notes.txt skipped


def test_folder_without_images_is_one_line(work, capsys):
    (work / "empty").mkdir()
    (work / "empty" / "notes.txt").write_text("not an image")
    before = snapshot(work)
    message = assert_predict_error(predict(capsys, "--model", "grey.onnx", "good.png", "empty"), "empty")
    assert "holds no images" in message
    assert snapshot(work) == before


# --------------------------------------------------------------------------------------- registry URIs

@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A sqlite store (folder/mlflow.db, artifacts beside it) where kdpipe.ship.registry registered the grey model as
    kdpipe-student v1, champion. mlflow's global URI and the environment are restored afterwards."""
    folder = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tracking_utils, "_tracking_uri", None)
        mp.setenv("MLFLOW_TRACKING_URI", uri)  # set_tracking_uri writes it; restored on exit
        mlflow.set_tracking_uri(uri)
        experiment = mlflow.create_experiment("kdpipe", artifact_location=(folder / "mlartifacts").as_uri())
        entry = registrations.Registration(name=NAME, onnx_path=tiny_onnx(folder / "tiny.onnx"), artifact_name="student",
                                      test_accuracy=0.9, dataset_digest="d1", val_accuracy=0.9)
        with mlflow.start_run(experiment_id=experiment):
            registrations.register_onnx(entry, np.random.default_rng(0).random((2, 1, 4, 4), dtype=np.float32))
    return folder


def test_registry_uri_uses_the_given_store(work, store, capsys):
    """The measured bug: --tracking-uri was ignored by the download (./mlflow.db created here, traceback)."""
    before = snapshot(store)
    code, out, err = predict(capsys, "--model", f"models:/{NAME}@champion", "--tracking-uri",
                             f"sqlite:///{store / 'mlflow.db'}", "good.png")
    assert code == 0 and err == "", err
    assert top_lines(out) == top_lines(predict(capsys, "--model", "grey.onnx", "good.png")[1])
    assert not (work / "mlflow.db").exists()
    assert snapshot(store) == before


def test_registry_uri_missing_from_the_store_is_one_line(work, store, capsys):
    uri, store_uri = f"models:/{NAME}@nope", f"sqlite:///{store / 'mlflow.db'}"
    before, here = snapshot(store), snapshot(work)
    message = assert_predict_error(predict(capsys, "--model", uri, "--tracking-uri", store_uri, "good.png"),
                                    uri, store_uri)
    assert "not found" in message
    assert snapshot(store) == before and snapshot(work) == here  # no ./mlflow.db appeared


def test_registry_store_that_does_not_exist_is_one_line(work, capsys):
    missing = work / "elsewhere" / "mlflow.db"
    before = snapshot(work)
    assert_predict_error(predict(capsys, "--model", f"models:/{NAME}@champion", "--tracking-uri",
                                  f"sqlite:///{missing}", "good.png"), str(missing), "no MLflow store")
    assert_predict_error(predict(capsys, "--model", f"models:/{NAME}@champion", "good.png"),  # default store
                          str(work / "mlflow.db"), "no MLflow store")
    assert snapshot(work) == before and not (work / "elsewhere").exists()


# --------------------------------------------------------------------------------------- `| head`

# `head -n 0` exits before reading, so every write meets a closed pipe: `| head -1` hits the same error only
# when head wins the race. Unbuffered runs fail in a print, buffered ones in the final flush: both are covered.
PIPED = {  # command: (arguments, unbuffered)
    "list models": (["list", "models"], True),
    "list losses": (["list", "losses"], True),
    "check-params": (["check-params", str(REPO / "params.yaml")], False),
    "predict": (["predict", "--model", "grey.onnx", "good.png", "good.png"], False),
}


@pytest.mark.parametrize("command", list(PIPED))
def test_piped_into_head_ends_quietly(work, command):
    args, unbuffered = PIPED[command]
    kdpipe = Path(sys.executable).parent / "kdpipe"
    script = f"set +o pipefail; {kdpipe} {' '.join(args)} | head -n 0; exit ${{PIPESTATUS[0]}}"
    env = subprocess_env()
    env.pop("PYTHONUNBUFFERED", None)
    env.update({"PYTHONUNBUFFERED": "1"} if unbuffered else {})
    before = snapshot(work)
    result = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == cli.EXIT_BROKEN_PIPE and result.stderr == "", (result.returncode, result.stderr)
    assert snapshot(work) == before
