"""prepare and teacher stages end to end on digits (the session's tiny pipeline), and what they log to MLflow."""

from __future__ import annotations

import json

import mlflow
import pytest
import torch
from conftest import dvc_stage_names, tiny_params, write_params

from kdpipe import config
from kdpipe.data.prepared import load_prepared
from kdpipe.models.zoo import build_model
from kdpipe.stages import teacher


@pytest.fixture
def pipeline(tiny_pipeline):
    """The session's tiny pipeline as these tests read it: workspace, config, prepare's meta, teacher's metrics."""
    p = tiny_pipeline
    return p.work, p.cfg, p.results["prepare"], p.results["teacher"]


def test_prepare_outputs(pipeline):
    work, cfg, meta, _ = pipeline
    data = load_prepared(work / "data/prepared/dataset.pt")
    assert data["train_x"].dtype == torch.uint8 and data["train_x"].shape[1:] == (1, 8, 8)
    on_disk = json.loads((work / "data/prepared/meta.json").read_text())
    assert on_disk == meta
    assert sum(meta["sizes"].values()) == 1797
    assert meta["sizes"] == {s: sum(meta["class_counts"][s]) for s in ("train", "val", "test")}
    assert meta["params"]["data"]["dataset"] == "digits" and len(meta["digest"]) == 64


def test_teacher_outputs_and_checkpoint(pipeline):
    work, cfg, _, metrics = pipeline
    on_disk = json.loads((work / "metrics/teacher.json").read_text())
    assert on_disk["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert 0 <= on_disk["val_accuracy"] <= 1 and 0 <= on_disk["test_accuracy"] <= 1
    assert on_disk["epochs_run"] == 2 and on_disk["params"]["teacher"]["epochs"] == 2
    ckpt = torch.load(work / "models/teacher.pt", weights_only=True)  # loadable without pickle
    assert ckpt["params"]["teacher"]["model"] == "small_cnn" and ckpt["classes"] == [str(i) for i in range(10)]
    model = build_model(ckpt["model"], ckpt["in_channels"], ckpt["num_classes"], ckpt["mean"], ckpt["std"])
    model.load_state_dict(ckpt["state_dict"])
    data = load_prepared(work / "data/prepared/dataset.pt")
    model.eval()
    with torch.inference_mode():
        acc = (model(data["test_x"].float() / 255).argmax(1) == data["test_y"]).float().mean().item()
    assert acc == pytest.approx(on_disk["test_accuracy"], abs=1e-6)
    curves = (work / "plots/teacher.csv").read_text().splitlines()
    assert curves[0].startswith("epoch,") and len(curves) == 3
    assert not list(work.rglob(".*.tmp-*"))  # atomic writes leave no temp files


def test_mlflow_runs_have_params_curves_tags_and_device_facts(tiny_pipeline, pipeline):
    work, cfg, meta, _ = pipeline
    assert set(tiny_pipeline.run_ids) == set(dvc_stage_names())  # one run per stage, named after it
    mlflow.set_tracking_uri(cfg.tracking.uri)
    by_name = {name: mlflow.get_run(run_id) for name, run_id in tiny_pipeline.run_ids.items()}
    run = by_name["teacher"]
    assert run.info.status == "FINISHED"
    assert run.data.params["teacher.epochs"] == "2" and run.data.params["data.dataset"] == "digits"
    tags = run.data.tags
    assert tags["stage"] == "teacher" and tags["dataset_digest"] == meta["digest"]
    assert {"git_commit", "git_dirty", "torch_version", "cuda_version", "gpu_name", "gpu_count", "precision"} <= set(tags)
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.step for m in history] == [1, 2]
    assert "test_accuracy" in run.data.metrics
    assert {"resources/wall_seconds", "resources/cpu_seconds", "resources/peak_rss_mb"} <= set(run.data.metrics)
    assert by_name["prepare"].data.tags["dataset_digest"] == meta["digest"]


def test_teacher_from_checkpoint_reuses_without_training(tiny_pipeline, pipeline, tmp_path, monkeypatch):
    work, cfg, _, metrics = pipeline
    brought = tmp_path / "my_teacher.pt"
    brought.write_bytes((work / "models/teacher.pt").read_bytes())
    params = tiny_pipeline.params_with(teacher__source="checkpoint", teacher__checkpoint=str(brought))
    params["paths"]["metrics"] = str(tmp_path / "metrics")
    params["paths"]["models"] = str(tmp_path / "models")
    params["paths"]["plots"] = str(tmp_path / "plots")
    monkeypatch.chdir(work)
    reused = teacher.run(config.from_dict(params))
    assert reused["epochs_run"] == 0 and reused["source"] == "checkpoint"
    assert reused["test_accuracy"] == pytest.approx(metrics["test_accuracy"])


def test_bad_checkpoint_is_one_line_exit_2_outputs_untouched(tiny_pipeline, pipeline, tmp_path, monkeypatch, capsys):
    work, *_ = pipeline
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    params = tiny_pipeline.params_with(teacher__source="checkpoint", teacher__checkpoint=str(junk))
    path = write_params(tmp_path / "p.yaml", params)
    monkeypatch.chdir(work)
    before = (work / "models/teacher.pt").read_bytes(), (work / "metrics/teacher.json").read_bytes()
    assert teacher.main(["--params", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "junk.pt" in err[0] and "not a loadable torch checkpoint" in err[0]
    assert before == ((work / "models/teacher.pt").read_bytes(), (work / "metrics/teacher.json").read_bytes())


def test_missing_prepared_data_is_a_clear_error(workdir, capsys):
    path = write_params(workdir / "params.yaml", tiny_params(workdir))
    assert teacher.main(["--params", str(path)]) == 2
    assert "dataset.pt: not found; run the prepare stage first" in capsys.readouterr().err


@pytest.mark.slow
def test_stage_run_samples_system_metrics(workdir):
    """MLflow's sampler (CPU, memory; GPU when present) is switched on for every stage run."""
    import time

    from kdpipe import tracking

    cfg = config.from_dict(tiny_params(workdir))
    with tracking.stage_run("probe", cfg) as run:
        time.sleep(2.5)  # the sampler logs after its first 1 s interval
    metrics = mlflow.get_run(run.run_id).data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(metrics)
