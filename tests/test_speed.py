"""The speed levers: the precision policy per kind of device, channels_last's parity with the contiguous layout,
fp16 loss scaling, and the teacher's cached views (FKD) replaying exactly the images the teacher labelled."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_params, write_params

from kdpipe import config
from kdpipe.config import ConfigError, StudentConfig
from kdpipe.data.batches import Split
from kdpipe.distill.views import label_views
from kdpipe.models.zoo import build_model
from kdpipe.run import runtime
from kdpipe.run.runtime import Runtime, resolve_precision
from kdpipe.stages import distill
from kdpipe.train import distiller as kd
from kdpipe.train.engine import _Trainer
from kdpipe.train.objective import Objective

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.fixture
def gpu(monkeypatch):
    """A faked CUDA device: `gpu(native_bf16)` makes torch report an Ampere-or-later (True) or older GPU."""

    def fake(native_bf16: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True:
                            native_bf16 or including_emulation)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")

    return fake


@pytest.fixture
def cpu_bf16(monkeypatch):
    def fake(native: bool) -> None:
        monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)

    return fake


def test_auto_precision_per_kind_of_device(gpu, cpu_bf16):
    gpu(True)
    assert resolve_precision("auto", CUDA) == "bf16"  # compute capability >= 8.0
    gpu(False)
    assert resolve_precision("auto", CUDA) == "fp16"  # older GPUs: fp16 with loss scaling
    cpu_bf16(True)
    assert resolve_precision("auto", CPU) == "bf16"  # AVX512-BF16 / AMX
    cpu_bf16(False)
    assert resolve_precision("auto", CPU) == "fp32"  # emulated bf16 is slower than fp32
    assert resolve_precision("auto", torch.device("mps")) == "fp32"
    for device in (CUDA, CPU):
        assert resolve_precision("fp32", device) == "fp32"


def test_explicit_precision_the_device_cannot_run_is_a_one_line_error(gpu, cpu_bf16):
    gpu(False)
    with pytest.raises(ConfigError, match=r"^runtime.precision=bf16: Tesla V100 has no native bf16"):
        resolve_precision("bf16", CUDA)
    assert resolve_precision("fp16", CUDA) == "fp16"
    with pytest.raises(ConfigError, match=r"^runtime.precision=fp16: needs a CUDA GPU, this runs on cpu"):
        resolve_precision("fp16", CPU)
    cpu_bf16(False)
    assert resolve_precision("bf16", CPU) == "bf16"  # asked for explicitly: emulated, but the user's choice


def test_setup_applies_the_runtime_section(cpu_bf16):
    cpu_bf16(True)
    rt = runtime.setup(0, "cpu", config.RuntimeConfig(precision="auto", channels_last=False))
    assert (rt.precision, rt.amp_dtype, rt.channels_last, rt.grad_scaler()) == ("bf16", torch.bfloat16, False, None)
    assert runtime.device_facts(rt)["precision"] == "bf16"
    assert runtime.setup(0, "cpu", config.RuntimeConfig(precision="fp32")).amp_dtype is None
    with pytest.raises(ConfigError, match="runtime.precision: must be one of"):
        config.from_dict({"runtime": {"precision": "fp8"}})


@pytest.mark.parametrize("name", ["resnet20", "tiny_cnn", "mobilenetv2"])
def test_channels_last_gives_the_contiguous_logits(name):
    torch.manual_seed(0)
    model = build_model(name, 3, 10).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        nhwc = Runtime(CPU, "fp32", channels_last=True)
        got = nhwc.prepare(model)(nhwc.layout(x))
    assert next(p for p in model.parameters() if p.dim() == 4).is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _toy(n: int = 64) -> Split:
    g = torch.Generator().manual_seed(0)
    return Split(torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8), torch.randint(0, 10, (n,), generator=g))


def test_fp16_steps_through_the_grad_scaler():
    rt = Runtime(CPU, "fp16")  # CPU autocast runs fp16 too: the scaler path without a GPU
    model = build_model("tiny_cnn", 1, 10)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = _Trainer.build(model, StudentConfig(model="tiny_cnn", batch_size=16), rt, 0, Objective())
    assert isinstance(trainer.scaler, torch.amp.GradScaler)
    toy, idx = _toy(), torch.arange(16)
    _, _, parts = trainer.step(idx, toy.x[idx], toy.y[idx], lr=0.05)
    assert torch.isfinite(parts["loss"]) and trainer.scaler.get_scale() > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


class _Recorder(torch.nn.Module):
    """A stand-in teacher that records every image it labels and returns a per-image signature as logits."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.clone())
        return x.flatten(1)[:, :10] * 10  # the logits say which image this was


