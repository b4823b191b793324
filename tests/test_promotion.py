"""Promotion on validation accuracy, never test: the gate's rule (a better-on-test, worse-on-validation version
stays candidate; chance level and the scratch baseline as a floor), the reason as a version tag, and exports of
a `dvc exp run` (DVC_EXP_NAME set) that register candidates but leave champion where it was."""

from __future__ import annotations

import mlflow
import pytest
from conftest import rerun_params

from kdpipe import config
from kdpipe.ship import gate
from kdpipe.stages import export

STUDENT = "kdpipe-student"


def sqlite_client(tmp_path) -> mlflow.MlflowClient:
    uri = f"sqlite:///{tmp_path / 'r.db'}"
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def new_version(c, tmp_path, *, val: float, test: float, promote=(True, ""), **tags) -> dict:
    """A version of "m" with these accuracies and tags, through the real gate."""
    all_tags = {"val_accuracy": str(val), "test_accuracy": str(test), "dataset_digest": "d1", **tags}
    version = c.create_model_version("m", source=str(tmp_path), tags=all_tags)
    return gate.apply_gate(c, "m", version.version, promote=promote)


def test_validation_decides_and_test_never_does():
    champion = {"val_accuracy": "0.90", "test_accuracy": "0.80", "dataset_digest": "d1"}
    take, reason = gate.champion_decision(0.85, "d1", champion)  # say its test accuracy were 0.99: not an input
    assert not take and reason == "validation accuracy 0.8500 < champion's 0.9000"
    assert gate.champion_decision(0.91, "d1", champion)[0]
    assert gate.champion_decision(0.95, "d1", {"test_accuracy": "0.99", "dataset_digest": "d1"})[0]  # old champion


def test_better_on_test_worse_on_validation_stays_candidate_in_a_registry(tmp_path):
    c = sqlite_client(tmp_path)
    c.create_registered_model("m")
    first = new_version(c, tmp_path, val=0.90, test=0.80)
    second = new_version(c, tmp_path, val=0.85, test=0.99)
    assert first["champion"] and not second["champion"] and second["aliases"] == ["candidate"]
    assert str(c.get_model_version_by_alias("m", "champion").version) == "1"
    assert c.get_model_version("m", "2").tags[gate.REASON_TAG] == "validation accuracy 0.8500 < champion's 0.9000"
    assert c.get_model_version("m", "1").tags[gate.REASON_TAG] == "no champion yet"


def test_a_chance_level_version_is_never_crowned(tmp_path):
    assert gate.champion_decision(0.11, "d1", None, chance=0.10)[0] is False  # not even as the first version
    assert gate.champion_decision(0.11, "d2", {"val_accuracy": "0.9", "dataset_digest": "d1"}, chance=0.10)[0] is False
    c = sqlite_client(tmp_path)
    c.create_registered_model("m")
    at_chance = new_version(c, tmp_path, val=0.105, test=0.99, val_chance_accuracy="0.1")
    assert not at_chance["champion"] and "is at chance" in at_chance["reason"]
    assert {a: str(v) for a, v in c.get_registered_model("m").aliases.items()} == {"candidate": "1"}


def test_the_scratch_baseline_must_be_beaten():
    assert gate.champion_decision(0.80, "d1", None, baseline=0.80) == (
        False, "validation accuracy 0.8000 does not beat the scratch baseline's 0.8000")
    assert gate.champion_decision(0.81, "d1", None, baseline=0.80) == (True, "no champion yet")


def interval(difference: float, low: float, high: float) -> dict:
    return {"difference": difference, "low": low, "high": high, "confidence": 0.95, "images": 270}


def test_under_the_evidence_rule_losing_to_scratch_by_noise_is_no_defeat():
    """The fresh-clone case: 0.9852 against scratch's 0.9889 on 270 validation images, one image, inside the noise."""
    noise = interval(-0.0037, -0.0185, 0.0111)
    take, reason = gate.champion_decision(0.9852, "d1", None, baseline=0.9889, rule="evidence",
                                          baseline_evidence=noise)
    assert take and reason.startswith("no champion yet; against scratch") and "no difference beyond noise" in reason
    worse = interval(-0.05, -0.08, -0.02)
    take, reason = gate.champion_decision(0.93, "d1", None, baseline=0.98, rule="evidence", baseline_evidence=worse)
    assert not take and "below the scratch baseline's 0.9800 beyond noise" in reason
    assert not gate.champion_decision(0.9852, "d1", None, baseline=0.9889, rule="point", baseline_evidence=noise)[0]


