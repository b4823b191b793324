"""The text path through the training stages and DVC (issue 34): a JSON-lines text file, a BPE tokenizer trained on
its train split, a text_transformer teacher from scratch, a text_transformer student distilled with TinyBERT's
terms (hidden states through a projection, attention maps); prepare → evaluate run once in a fresh git + DVC copy
of the project, their outputs committed to dvc.lock, then `dvc status` says what a text param change touches: the
tokenizer's size reruns prepare and, once its ids change, everything after it; the student's width only scratch and
distill (evaluate and export follow their outputs). Export is not run here (tests/test_text_pipeline_ship.py ships
a text model); its stage is left out of the comparisons.
The BERT-teacher path (teacher.source: transformers, its own tokenizer, a text folder) runs end to end in
tests/test_text_pipeline_ship.py."""

from __future__ import annotations

import contextlib
import importlib
import json
import os

import pytest
import torch
import yaml
from conftest import dvc, sh
from projectcopy import copy_project
from text_fixtures import corpus, text_params, write_textfile

pytestmark = pytest.mark.slow
STAGES = ("prepare", "teacher", "scratch", "distill", "evaluate")


def stale(root) -> set[str]:
    from dvc.repo import Repo

    with contextlib.chdir(root), Repo(str(root)) as repo:
        return set(repo.status()) - {"export"}


def edit(root, section: str, key: str, value) -> None:
    path = root / "params.yaml"
    params = yaml.safe_load(path.read_text())
    target = params[section]
    for part in key.split(".")[:-1]:
        target = target[part]
    target[key.split(".")[-1]] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """(root, what each stage's run returned): the five stages run in-process in a git + DVC copy of the project,
    their outputs committed (`dvc commit`), so DVC sees them as a `dvc repro` would have left them."""
    from kdpipe import config

    root = copy_project(tmp_path_factory.mktemp("text_dvc") / "repo")
    defaults = yaml.safe_load((root / "params.yaml").read_text())
    params = text_params(root, data={"dataset": "textfile", "folder": None, "text": {
        "file": "data/raw/topics.jsonl", "tokenizer": "bpe", "vocab_size": 200, "max_length": 32}})
    params["paths"] = defaults["paths"]  # relative, as dvc.yaml reads them
    params["student"].update(model="text_transformer", text={"width": 16, "layers": 1, "heads": 2, "dropout": 0.0},
                             chance_guard=False)
    params["distill"]["method"] = "tinybert"
    write_textfile(root / "data/raw/topics.jsonl", corpus(40))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(["git", "init", "-q"], root)
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@kdpipe.invalid", "commit", "-qm", "init", "--allow-empty"], root)
    results = {}
    user_uri = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(root)
            cfg = config.load(root / "params.yaml")
            for stage in STAGES:
                results[stage] = importlib.import_module(f"kdpipe.stages.{stage}").run(cfg)
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        if user_uri is not None:
            os.environ["MLFLOW_TRACKING_URI"] = user_uri
    dvc("commit", "-f", "-q", *STAGES, cwd=root)
    return root, results


def test_prepare_trains_bpe_on_the_file_and_writes_the_text_layout(repo):
    root, results = repo
    meta = results["prepare"]
    assert meta["modality"] == "text" and meta["classes"] == ["food", "sport", "tech"]
    assert sum(meta["sizes"].values()) == 120 and meta["vocab_size"] <= 200
    tokenizer = json.loads((root / "data/prepared/tokenizer.json").read_text())
    assert tokenizer["model"]["type"] == "BPE" and tokenizer["truncation"]["max_length"] == 32
    assert tokenizer["padding"]["pad_id"] == meta["pad_id"]
    for split, n in meta["sizes"].items():
        assert (root / f"data/prepared/{split}_ids.npy").is_file() and (root / f"data/prepared/{split}_lengths.npy").is_file()
        assert len(json.loads((root / "data/prepared/meta.json").read_text())["class_counts"][split]) == 3 and n


def test_teacher_scratch_and_distill_train_text_models_and_evaluate_reports_them(repo):
    from kdpipe.models.checkpoint import build_from_checkpoint

    root, results = repo
    assert results["teacher"]["model"] == "text_transformer"
    assert results["distill"]["method"] == "tinybert" and results["distill"]["teacher_outputs"] == "live"
    assert results["scratch"]["num_parameters"] == results["distill"]["num_parameters"]  # the same student
    model, ckpt = build_from_checkpoint(root / "models/distill/seed0.pt")
    assert ckpt["text_args"]["width"] == 16 and model.name == "text_transformer"
    report = json.loads((root / "metrics/evaluate.json").read_text())
    assert {"teacher", "scratch", "distilled"} <= set(report) and report["verdict"]
    assert report["distilled"]["macs"] > 0 and report["distilled"]["latency_ms"] > 0
    assert (root / "reports/evaluate/confusion_distilled.csv").is_file()
    distill_curve = (root / "plots/distill.csv").read_text().splitlines()
    assert distill_curve[0].startswith("epoch") and len(distill_curve) == 3  # header + 2 epochs
    assert torch.load(root / "models/distill/seed0_alongside.pt", weights_only=True)["modules"]  # the projection


def test_the_committed_pipeline_is_up_to_date(repo):
    root, _ = repo
    assert stale(root) == set()


def test_a_tokenizer_size_change_reruns_prepare_and_then_everything_after_it(repo):
    root, _ = repo
    original, lock = (root / "params.yaml").read_text(), (root / "dvc.lock").read_text()
    try:
        edit(root, "data", "text.vocab_size", 120)
        assert stale(root) == {"prepare"}
        dvc("repro", "-s", "prepare", cwd=root)  # another vocabulary: other ids, so every later stage is stale
        assert stale(root) == {"teacher", "scratch", "distill", "evaluate"}
    finally:
        (root / "params.yaml").write_text(original)
        (root / "dvc.lock").write_text(lock)
        dvc("checkout", "-f", "prepare", cwd=root)
    assert stale(root) == set()


def test_a_student_width_change_reruns_from_scratch_on_not_prepare_or_teacher(repo):
    root, _ = repo
    original = (root / "params.yaml").read_text()
    try:
        edit(root, "student", "text.width", 32)
        assert stale(root) == {"scratch", "distill"}  # evaluate (and export) follow their changed outputs
    finally:
        (root / "params.yaml").write_text(original)
    assert stale(root) == set()