def test_cached_views_replay_the_images_the_teacher_saw():
    train = _toy(40)
    teacher = _Recorder()
    rt = Runtime(CPU, "fp32", channels_last=True)
    views = label_views(teacher, train.x, k=3, crop_padding=2, flip=True, seed=7, rt=rt, batch_size=16)
    assert views.logits.shape == (40, 3, 10) and views.logits.dtype == torch.float16
    seen = torch.cat([torch.stack(teacher.seen[b * 3:(b + 1) * 3], 1) for b in range(len(teacher.seen) // 3)])
    assert seen.shape == (40, 3, 1, 8, 8)  # (image, view, C, H, W)
    assert len({seen[:, v].sum().item() for v in range(3)}) == 3  # three different views, not one repeated

    idx = torch.tensor([5, 0, 39, 17, 5])
    x = train.x[idx].float() / 255
    replayed, rows, labels = views.augment(x, idx, train.y[idx], torch.Generator().manual_seed(1))
    image, view = rows // 3, rows % 3
    assert torch.equal(image, idx) and torch.equal(labels, train.y[idx])  # pad_crop views keep the labels
    torch.testing.assert_close(replayed, seen[image, view], rtol=0, atol=0)  # bit for bit the labelled view
    torch.testing.assert_close(views.flat_logits()[rows].float(), (replayed.flatten(1)[:, :10] * 10).half().float())

    again = label_views(_Recorder(), train.x, k=3, crop_padding=2, flip=True, seed=7, rt=Runtime(CPU), batch_size=64)
    assert torch.equal(again.dy, views.dy) and torch.equal(again.flipped, views.flipped)  # seeded, any batching


def test_cached_views_mean_no_teacher_forward_during_training():
    train = _toy()
    views = label_views(_Recorder(), train.x, k=2, crop_padding=1, flip=False, seed=0, rt=Runtime(CPU))

    class _Refuses(torch.nn.Module):
        def forward(self, x):
            raise AssertionError("the teacher must not run when its views are cached")

    loss_fn = kd.distill_loss(config.DistillConfig(), _Refuses(), cached_logits=views.flat_logits())
    trainer = _Trainer.build(build_model("tiny_cnn", 1, 10), StudentConfig(model="tiny_cnn", batch_size=16),
                             Runtime(CPU), 0, Objective(loss_fn=loss_fn, augment=views.augment))
    idx = torch.arange(16)
    _, _, parts = trainer.step(idx, train.x[idx], train.y[idx], lr=0.05)
    assert set(parts) == {"loss", "ce", "kd"} and torch.isfinite(parts["loss"])


def test_views_need_augmentation_and_logit_only_methods(workdir, capsys):
    for mutate, expected in [
        (lambda p: p["student"].update(crop_padding=0, flip=False),
         "distill.teacher_views: the student sees un-augmented images"),
        (lambda p: p["distill"].update(method="fitnet"), "distill.teacher_views: the method needs teacher features"),
        (lambda p: p["distill"].update(teacher_views=-1), "distill.teacher_views: must be >= 0"),
    ]:
        params = tiny_params(workdir, distill__teacher_views=2)
        mutate(params)
        assert distill.main(["--params", str(write_params(workdir / "bad.yaml", params))]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err


def test_distill_stage_with_cached_views(tiny_pipeline, tmp_path, monkeypatch):
    """distill.teacher_views: the views are labelled once, saved beside the students with their params, and
    named in the metrics; the precision used is a metrics field."""
    params = tiny_pipeline.workspace(tmp_path, distill__teacher_views=2, student__seeds=[0], student__epochs=1,
                                     student__warmup_epochs=0)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # tracking.uri above, not what a test left behind
    metrics = distill.run(config.from_dict(params))
    assert metrics["teacher_outputs"] == "views2" and metrics["views_seconds"] > 0
    assert metrics["precision"] == resolve_precision("auto", CPU)
    saved = torch.load(tmp_path / "models/distill/teacher_views.pt", weights_only=True)
    n_train = len(torch.load(tiny_pipeline.work / "data/prepared/dataset.pt", weights_only=True)["train_y"])
    assert saved["logits"].shape == (n_train, 2, 10) and saved["teacher_views"] == 2
    assert saved["crop_padding"] == params["student"]["crop_padding"]
    assert json.loads((tmp_path / "metrics/distill.json").read_text())["params"]["distill"]["teacher_views"] == 2


def test_folding_the_teachers_batchnorm_keeps_its_logits():
    torch.manual_seed(0)
    teacher = kd.freeze(build_model("resnet20", 3, 10))
    for m in teacher.modules():  # non-trivial running statistics, as a trained teacher has
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    folded = kd.fold_batchnorm(teacher)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.modules())  # a copy: the original is intact
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), teacher(x), rtol=1e-4, atol=1e-4)

    class _Untraceable(torch.nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x  # data-dependent control flow: fx cannot trace it

    plain = _Untraceable()
    assert kd.fold_batchnorm(plain) is plain


@pytest.mark.slow
def test_a_stage_process_skips_teardown_but_not_its_output(workdir):
    """exit_now: the stage's exit code, its last words on stderr, its files and its KDPIPE_TIMING line survive."""
    import subprocess
    import sys

    from conftest import subprocess_env

    timing = workdir / "timing.jsonl"
    good = write_params(workdir / "params.yaml", tiny_params(workdir))
    cmd = [sys.executable, "-m", "kdpipe.stages.prepare", "--params"]
    env = subprocess_env(KDPIPE_TIMING=str(timing))
    ok = subprocess.run([*cmd, str(good)], cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "prepare: digits" in ok.stderr and (workdir / "data/prepared/dataset.pt").is_file()
    row = json.loads(timing.read_text())
    assert row["stage"] == "prepare" and row["work_s"] > 0
    bad = write_params(workdir / "bad.yaml", tiny_params(workdir, data__val_fraction=2))
    failed = subprocess.run([*cmd, str(bad)], cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2 and failed.stderr.strip().startswith("kdpipe prepare: error: data.val_fraction")


def test_training_stages_log_their_precision_and_scoring_stages_fp32(tiny_pipeline):
    """The precision a stage ran is its `precision` tag; evaluate and export score the saved fp32 weights."""
    import mlflow

    client = mlflow.MlflowClient(tiny_pipeline.cfg.tracking.uri)
    tags = {stage: client.get_run(run_id).data.tags for stage, run_id in tiny_pipeline.run_ids.items()}
    trained = resolve_precision("auto", CPU)
    assert [tags[s]["precision"] for s in ("teacher", "scratch", "distill")] == [trained] * 3
    assert tags["evaluate"]["precision"] == tags["export"]["precision"] == "fp32"
    assert tags["distill"]["channels_last"] == "True"
