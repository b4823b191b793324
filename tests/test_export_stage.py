"""The export stage on a tiny digits run: the shipped seed (the evaluate stage's choice), ONNX files and their
metadata, parity that blocks registration, int8, the registry's candidate/champion gate, a teacher reused from
the registry, the report, and `kdpipe predict` without torch."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import mlflow
import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import SEEDS, rerun_params, subprocess_env, tiny_params, tiny_pipeline_params, write_params
from PIL import Image

from kdpipe import config
from kdpipe.data.prepared import load_prepared
from kdpipe.models.checkpoint import build_from_checkpoint
from kdpipe.ship import gate, registry
from kdpipe.stages import evaluate, export, teacher

STUDENT, TEACHER = "kdpipe-student", "kdpipe-teacher"
METRIC_KEYS = {"parity_max_abs_diff", "argmax_agreement", "student_latency_ms_b1", "student_latency_ms_b64",
               "teacher_latency_ms_b1", "teacher_latency_ms_b64", "latency_ratio_b1", "int8_accuracy",
               "int8_accuracy_drop", "int8_latency_ms_b1", "student_onnx_accuracy", "registered_version", "champion",
               "student_seed", "params"}


def export_params(work, **export_overrides) -> dict:
    """The shared tiny pipeline's params (conftest), with export.* overrides."""
    params = tiny_pipeline_params(work)
    params["export"].update(export_overrides)
    return params


@pytest.fixture
def done(tiny_pipeline):
    """The session's tiny pipeline (conftest): prepare → ... → export once, in-process, temp sqlite store."""
    return tiny_pipeline.work, tiny_pipeline.cfg, tiny_pipeline.results["export"]


def client(cfg) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=cfg.tracking.uri, registry_uri=cfg.tracking.uri)


def versions(cfg, name: str) -> list[str]:
    return sorted(str(v.version) for v in client(cfg).search_model_versions(f"name = '{name}'"))


def aliases(c: mlflow.MlflowClient, name: str) -> dict[str, str]:
    return {alias: str(version) for alias, version in c.get_registered_model(name).aliases.items()}


def test_metrics_report_and_files(done):
    work, cfg, metrics = done
    on_disk = json.loads((work / "metrics/export.json").read_text())
    assert METRIC_KEYS <= set(on_disk) and on_disk["registered_version"] == metrics["registered_version"]
    assert on_disk["parity_max_abs_diff"] <= cfg.export.parity_atol and on_disk["argmax_agreement"] >= 0.999
    assert on_disk["latency_ratio_b1"] == pytest.approx(on_disk["student_latency_ms_b1"] / on_disk["teacher_latency_ms_b1"])
    assert on_disk["params"]["export"]["opset"] == cfg.export.opset
    png = work / "reports/export/tradeoff.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (work / "reports/export/report.md").read_text()
    assert "(tradeoff.png)" in report and "| teacher |" in report and "champion" in report
    assert not list((work / "models").glob(".export-*"))  # the staging folder is gone
    assert not list(work.rglob(".*.tmp-*"))  # atomic writes leave no temp files


def test_onnx_files_carry_their_provenance(done):
    work, cfg, metrics = done
    prepared = load_prepared(work / "data/prepared/dataset.pt")
    for name, role in (("student.onnx", "student"), ("teacher.onnx", "teacher")):
        proto = onnx.load(work / "models" / name)
        onnx.checker.check_model(proto, full_check=True)
        assert {o.domain: o.version for o in proto.opset_import}[""] >= 17
        meta = {p.key: p.value for p in proto.metadata_props}
        assert json.loads(meta["classes"]) == prepared["classes"] and meta["input_size"] == "1x8x8"
        assert meta["role"] == role and meta["dataset_digest"] == prepared["digest"]
        assert re.fullmatch(r"[0-9a-f]{64}", meta["params_hash"]) and meta["git_commit"]
        assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    student_meta = {p.key: p.value for p in onnx.load(work / "models/student.onnx").metadata_props}
    assert student_meta["student_seed"] == str(metrics["student_seed"]) and student_meta["method"] == "kd"


