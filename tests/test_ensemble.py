"""Teacher ensembles (teacher.ensemble: N): N teachers trained with seeds seed..seed+N−1, their averaged logits
feeding distillation, the cached outputs and the curriculum, and every member plus the ensemble in the report."""

from __future__ import annotations

import json

import pytest
import torch

from kdpipe import config
from kdpipe.data.prepared import load_prepared
from kdpipe.models.zoo import Ensemble, build_model
from kdpipe.paths import Paths
from kdpipe.run.runtime import Runtime
from kdpipe.stages import distill, evaluate, scratch, teacher
from kdpipe.train.distiller import Distiller
from kdpipe.train.inference import predict

CPU = torch.device("cpu")


def test_ensemble_averages_its_members_logits():
    members = [build_model("tiny_cnn", 1, 10).eval() for _ in range(3)]
    x = torch.rand(5, 1, 8, 8)
    expected = sum(m(x) for m in members) / 3
    assert torch.allclose(Ensemble(members).eval()(x), expected, atol=1e-6)
    assert Ensemble(members).name == "ensemble of 3 tiny_cnn"


@pytest.mark.parametrize(("section", "message"), [
    ({"teacher": {"ensemble": 2, "source": "checkpoint", "checkpoint": "t.pt"}}, "teacher.ensemble: an ensemble of seeds"),
    ({"teacher": {"ensemble": 2}, "distill": {"method": "fitnet"}}, "distill.method: fitnet needs one teacher's"),
    ({"teacher": {"ensemble": 0}}, "teacher.ensemble"),
])
def test_impossible_ensembles_are_one_line_errors(section, message):
    with pytest.raises(config.ConfigError, match=message):
        config.from_dict(section)


@pytest.mark.slow
def test_ensemble_of_two_teaches_distill_and_shows_in_the_report(tiny_pipeline, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = tiny_pipeline.workspace(tmp_path, teacher__ensemble=2)
    params["student"].update(seeds=[0])
    cfg = config.from_dict(params)
    metrics = teacher.run(cfg)
    ensemble = metrics["ensemble"]
    assert ensemble["size"] == 2 and [m["seed"] for m in ensemble["members"]] == [cfg.seed, cfg.seed + 1]
    assert ensemble["members"][0]["test_accuracy"] == metrics["test_accuracy"]  # member 0 is "the teacher"
    ckpt = torch.load(tmp_path / "models/teacher.pt", weights_only=True)
    [other] = ckpt["ensemble"]
    assert other["seed"] == cfg.seed + 1 and not torch.equal(other["state_dict"]["body.fc.weight"],
                                                             ckpt["state_dict"]["body.fc.weight"])

    # The cached logits over train are the ensemble's: the mean of both members' logits.
    paths = Paths(cfg.paths)
    prepared = load_prepared(paths.dataset)
    rt = Runtime(CPU)
    distiller = Distiller.load(cfg, paths, prepared, rt)
    assert isinstance(distiller.teacher, Ensemble) and len(distiller.teacher.members) == 2
    cached = torch.load(paths.teacher_outputs, weights_only=True)["train_logits"]
    live = predict(distiller.teacher, prepared["train_x"], rt)  # fp32 here; the stage computed in bf16 (auto)
    first = predict(distiller.teacher.members[0], prepared["train_x"], rt)
    assert (cached - live).abs().max() < 0.1 < (cached - first).abs().max()

    distill.run(cfg)
    scratch.run(cfg)
    result = evaluate.run(cfg)
    assert result["teacher ensemble"]["model"] == "ensemble of 2 small_cnn"
    assert [s["seed"] for s in result["teacher members"]["per_seed"]] == [cfg.seed, cfg.seed + 1]
    report = (tmp_path / "reports/evaluate/evaluate.md").read_text()
    assert "| teacher ensemble | ensemble of 2 small_cnn |" in report and "| teacher members |" in report
    assert json.loads((tmp_path / "metrics/teacher.json").read_text())["ensemble"]["size"] == 2
