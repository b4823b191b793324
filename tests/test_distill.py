"""scratch, distill and evaluate on tiny digits runs: paired seeds, cached vs live teacher, curriculum,
every loss preset wired to real models, and the report's numbers checked against the models' outputs."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from conftest import SEEDS, tiny_params, write_params
from sklearn.metrics import f1_score

from kdpipe import cli, config
from kdpipe.data.prepared import load_prepared
from kdpipe.distill import curriculum
from kdpipe.distill.methods import PRESETS
from kdpipe.models.checkpoint import build_from_checkpoint
from kdpipe.models.zoo import build_model
from kdpipe.stages import distill, evaluate, scratch, teacher
from kdpipe.train import distiller as kd


@pytest.fixture
def done(tiny_pipeline):
    """The session's tiny pipeline (conftest): every stage once, in-process, two student seeds."""
    return tiny_pipeline.work, tiny_pipeline.cfg


def _test_accuracy(path, data) -> float:
    model, _ = build_from_checkpoint(path)
    model.eval()
    with torch.inference_mode():
        return (model(data["test_x"].float() / 255).argmax(1) == data["test_y"]).float().mean().item()


def test_evaluate_numbers_match_the_models(done):
    work, cfg = done
    data = load_prepared(work / "data/prepared/dataset.pt")
    report = json.loads((work / "metrics/evaluate.json").read_text())
    assert report["teacher"]["test_accuracy"] == pytest.approx(_test_accuracy(work / "models/teacher.pt", data))
    for label, stage in (("scratch", "scratch"), ("distilled", "distill")):
        per_seed = [_test_accuracy(work / f"models/{stage}/seed{s}.pt", data) for s in SEEDS]
        assert [r["test_accuracy"] for r in report[label]["per_seed"]] == pytest.approx(per_seed)
        assert report[label]["test_accuracy"] == pytest.approx(sum(per_seed) / len(per_seed))
        assert report[label]["test_accuracy_std"] == pytest.approx(statistics.stdev(per_seed), rel=1e-4)
    model, _ = build_from_checkpoint(work / "models/distill/seed0.pt")
    with torch.inference_mode():
        pred = model.eval()(data["test_x"].float() / 255).argmax(1)
    assert report["distilled"]["per_seed"][0]["macro_f1"] == pytest.approx(
        f1_score(data["test_y"], pred, average="macro"))
    t, s, d = (report[k]["test_accuracy"] for k in ("teacher", "scratch", "distilled"))
    assert report["gap_recovered"] == pytest.approx((d - s) / (t - s))
    assert "top5_accuracy" in report["teacher"]  # 10 classes


def test_report_and_plots_are_written(done):
    work, _ = done
    text = (work / "reports/evaluate/evaluate.md").read_text()
    assert "| teacher |" in text and "| scratch |" in text and "| distilled |" in text
    assert "Gap recovered" in text and "Classification report" in text
    for name in ("confusion_teacher.png", "confusion_scratch.png", "confusion_distilled.png", "curves_val_accuracy.png"):
        assert (work / "reports" / "evaluate" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert name in text
    for stage in ("scratch", "distill"):
        header = (work / f"plots/{stage}.csv").read_text().splitlines()[0]
        assert header.startswith("epoch,") and "val_accuracy" in header


def test_scratch_and_distill_share_the_recipe_and_seeds(done):
    work, _ = done
    s = json.loads((work / "metrics/scratch.json").read_text())
    d = json.loads((work / "metrics/distill.json").read_text())
    assert s["seeds"] == d["seeds"] == SEEDS
    assert s["params"]["student"] == d["params"]["student"]
    assert d["method"] == "kd" and d["weights"] == PRESETS["kd"]
    assert d["teacher_outputs"] == "live"  # the student augments (crop_padding 1): teacher runs per batch
    first = torch.load(work / "models/scratch/seed0.pt", weights_only=True)
    assert first["seed"] == 0 and first["params"]["student"]["model"] == "tiny_cnn"


class _Recorder(torch.nn.Module):
    """A stand-in teacher that records what it was shown."""

    def __init__(self, k: int = 10, fail: bool = False):
        super().__init__()
        self.k, self.fail, self.seen = k, fail, []

    def forward(self, x):
        if self.fail:
            raise AssertionError("the teacher must not run when its logits are cached")
        self.seen.append(x)
        return torch.zeros(len(x), self.k)


def test_cached_logits_mean_no_teacher_forward():
    cfg = config.DistillConfig()
    cached = torch.randn(20, 10)
    loss_fn = kd.distill_loss(cfg, _Recorder(fail=True), cached_logits=cached)
    student = build_model("tiny_cnn", 1, 10)
    idx = torch.tensor([3, 7, 11])
    logits, parts = loss_fn(student, torch.rand(3, 1, 8, 8), torch.tensor([1, 2, 3]), idx)
    assert torch.isfinite(parts["loss"]) and set(parts) == {"loss", "ce", "kd"}
    assert kd.can_use_cached_logits(config.StudentConfig(crop_padding=0, flip=False), PRESETS["kd"])
    assert not kd.can_use_cached_logits(config.StudentConfig(crop_padding=1), PRESETS["kd"])
    assert not kd.can_use_cached_logits(config.StudentConfig(crop_padding=0), PRESETS["fitnet"])


def test_live_teacher_sees_the_same_augmented_batch():
    teacher = _Recorder()
    loss_fn = kd.distill_loss(config.DistillConfig(), teacher)
    x = torch.rand(4, 1, 8, 8)
    loss_fn(build_model("tiny_cnn", 1, 10), x, torch.tensor([0, 1, 2, 3]), torch.arange(4))
    assert len(teacher.seen) == 1 and torch.equal(teacher.seen[0], x)


@pytest.mark.parametrize("method", ["kd", "seed", "mse", "fitnet", "at", "dkd"])
def test_every_preset_trains_a_real_student(method):
    cfg = config.DistillConfig(method=method)
    teacher = kd.freeze(build_model("small_cnn", 1, 10))
    student = build_model("tiny_cnn", 1, 10)
    adapter = kd.make_hint_adapter(student, teacher, cfg)
    loss_fn = kd.distill_loss(cfg, teacher, hint_adapter=adapter)
    _, parts = loss_fn(student, torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,)), torch.arange(6))
    parts["loss"].backward()
    assert set(parts) - {"loss"} == {k for k, w in PRESETS[method].items() if w > 0}
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())  # frozen