def test_shipped_seed_is_chosen_on_validation_only(done):
    work, _, metrics = done
    per_seed = json.loads((work / "metrics/distill.json").read_text())["per_seed"]
    best = max(r["val_accuracy"] for r in per_seed)
    shipped = json.loads((work / "metrics/evaluate.json").read_text())["shipped"]
    # evaluate scores validation as the distill stage did, so its choice is the one distill.json implies
    assert shipped["val_accuracy"] == best and shipped["tied_seeds"] == [r["seed"] for r in per_seed
                                                                           if r["val_accuracy"] == best]
    assert metrics["student_seed"] == shipped["seed"] and metrics["seed_choice"] == shipped
    # The rule itself: only validation scores are inputs; ties go to the lower validation loss, then the lower seed.
    assert evaluate.choose_seed({0: {"accuracy": 0.9, "loss": 0.1}, 1: {"accuracy": 0.95, "loss": 0.9}}) == {
        "seed": 1, "rule": "best validation accuracy", "val_accuracy": 0.95, "tied_seeds": [1], "val_loss": {}}
    tied = {s: {"accuracy": 0.9, "loss": loss} for s, loss in ((0, 0.5), (1, 0.3), (2, 0.3))}
    assert evaluate.choose_seed(tied) == {
        "seed": 1, "rule": "best validation accuracy, tie broken by validation loss", "val_accuracy": 0.9,
        "tied_seeds": [0, 1, 2], "val_loss": {"0": 0.5, "1": 0.3, "2": 0.3}}


