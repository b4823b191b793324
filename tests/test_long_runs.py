"""Long runs: a diverging run stops with one line naming where, its MLflow run FAILED, nothing replaced."""

from __future__ import annotations

import mlflow
import pytest
import torch
from conftest import write_params

from kdpipe.config import StudentConfig
from kdpipe.data.batches import Split
from kdpipe.models.zoo import build_model
from kdpipe.run import runtime
from kdpipe.stages import teacher
from kdpipe.train.engine import fit
from kdpipe.train.guards import DivergedError


def _toy(n: int = 128) -> Split:
    g = torch.Generator().manual_seed(0)
    return Split(torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8), torch.randint(0, 10, (n,), generator=g))


def _exploding_after(step: int, value: float):
    """A cross-entropy loss that turns into `value` from the given step on (counted over the whole run)."""
    from kdpipe.distill import losses

    seen = []

    def loss_fn(model, x, y, idx):
        logits = model(x)
        seen.append(1)
        ce = losses.cross_entropy(logits, y)
        return logits, {"loss": ce * value if len(seen) >= step else ce, "ce": ce}

    return loss_fn


@pytest.mark.parametrize("value, epoch, step", [(float("nan"), 2, 3), (1e6, 1, 6)])
def test_a_non_finite_or_exploding_loss_stops_fit_naming_the_step(value, epoch, step):
    from kdpipe.train.objective import Objective

    cfg = StudentConfig(model="small_cnn", epochs=3, batch_size=16, lr=0.05, warmup_epochs=0, patience=0)
    run_step = (epoch - 1) * 8 + step  # 128 images / 16 = 8 steps an epoch
    with pytest.raises(DivergedError, match=rf"^distill seed 3: diverged at seed 3, epoch {epoch}, step {step}/8: "
                                            rf"loss (nan|[\d.]+e\+\d\d) \(ce [\d.]+\), over 100x its start"):
        fit(build_model("small_cnn", 1, 10), _toy(), _toy(32), cfg, runtime.setup(0, "cpu"), seed=3,
            desc="distill seed 3", objective=Objective(loss_fn=_exploding_after(run_step, value)))
    assert fit(build_model("small_cnn", 1, 10), _toy(), _toy(32), cfg, runtime.setup(0, "cpu"), seed=3).epochs_run == 3


def test_a_diverging_teacher_fails_in_one_line_and_keeps_the_previous_teacher(tiny_pipeline, tmp_path, monkeypatch,
                                                                              capsys):
    params = tiny_pipeline.workspace(tmp_path, teacher__lr=10.0, teacher__model="resnet20", teacher__epochs=3)
    uri = params["tracking"]["uri"]
    before = (tmp_path / "models/teacher.pt").read_bytes()  # the pipeline's teacher, copied there
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # tracking.uri above, not what a test left behind
    assert teacher.main(["--params", str(write_params(tmp_path / "params.yaml", params))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("kdpipe teacher: error: teacher: diverged at seed 0, epoch ") and "lower the lr (10)" in err[-1]
    assert (tmp_path / "models/teacher.pt").read_bytes() == before
    assert not (tmp_path / "metrics/teacher.json").exists()
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(params["tracking"]["experiment"]).experiment_id])
    assert [r.info.status for r in runs if r.data.tags.get("stage") == "teacher"] == ["FAILED"]


TIMING = ("train_seconds", "views_seconds", "seconds")