def test_curriculum_pool_grows_easy_to_hard():
    difficulty = torch.tensor([5.0, 0.1, 3.0, 0.2, 9.0, 1.0, 0.3, 2.0, 4.0, 0.05])
    cfg = config.CurriculumConfig(enabled=True, start_fraction=0.3, full_at=0.5)
    pool = curriculum.epoch_pools(cfg, difficulty, epochs=6, seed=0)
    assert pool(0).tolist() == [9, 1, 3]  # the three easiest
    assert len(pool(1)) > 3 and len(pool(3)) == 10 and len(pool(5)) == 10


@pytest.mark.slow
def test_distill_with_curriculum_fitnet_two_phase_and_a_brought_teacher(done, tmp_path, monkeypatch):
    """A teacher brought as a checkpoint (no retraining) feeds distill and evaluate; FitNets' hint phase
    runs first; the curriculum's growing pools show in the curves."""
    work, cfg = done
    brought = tmp_path / "brought.pt"
    brought.write_bytes((work / "models/teacher.pt").read_bytes())
    params = tiny_params(tmp_path)
    params["paths"]["prepared"] = str(work / "data/prepared")
    params["teacher"].update(source="checkpoint", checkpoint=str(brought))
    params["student"].update(model="tiny_cnn", seeds=[0], epochs=4)
    params["distill"].update(method="fitnet", hint_epochs=1)
    params["curriculum"].update(enabled=True, start_fraction=0.25, full_at=0.75)
    cfg2 = config.from_dict(params)
    monkeypatch.chdir(tmp_path)
    t = teacher.run(cfg2)
    assert t["epochs_run"] == 0 and t["source"] == "checkpoint"
    distill.run(cfg2)
    scratch.run(cfg2)
    result = evaluate.run(cfg2)
    curves = (tmp_path / "plots/distill.csv").read_text().splitlines()
    samples_col = curves[0].split(",").index("train_samples")
    samples = [float(line.split(",")[samples_col]) for line in curves[1:]]
    assert samples == sorted(samples) and samples[0] < samples[-1]
    assert result["distilled"]["per_seed"][0]["seed"] == 0


def test_bad_distill_params_are_one_line_errors(workdir, capsys):
    for mutate, expected in [
        (lambda p: p["distill"].update(weights={"kd": -0.5}), "distill.weights.kd: weight must be ≥ 0, got -0.5"),
        (lambda p: p["distill"].update(method="ce", weights={"ce": 0}), "distill.weights: all loss weights are zero"),
        (lambda p: p["distill"].update(temperature=0), "distill.temperature: must be > 0, got 0"),
        (lambda p: p["distill"].update(weights={"foo": 1}), "distill.weights: unknown loss term 'foo'"),
        (lambda p: p["curriculum"].update(ordering="sideways"), "curriculum.ordering: must be one of"),
        (lambda p: p["student"].update(seeds=[1, 1]), "student.seeds: must be distinct"),
    ]:
        params = tiny_params(workdir)
        mutate(params)
        path = write_params(workdir / "bad.yaml", params)
        assert distill.main(["--params", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err


def test_list_losses(capsys):
    assert cli.main(["list", "losses"]) == 0
    out = capsys.readouterr().out
    for name in ("ce", "kd", "mse", "hint", "at", "dkd", "seed", "fitnet"):
        assert name in out
    assert "Hinton" in out and "Romero" in out and "Zhao" in out
