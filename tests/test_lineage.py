"""Lineage a person can follow in MLflow, on the session's tiny pipeline: the export run names the teacher,
scratch and distill runs it shipped from (and they exist); every training run has the prepared data as a dataset
input with its digest and its checkpoints as artifacts; git_dirty ignores what the pipeline writes; the
registered models say what they are and how to serve them, each version names its commit and runs; int8 says
whether it is slower than fp32, with both latencies."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest

from kdpipe import tracking
from kdpipe.ship.registrations import Release, int8_entry
from kdpipe.ship.shipping import Latency, OnnxResult, Shipment

STUDENT = "kdpipe-student"


@pytest.fixture
def store(tiny_pipeline):
    uri = tiny_pipeline.cfg.tracking.uri
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_the_export_run_names_the_runs_it_shipped_from(tiny_pipeline, store):
    export_run = store.get_run(tiny_pipeline.run_ids["export"])
    lineage = export_run.data.tags
    for stage in ("teacher", "scratch", "distill"):
        run_id = lineage[f"{stage}_run"]
        assert run_id == tiny_pipeline.run_ids[stage]  # the very run that wrote the checkpoint shipped
        assert store.get_run(run_id).info.run_name == stage
    assert export_run.data.tags["export_run"] == export_run.info.run_id


def test_training_runs_have_the_dataset_input_and_their_checkpoints(tiny_pipeline, store):
    digest = tiny_pipeline.results["export"]["dataset_digest"]  # the prepared data's digest
    for stage in ("teacher", "scratch", "distill"):
        run = store.get_run(tiny_pipeline.run_ids[stage])
        [dataset_input] = run.inputs.dataset_inputs
        tags = {t.key: t.value for t in dataset_input.tags}
        assert dataset_input.dataset.digest == digest[:36] and tags["dataset_digest"] == digest
        assert tags["mlflow.data.context"] == "training" and dataset_input.dataset.name == "digits-prepared"
        logged = {Path(a.path).name for a in store.list_artifacts(run.info.run_id, "checkpoints")}
        expected = {"teacher.pt"} if stage == "teacher" else {f"seed{s}.pt" for s in tiny_pipeline.cfg.student.seeds}
        assert logged == expected


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


def test_git_dirty_ignores_what_the_pipeline_writes(tmp_path):
    """A committed checkout whose dvc.lock, metrics, models and reports the pipeline then rewrote is clean; an
    edited source file is not."""
    git(tmp_path, "init", "-q")
    files = ["kdpipe.py", "dvc.lock", "metrics/export.json", "models/.gitignore", "reports/export/report.md",
             "plots/teacher.csv"]
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("before\n")
    git(tmp_path, "add", "-A")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t.invalid", "commit", "-qm", "init")
    assert tracking.git_facts(tmp_path)["git_dirty"] == "false"
    for name in files[1:]:  # what `make run` rewrites
        (tmp_path / name).write_text("after\n")
    assert tracking.git_facts(tmp_path)["git_dirty"] == "false"
    (tmp_path / "kdpipe.py").write_text("edited\n")
    assert tracking.git_facts(tmp_path)["git_dirty"] == "true"


def test_registered_model_says_what_it_is_and_how_to_serve_it(tiny_pipeline, store):
    model = store.get_registered_model(STUDENT)
    assert "digits" in model.description and "10 classes" in model.description
    assert f"mlflow models serve -m models:/{STUDENT}@champion --env-manager local" in model.description
    assert "evaluate.md" in model.description and "/invocations" in model.description
    assert model.tags["dataset"] == "digits" and model.tags["input_size"] == "1x8x8"
    assert model.tags["classes"] == '["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]'
    version = store.get_model_version(STUDENT, tiny_pipeline.results["export"]["registered_version"])
    lineage = store.get_run(tiny_pipeline.run_ids["export"]).data.tags
    assert f"git commit {version.tags['git_commit']}" in version.description
    for key in ("export_run", "distill_run", "dvc_lock_sha256"):
        assert lineage[key] in version.description and version.tags[key] == lineage[key]
    assert store.get_registered_model(f"{STUDENT}-int8").description


def test_int8_version_says_whether_it_is_slower_with_both_latencies(tiny_pipeline, store):
    metrics = tiny_pipeline.results["export"]
    tags = store.get_model_version(f"{STUDENT}-int8", metrics["int8_registered_version"]).tags
    slower = float(tags["latency_ms_b1"]) > float(tags["fp32_latency_ms_b1"])
    assert tags["int8_slower_than_fp32"] == str(slower).lower() == str(metrics["int8_slower_than_fp32"]).lower()


def test_a_slower_int8_is_tagged_and_described_as_slower(tiny_pipeline, tmp_path):
    onnx = tmp_path / "m.onnx"

    def result(b1: float) -> OnnxResult:
        return OnnxResult(onnx, 100, Latency(b1, 10 * b1), accuracy=0.9, params_hash="h", val_accuracy=0.9)

    shipment = Shipment(result(1.0), result(0.5), result(0.5), result(5.2))  # int8 5.2 ms, fp32 0.5 ms
    models = SimpleNamespace(student=SimpleNamespace(name="tiny_cnn"), teacher=SimpleNamespace(name="small_cnn"),
                             seed=0)
    entry = int8_entry(Release(tiny_pipeline.cfg, "d", "c0ffee", models, shipment), "1")
    assert entry.tags["int8_slower_than_fp32"] == "true"
    assert entry.tags["latency_ms_b1"] == "5.2000" and entry.tags["fp32_latency_ms_b1"] == "0.5000"
    assert "SLOWER than fp32 at batch 1 (5.200 ms vs 0.500 ms)" in entry.description
    fast = int8_entry(Release(tiny_pipeline.cfg, "d", "c0ffee", models, Shipment(*[result(1.0)] * 3, result(0.4))), "1")
    assert fast.tags["int8_slower_than_fp32"] == "false" and "SLOWER" not in fast.description