def test_a_candidate_better_by_noise_only_keeps_the_champion_under_the_evidence_rule(tmp_path):
    champion = {"val_accuracy": "0.9000", "dataset_digest": "d1"}
    by_noise = interval(0.0037, -0.0074, 0.0148)
    assert not gate.champion_decision(0.9037, "d1", champion, rule="evidence", champion_evidence=by_noise)[0]
    assert gate.champion_decision(0.9037, "d1", champion, rule="point", champion_evidence=by_noise)[0]
    assert gate.champion_decision(0.95, "d1", champion, rule="evidence",
                                  champion_evidence=interval(0.05, 0.02, 0.08))[0]
    # Through the real gate: the comparison is asked for the current champion, written on the version
    c = sqlite_client(tmp_path)
    c.create_registered_model("m")
    new_version(c, tmp_path, val=0.90, test=0.90)
    asked = []
    version = c.create_model_version("m", source=str(tmp_path), tags={"val_accuracy": "0.9037", "dataset_digest": "d1"})
    result = gate.apply_gate(c, "m", version.version, rule="evidence",
                             compare=lambda champ: asked.append(str(champ.version)) or by_noise)
    assert asked == ["1"] and not result["champion"] and result["champion_evidence"] == by_noise
    tags = c.get_model_version("m", "2").tags
    assert tags["compared_with_champion"] == "1" and tags["champion_val_ci_low"] == "-0.007400"
    assert {a: str(v) for a, v in c.get_registered_model("m").aliases.items()} == {"champion": "1", "candidate": "2"}


def test_promotion_follows_the_param_and_dvc_experiments():
    assert gate.promotion("auto", {}) == (True, "export.promote: auto, not a DVC experiment")
    on, why = gate.promotion("auto", {"DVC_EXP_NAME": "warmer", "DVC_EXP_BASELINE_REV": "abc"})
    assert not on and "DVC_EXP_NAME=warmer" in why
    assert gate.promotion(True, {"DVC_EXP_NAME": "warmer"})[0] and not gate.promotion(False, {})[0]
    assert config.from_dict({"export": {"promote": False}}).export.promote is False
    with pytest.raises(config.ConfigError, match="export.promote"):
        config.from_dict({"export": {"promote": "sometimes"}})


def test_promotion_off_moves_candidate_only(tmp_path):
    c = sqlite_client(tmp_path)
    c.create_registered_model("m")
    new_version(c, tmp_path, val=0.80, test=0.80)
    off = new_version(c, tmp_path, val=0.95, test=0.95, promote=(False, "export.promote: false"))
    assert not off["champion"] and off["reason"].startswith("not promoted (export.promote: false)")
    assert {a: str(v) for a, v in c.get_registered_model("m").aliases.items()} == {"champion": "1", "candidate": "2"}


@pytest.mark.slow
def test_an_experiment_export_leaves_champion_where_it_was(tiny_pipeline, tmp_path, monkeypatch):
    """The real export stage three times on a copy of the tiny pipeline's outputs, in a fresh store: a plain run
    takes champion; the same export inside a `dvc exp run` (DVC's DVC_EXP_NAME) only takes candidate, saying why;
    with export.promote: true the experiment may crown it, but under the evidence rule the same model is no
    better than the champion beyond noise (the champion's ONNX is run on the same validation images: a difference
    of exactly 0), so it stays candidate with the comparison on its tags; the point rule crowns it (a tie: the
    newer wins)."""
    params = rerun_params(tiny_pipeline.work, tmp_path, monkeypatch, int8=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    cfg = config.from_dict(params)
    assert export.run(cfg)["champion"]
    monkeypatch.setenv("DVC_EXP_NAME", "warmer")
    second = export.run(cfg)
    c = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri, registry_uri=cfg.tracking.uri)
    aliases = {a: str(v) for a, v in c.get_registered_model(STUDENT).aliases.items()}
    assert not second["champion"] and aliases == {"champion": "1", "candidate": "2"}
    assert "DVC_EXP_NAME=warmer" in c.get_model_version(STUDENT, "2").tags[gate.REASON_TAG]
    forced = export.run(config.from_dict({**params, "export": {**params["export"], "promote": True}}))
    tags = c.get_model_version(STUDENT, "3").tags
    assert not forced["champion"] and "not better than the champion beyond noise" in tags[gate.REASON_TAG]
    assert tags["compared_with_champion"] == "1" and float(tags["champion_val_difference"]) == 0.0
    assert float(tags["champion_val_ci_low"]) == float(tags["champion_val_ci_high"]) == 0.0
    assert "Against champion v1 on the same validation split" in c.get_model_version(STUDENT, "3").description
    point = export.run(config.from_dict({**params, "export": {**params["export"], "promote": True,
                                                              "promote_rule": "point"}}))
    assert point["champion"] and str(c.get_model_version_by_alias(STUDENT, "champion").version) == "4"