def _without_timing(obj):
    if isinstance(obj, dict):
        return {k: _without_timing(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [_without_timing(v) for v in obj]
    return obj


def _workspace(tiny_pipeline, root, **overrides):
    """tiny_pipeline.workspace(root), and its params written to root/params.yaml."""
    params = tiny_pipeline.workspace(root, **overrides)
    return params, write_params(root / "params.yaml", params)


def _kill_when(proc, state_file, ready, timeout=120.0):
    """SIGKILL `proc` once its resume file satisfies `ready(state)`; True if it was killed mid-run."""
    import time

    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            state = torch.load(state_file, weights_only=True)["state"]
        except (FileNotFoundError, EOFError, RuntimeError):
            state = None
        if state is not None and ready(state):
            proc.kill()
            proc.wait()
            return True
        time.sleep(0.02)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["distill", "teacher"])
def test_a_killed_stage_resumes_to_the_uninterrupted_result(stage, tiny_pipeline, tmp_path, capsys, monkeypatch):
    """SIGKILL mid-run (distill: inside seed 1, after seed 0 finished; teacher: after epoch 2), rerun: the same
    weights and metrics as a run never interrupted, and the log says where it resumed."""
    import importlib
    import json
    import subprocess
    import sys

    from conftest import subprocess_env

    from kdpipe import config

    overrides = dict(student__epochs=8, student__seeds=[0, 1], student__patience=0, teacher__epochs=8,
                     teacher__patience=0)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # each workspace logs to its own tracking.uri
    module = importlib.import_module(f"kdpipe.stages.{stage}")
    params, _ = _workspace(tiny_pipeline, tmp_path / "straight", **overrides)
    module.run(config.from_dict(params))

    params_b, path_b = _workspace(tiny_pipeline, tmp_path / "killed", **overrides)
    state_file = tmp_path / "killed/resume" / f"{stage}.pt"
    if stage == "distill":
        def ready(state):
            return bool(state["done"]) and state["current"] is not None and state["current"]["epoch"] >= 2
    else:
        def ready(state):
            return state["current"] is not None and state["current"]["epoch"] >= 2
    proc = subprocess.Popen([sys.executable, "-m", f"kdpipe.stages.{stage}", "--params", str(path_b)],
                            cwd=tmp_path / "killed", env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    assert _kill_when(proc, state_file, ready), "the stage finished before it could be killed"
    assert not (tmp_path / "killed/metrics" / f"{stage}.json").exists()

    capsys.readouterr()
    assert module.main(["--params", str(path_b)]) == 0
    resumed_line = [ln for ln in capsys.readouterr().err.splitlines() if "resumed at" in ln]
    where = "seed 1" if stage == "distill" else f"seed {params['seed']}"
    assert len(resumed_line) == 1 and resumed_line[0].startswith(f"{stage}: resumed at {where}, epoch ")
    assert not state_file.exists()  # removed once the outputs were written

    checkpoints = ["distill/seed0.pt", "distill/seed1.pt"] if stage == "distill" else ["teacher.pt"]
    for name in checkpoints:
        a = torch.load(tmp_path / "straight/models" / name, weights_only=True)
        b = torch.load(tmp_path / "killed/models" / name, weights_only=True)
        assert a["state_dict"].keys() == b["state_dict"].keys() and a["params"] == b["params"]
        assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"]), name
    straight = json.loads((tmp_path / "straight/metrics" / f"{stage}.json").read_text())
    killed = json.loads((tmp_path / "killed/metrics" / f"{stage}.json").read_text())
    assert _without_timing(straight) == _without_timing(killed)


def test_resume_state_of_other_params_is_dropped_and_said(tmp_path, capsys):
    from kdpipe.train.resume import Resume, run_key

    old = Resume.open("distill", tmp_path, run_key({"lr": 0.05}))
    old.save_epoch(0, {"epoch": 3})
    assert Resume.open("distill", tmp_path, run_key({"lr": 0.05})).current(0) == {"epoch": 3, "seed": 0}
    capsys.readouterr()
    fresh = Resume.open("distill", tmp_path, run_key({"lr": 0.1}))
    assert fresh.current(0) is None and fresh.state == {"done": [], "current": None}
    assert "was made by other params or data; starting fresh" in capsys.readouterr().err
    (tmp_path / "distill.pt").write_bytes(b"not a checkpoint")
    assert Resume.open("distill", tmp_path, run_key({"lr": 0.05})).current(0) is None
    assert "is unreadable" in capsys.readouterr().err


def test_gpu_tags_name_the_device_the_stage_ran_on(monkeypatch):
    """Faked two-GPU host, the stage on cuda:1: the tags describe GPU 1, not GPU 0."""
    from types import SimpleNamespace

    from kdpipe.run.runtime import Runtime, device_facts

    cards = {0: SimpleNamespace(name="GPU zero", total_memory=16 * 2**30, major=7, minor=0),
             1: SimpleNamespace(name="GPU one", total_memory=80 * 2**30, major=9, minor=0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: cards[index])
    monkeypatch.setattr(runtime, "nvidia_driver_version", lambda: "999.1")
    facts = device_facts(Runtime(torch.device("cuda:1"), "bf16"))
    assert {k: facts[k] for k in ("gpu_index", "gpu_name", "gpu_memory_gib", "gpu_compute_capability",
                                  "gpu_driver", "gpu_count", "precision")} == {
        "gpu_index": "1", "gpu_name": "GPU one", "gpu_memory_gib": "80.0", "gpu_compute_capability": "9.0",
        "gpu_driver": "999.1", "gpu_count": "2", "precision": "bf16"}
    assert "gpu_index" not in device_facts(Runtime(torch.device("cpu")))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (runs on a lent GPU machine)")
def test_a_stage_on_cuda_logs_gpu_tags_and_gpu_system_metrics(tiny_pipeline, tmp_path, monkeypatch):
    params, _ = _workspace(tiny_pipeline, tmp_path, teacher__epochs=4)
    params["tracking"]["system_metrics"] = True
    monkeypatch.setenv("KDPIPE_DEVICE", "cuda")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    from kdpipe import config

    teacher.run(config.from_dict(params))
    client = mlflow.MlflowClient(params["tracking"]["uri"])
    experiment = client.get_experiment_by_name(params["tracking"]["experiment"])
    run = client.search_runs([experiment.experiment_id])[0]
    tags = run.data.tags
    assert tags["device"].startswith("cuda") and tags["gpu_driver"] != "unknown"
    assert {"gpu_index", "gpu_name", "gpu_memory_gib", "gpu_compute_capability"} <= set(tags)
    assert any(key.startswith("system/gpu_0_utilization") for key in run.data.metrics), sorted(run.data.metrics)