def test_export_ships_the_seed_evaluate_names(done, tmp_path, monkeypatch, capsys):
    """With evaluate.json naming the other seed, export ships that one (and the ONNX file is that checkpoint);
    an evaluate.json without a shipped seed is a user error (exit 2, one line) with nothing written."""
    work, _, metrics = done
    params = rerun_params(work, tmp_path, monkeypatch, registry=False, int8=False)
    evaluate_json = tmp_path / "metrics/evaluate.json"
    evaluated = json.loads(evaluate_json.read_text())
    [other] = [s for s in SEEDS if s != metrics["student_seed"]]
    evaluate_json.write_text(json.dumps({**evaluated, "shipped": {**evaluated["shipped"], "seed": other}}))
    shipped = export.run(config.from_dict(params))
    assert shipped["student_seed"] == other and shipped["seed_choice"]["seed"] == other
    meta = {p.key: p.value for p in onnx.load(tmp_path / "models/student.onnx").metadata_props}
    assert meta["student_seed"] == str(other)
    data = load_prepared(work / "data/prepared/dataset.pt")
    images = data["test_x"][:64].numpy().astype(np.float32) / 255
    model, _ = build_from_checkpoint(tmp_path / f"models/distill/seed{other}.pt")
    session = onnxruntime.InferenceSession(str(tmp_path / "models/student.onnx"), providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        np.testing.assert_allclose(session.run(None, {"images": images})[0],
                                   model.eval()(torch.from_numpy(images)).numpy(), atol=1e-4)
    del evaluated["shipped"]
    evaluate_json.write_text(json.dumps(evaluated))
    before = (tmp_path / "metrics/export.json").read_bytes()
    capsys.readouterr()
    assert export.main(["--params", str(write_params(tmp_path / "params.yaml", params))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "evaluate.json" in err[0] and "rerun the evaluate stage" in err[0], err
    assert (tmp_path / "metrics/export.json").read_bytes() == before


def test_plain_onnxruntime_matches_the_evaluate_stage(done):
    work, _, metrics = done
    data = load_prepared(work / "data/prepared/dataset.pt")
    session = onnxruntime.InferenceSession(str(work / "models/student.onnx"), providers=["CPUExecutionProvider"])
    images = data["test_x"].numpy().astype(np.float32) / 255  # (N, 1, 8, 8) in [0, 1]
    accuracy = float((session.run(None, {"images": images})[0].argmax(1) == data["test_y"].numpy()).mean())
    evaluated = json.loads((work / "metrics/evaluate.json").read_text())
    [row] = [r for r in evaluated["distilled"]["per_seed"] if r["seed"] == metrics["student_seed"]]
    assert accuracy == pytest.approx(row["test_accuracy"], abs=0.001)
    assert metrics["student_onnx_accuracy"] == pytest.approx(accuracy)


def test_int8_artifact_and_metrics(done):
    work, cfg, m = done
    assert (work / "models/int8/student.int8.onnx").stat().st_size < (work / "models/student.onnx").stat().st_size
    assert 0 <= m["int8_accuracy"] <= 1 and m["int8_latency_ms_b1"] > 0 and m["int8_latency_ms_b64"] > 0
    assert m["int8_accuracy_drop"] == pytest.approx(m["student_onnx_accuracy"] - m["int8_accuracy"])
    # Registered on the validation drop (export.int8_max_accuracy_drop), not the test drop above: the two fall on
    # the same side of the limit on some CPUs and not on others (CPU_PROFILE=avx2, issue 33).
    registered = m["int8_val_accuracy_drop"] <= cfg.export.int8_max_accuracy_drop
    assert m["int8_registrable"] == registered and (m["int8_registered_version"] is not None) == registered
    assert bool(versions(cfg, f"{STUDENT}-int8")) == registered


def test_champion_resolves_and_predicts_like_pytorch(done):
    work, cfg, metrics = done
    assert metrics["champion"] and metrics["teacher_champion"]
    version = client(cfg).get_model_version_by_alias(STUDENT, "champion")
    assert str(version.version) == metrics["registered_version"]
    tags = version.tags
    assert {"test_accuracy", "latency_ms_b1", "params_hash", "git_commit", "dataset_digest", "student_seed",
            "method"} <= set(tags)
    assert tags["student_seed"] == str(metrics["student_seed"]) and tags["method"] == "kd"
    assert "small_cnn" in version.description and "kd" in version.description  # teacher and method
    data = load_prepared(work / "data/prepared/dataset.pt")
    images = data["test_x"][:64].numpy().astype(np.float32) / 255
    model, _ = build_from_checkpoint(work / f"models/distill/seed{metrics['student_seed']}.pt")
    with torch.inference_mode():
        expected = model.eval()(torch.from_numpy(images)).argmax(1).numpy()
    mlflow.set_tracking_uri(cfg.tracking.uri)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{STUDENT}@champion").predict(images)["logits"]
    path = registry.download_onnx(f"models:/{STUDENT}@champion", cfg.tracking.uri, work / "downloaded")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    plain = session.run(None, {"images": images})[0]
    np.testing.assert_array_equal(pyfunc.argmax(1), expected)
    np.testing.assert_array_equal(plain.argmax(1), expected)
    teacher_version = client(cfg).get_model_version_by_alias(TEACHER, "champion")
    assert teacher_version.tags[registry.CHECKPOINT_TAG].endswith("/teacher.pt")


def test_gate_rule():
    """On validation accuracy (the first argument): the champion's val_accuracy tag is what is compared."""
    decide = gate.champion_decision
    champion = {"val_accuracy": "0.9", "test_accuracy": "0.5", "dataset_digest": "d1"}
    assert decide(0.8, "d1", None) == (True, "no champion yet")
    assert not decide(0.8, "d1", champion)[0]
    assert decide(0.9, "d1", champion)[0] and decide(0.95, "d1", champion)[0]
    assert decide(0.5, "d2", champion)[0]  # data changed: an old-data champion is not comparable
    assert not decide(0.99, "d1", champion, parity_passed=False)[0]
    assert decide(0.1, "d1", {"dataset_digest": "d1", "test_accuracy": "0.99"})[0]  # no val_accuracy: beatable
    assert not decide(float("nan"), "d1", None)[0]  # a version without val_accuracy is never crowned


def test_gate_moves_aliases_in_a_registry(tmp_path):
    """Versions with given tags in a temp store: worse → candidate only, better → champion, new data → champion."""
    c = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'r.db'}", registry_uri=f"sqlite:///{tmp_path / 'r.db'}")
    c.create_registered_model("m")

    def new(acc: float, digest: str = "d1") -> dict:
        v = c.create_model_version("m", source=str(tmp_path), tags={"val_accuracy": str(acc), "dataset_digest": digest})
        return gate.apply_gate(c, "m", v.version)

    assert new(0.90) == {"version": "1", "aliases": ["candidate", "champion"], "champion": True,
                         "previous_champion": None, "reason": "no champion yet",
                         "champion_evidence": None}
    worse = new(0.85)
    assert worse["aliases"] == ["candidate"] and not worse["champion"]
    assert str(c.get_model_version_by_alias("m", "champion").version) == "1"
    better = new(0.95)
    assert better["champion"] and better["previous_champion"] == "1"
    assert aliases(c, "m") == {"candidate": "3", "champion": "3"}
    assert new(0.50, digest="d2")["champion"]  # the data changed


@pytest.mark.slow
def test_stage_gate_end_to_end(done, tmp_path, monkeypatch):
    """Rerun the real stage against a fresh store: v1 takes champion; with v1's validation accuracy pretended perfect,
    v2 only becomes candidate; int8 off leaves no int8 file; registry off registers nothing."""
    work, _, _ = done
    params = rerun_params(work, tmp_path, monkeypatch)
    cfg = config.from_dict(params)
    first = export.run(cfg)
    assert first["registered_version"] == "1" and first["champion"]
    client(cfg).set_model_version_tag(STUDENT, "1", "val_accuracy", "1.0")
    cfg2 = config.from_dict({**params, "export": {**params["export"], "int8": False}})
    second = export.run(cfg2)
    assert second["registered_version"] == "2" and not second["champion"]
    assert aliases(client(cfg), STUDENT) == {"candidate": "2", "champion": "1"}
    assert second["int8_accuracy"] is None and not (tmp_path / "models/int8/student.int8.onnx").exists()
    assert "version 2: aliases candidate (" in (tmp_path / "reports/export/report.md").read_text()
    third = export.run(config.from_dict({**params, "export": {**params["export"], "registry": False}}))
    assert third["registered_version"] is None and not third["champion"]
    assert versions(cfg, STUDENT) == ["1", "2"]


def test_parity_failure_fails_the_stage_and_registers_nothing(done, monkeypatch, capsys):
    """The student's ONNX file is corrupted right after export (one weight shifted): the stage exits 1 with
    one line naming the model and the numbers; outputs and registry stay as they were; the run is FAILED."""
    import kdpipe.ship.onnx_export

    work, cfg, _ = done
    real_export = kdpipe.ship.onnx_export.export_onnx

    def corrupting_export(model, path, *args, **kwargs):
        path = real_export(model, path, *args, **kwargs)
        if path.name == "student.onnx":
            proto = onnx.load(path)
            weight = next(t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 4)
            array = onnx.numpy_helper.to_array(weight) + 0.5
            weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
            kdpipe.ship.onnx_export.save_checked(proto, path)
        return path

    monkeypatch.setattr(kdpipe.ship.onnx_export, "export_onnx", corrupting_export)
    before = {name: versions(cfg, name) for name in (STUDENT, TEACHER, f"{STUDENT}-int8")}
    files = {p: (work / p).read_bytes() for p in ("models/student.onnx", "metrics/export.json")}
    assert export.main(["--params", str(work / "params.yaml")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "parity failed for the student (student.onnx)" in err[0], err
    assert "max |Δlogit|" in err[0] and "argmax agreement" in err[0] and "nothing registered" in err[0]
    assert before == {name: versions(cfg, name) for name in before}
    assert files == {p: (work / p).read_bytes() for p in files}
    assert not list((work / "models").glob(".export-*"))
    mlflow.set_tracking_uri(cfg.tracking.uri)
    runs = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], filter_string="tags.stage = 'export'",
                              order_by=["start_time DESC"], output_format="list")
    assert runs[0].info.status == "FAILED" and runs[0].data.metrics["student/passed"] == 0


def test_teacher_from_registry_reuses_without_training(done, tmp_path, capsys):
    work, cfg, _ = done
    params = tiny_params(work, teacher__source="registry", teacher__registry_uri=f"models:/{TEACHER}@champion")
    for key in ("models", "metrics", "plots"):
        params["paths"][key] = str(tmp_path / key)
    reused = teacher.run(config.from_dict(params))
    original = json.loads((work / "metrics/teacher.json").read_text())
    assert reused["epochs_run"] == 0 and reused["source"] == "registry"
    assert reused["test_accuracy"] == pytest.approx(original["test_accuracy"])
    a = torch.load(work / "models/teacher.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "models/teacher.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert str(registry.resolve(f"models:/{TEACHER}/1", cfg.tracking.uri).version) == "1"  # version URIs too
    with pytest.raises(registry.RegistryError, match="not a registry URI"):
        registry.parse_uri(f"runs:/{TEACHER}")
    # A missing alias: one line naming the URI, exit 2, nothing written.
    params["teacher"]["registry_uri"] = f"models:/{TEACHER}@nope"
    for key in ("models", "metrics", "plots"):
        params["paths"][key] = str(tmp_path / "missing" / key)
    path = write_params(tmp_path / "p.yaml", params)
    capsys.readouterr()
    assert teacher.main(["--params", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"models:/{TEACHER}@nope" in err[0] and "not found" in err[0], err
    assert not (tmp_path / "missing").exists()


PREDICT = """
import sys
from kdpipe import cli
code = cli.main(sys.argv[1:])
assert "torch" not in sys.modules, "kdpipe predict imported torch"
sys.exit(code)
"""


def predict(work, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PREDICT, "predict", *args], cwd=work, capture_output=True, text=True,
                          env=subprocess_env(MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}"), timeout=120)


def parse(stdout: str) -> dict[str, list[tuple[str, float]]]:
    out, current = {}, None
    for line in stdout.splitlines():
        match = re.fullmatch(r"\s+\d+\. (\S+)\s+([0-9.]+)", line)
        if match:
            out[current].append((match[1], float(match[2])))
        else:
            current = line
            out[current] = []
    return out


@pytest.mark.slow
def test_predict_without_torch_from_a_file_and_from_the_registry(done, tmp_path):
    work, _, _ = done
    data = load_prepared(work / "data/prepared/dataset.pt")
    pngs = []
    for i in range(3):
        pngs.append(tmp_path / f"digit{i}.png")
        Image.fromarray(data["test_x"][i, 0].numpy(), mode="L").save(pngs[-1])  # 8×8, the model's own size
    Image.fromarray(data["test_x"][0, 0].numpy()).resize((32, 32)).convert("RGB").save(tmp_path / "big_rgb.png")
    session = onnxruntime.InferenceSession(str(work / "models/student.onnx"), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"images": data["test_x"][:3].numpy().astype(np.float32) / 255})[0].argmax(1)
    for model in (str(work / "models/student.onnx"), f"models:/{STUDENT}@champion"):
        result = predict(work, "--model", model, *map(str, pngs), str(tmp_path / "big_rgb.png"), "--top", "3")
        assert result.returncode == 0, result.stderr
        parsed = parse(result.stdout)
        assert len(parsed) == 4 and all(len(top) == 3 for top in parsed.values())
        for top in parsed.values():
            assert {name for name, _ in top} <= set(data["classes"])
            assert sum(p for _, p in top) <= 1 + 1e-6 and [p for _, p in top] == sorted((p for _, p in top), reverse=True)
        assert [parsed[str(p)][0][0] for p in pngs] == [data["classes"][k] for k in expected]
    bad = predict(work, "--model", str(work / "models/student.onnx"), str(tmp_path / "nope.png"))
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "nope.png: image not found" in bad.stderr
