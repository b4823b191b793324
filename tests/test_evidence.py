"""The evidence (kdpipe/evidence.py, kdpipe/report/findings.py) recomputed by independent routes: the paired
bootstrap against the normal approximation and scipy's own paired bootstrap, McNemar against
scipy.stats.binomtest, ECE/NLL/Brier against scikit-learn, the temperature against the one that made the data;
and the verdict on models that are the same, clearly better, or clearly worse."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, log_loss

from kdpipe import evidence as E
from kdpipe.report import findings as F


def paired(n: int, a_rate: float, b_rate: float, seed: int, rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Correctness of two models on the same n images: b right where a is, plus fewer (a ⊇ b)."""
    rng = np.random.default_rng(seed)
    u = rng.random(n if rows is None else (rows, n))
    return (u < a_rate).astype(np.int8), (u < b_rate).astype(np.int8)


# ---------------------------------------------------------------------------------------------------------
# Paired bootstrap


def test_a_known_difference_is_covered_and_matches_the_normal_approximation():
    a, b = paired(4000, 0.92, 0.88, seed=1)
    found = E.paired_bootstrap(a, b, samples=20_000, seed=3)
    d = (a - b).astype(float)
    assert found["difference"] == pytest.approx(d.mean())
    half = 1.959964 * d.std(ddof=1) / math.sqrt(len(d))  # by hand: mean ± z·s/√n
    assert found["low"] == pytest.approx(d.mean() - half, abs=0.002)
    assert found["high"] == pytest.approx(d.mean() + half, abs=0.002)
    assert found["low"] < 0.04 < found["high"]  # the true difference of the population


def test_one_level_matches_scipys_paired_bootstrap():
    a, b = paired(1500, 0.9, 0.86, seed=2)
    ours = E.paired_bootstrap(a, b, samples=20_000, seed=0)
    theirs = stats.bootstrap((a.astype(float), b.astype(float)), lambda x, y: np.mean(x - y), paired=True,
                             vectorized=False, n_resamples=20_000, method="percentile", random_state=0)
    assert ours["low"] == pytest.approx(theirs.confidence_interval.low, abs=0.002)
    assert ours["high"] == pytest.approx(theirs.confidence_interval.high, abs=0.002)


def test_the_same_inputs_give_the_same_interval_bit_for_bit():
    a, b = paired(800, 0.9, 0.85, seed=4, rows=3)
    first, second = (E.paired_bootstrap(a, b, samples=5000, seed=7) for _ in range(2))
    assert first == second
    assert E.paired_bootstrap(a, b, samples=5000, seed=8) != first  # the seed is what fixes the draws


def test_two_levels_put_the_seed_spread_inside_the_interval():
    """Three seeds that disagree (+6, 0, −2 points): resampling seeds widens the interval over resampling images
    alone, which would claim a precision the seeds do not have."""
    rng = np.random.default_rng(5)
    base = (rng.random(3000) < 0.85).astype(np.int8)
    gains = [0.06, 0.0, -0.02]
    a = np.stack([np.clip(base + (rng.random(3000) < max(g, 0)) - (rng.random(3000) < max(-g, 0)), 0, 1)
                  for g in gains]).astype(np.int8)
    b = np.stack([base] * 3)
    two_level = E.paired_bootstrap(a, b, samples=5000)
    images_only = E.paired_bootstrap(a.reshape(1, -1), b.reshape(1, -1), samples=5000)
    assert two_level["high"] - two_level["low"] > 2 * (images_only["high"] - images_only["low"])
    assert two_level["seeds"] == 3 and two_level["images"] == 3000


def test_a_model_trained_once_stands_beside_every_seed():
    a, _ = paired(500, 0.9, 0.0, seed=6, rows=3)
    teacher = np.ones(500, dtype=np.int8)
    found = E.paired_bootstrap(a, teacher, samples=2000)
    assert found["difference"] == pytest.approx(a.mean() - 1.0) and found["high"] < 0


def test_gap_recovered_interval_covers_its_value():
    rng = np.random.default_rng(9)
    u = rng.random((3, 2000))
    teacher, scratch, distilled = (u[0] < 0.97).astype(int), (u < 0.90).astype(int), (u < 0.94).astype(int)
    gap = E.gap_recovered_interval(teacher, scratch, distilled, samples=4000)
    by_hand = (distilled.mean() - scratch.mean()) / (teacher.mean() - scratch.mean())
    assert gap["value"] == pytest.approx(by_hand) and gap["low"] < by_hand < gap["high"]


# ---------------------------------------------------------------------------------------------------------
# McNemar


@pytest.mark.parametrize("k,n", [(0, 0), (0, 1), (1, 1), (3, 10), (5, 10), (7, 10), (1, 30), (140, 300),
                                 (1400, 3000), (60, 61)])
def test_exact_mcnemar_matches_scipy_binomtest(k, n):
    expected = 1.0 if n == 0 else stats.binomtest(k, n, 0.5).pvalue
    assert E.binomial_two_sided_p(k, n) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_mcnemar_counts_the_discordant_images():
    a = np.array([1, 1, 1, 0, 0, 1, 1])
    b = np.array([1, 0, 0, 1, 0, 1, 0])
    found = E.mcnemar(a, b)
    assert (found["a_only"], found["b_only"]) == (3, 1)
    assert found["p"] == pytest.approx(stats.binomtest(3, 4, 0.5).pvalue)


# ---------------------------------------------------------------------------------------------------------
# Calibration and fidelity


def random_logits(n: int, k: int, seed: int, scale: float = 2.0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, k)) * scale
    labels = np.array([rng.choice(k, p=np.exp(row) / np.exp(row).sum()) for row in logits])
    return logits, labels


def test_ece_nll_and_brier_match_scikit_learn():
    logits, labels = random_logits(3000, 5, seed=1)
    ours = E.calibration(logits * 1.7, labels, bins=15)  # overconfident: ECE clearly above 0
    probs = np.exp(E.log_softmax(logits * 1.7))
    confidence, hit = probs.max(1), (probs.argmax(1) == labels).astype(int)
    accuracy, mean_conf = calibration_curve(hit, confidence, n_bins=15, strategy="uniform")
    counts = np.histogram(confidence, bins=np.linspace(0, 1, 16))[0]
    expected = np.sum(counts[counts > 0] * np.abs(accuracy - mean_conf)) / len(labels)
    assert ours["ece"] == pytest.approx(expected, abs=1e-12) and ours["ece"] > 0.05
    assert ours["nll"] == pytest.approx(log_loss(labels, probs, labels=range(5)), rel=1e-9)
    assert ours["brier"] == pytest.approx(brier_score_loss(labels, probs, labels=range(5)), rel=1e-9)
    assert sum(b["count"] for b in ours["bins"]) == len(labels)


def test_the_fitted_temperature_is_the_one_that_made_the_labels():
    logits, labels = random_logits(20_000, 10, seed=2)  # labels drawn from softmax(logits): T = 1 calibrates
    assert E.fit_temperature(logits * 2.0, labels) == pytest.approx(2.0, rel=0.05)
    assert E.fit_temperature(logits * 0.5, labels) == pytest.approx(0.5, rel=0.05)


def test_fidelity_by_hand():
    teacher = np.log(np.array([[0.5, 0.5], [0.9, 0.1]]))
    student = np.log(np.array([[0.25, 0.75], [0.9, 0.1]]))
    found = E.fidelity(student, teacher)
    kl_first = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert found["kl"] == pytest.approx(kl_first / 2)
    assert found["agreement"] == pytest.approx(0.5)  # argmax ties go to class 0 for the teacher's first row
    assert E.fidelity(teacher, teacher) == {"agreement": 1.0, "kl": 0.0}


# ---------------------------------------------------------------------------------------------------------
# Verdicts


def predictions(scratch_rate: float, distilled_rate: float, same: bool = False, n: int = 2000, k: int = 4) -> dict:
    """A predictions.npz-shaped dict: teacher 97 %, three scratch and three distilled seeds with these accuracies
    (the same predictions for both when `same`: the distillation that changed nothing)."""
    rng = np.random.default_rng(11)
    labels = rng.integers(0, k, n)

    def logits_of(rate: float, rows: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        right = rng.random((rows, n)) < rate
        wrong = (labels + rng.integers(1, k, (rows, n))) % k
        chosen = np.where(right, labels, wrong)
        return (np.eye(k)[chosen] * 3 + rng.normal(0, 0.3, (rows, n, k))).astype(np.float32)

    scratch = logits_of(scratch_rate, 3, 1)
    out = {"test_labels": labels, "val_labels": labels[:500], "classes": np.array(["a", "b", "c", "d"]),
           "teacher_seeds": np.array([-1]), "scratch_seeds": np.array([0, 1, 2]), "distilled_seeds": np.array([0, 1, 2]),
           "test_logits_teacher": logits_of(0.97, 1, 3), "test_logits_scratch": scratch,
           "test_logits_distilled": scratch.copy() if same else logits_of(distilled_rate, 3, 2)}
    for name in ("teacher", "scratch", "distilled"):
        out[f"val_logits_{name}"] = out[f"test_logits_{name}"][:, :500]
    return out


def test_a_distillation_that_changed_nothing_is_no_evidence():
    found = F.evaluate_evidence(predictions(0.9, 0.9, same=True), shipped=1, samples=2000)
    assert found["verdict"] == "no evidence" and found["verdict_line"].startswith("no evidence")
    assert found["distilled_vs_scratch"]["pooled"]["low"] == found["distilled_vs_scratch"]["pooled"]["high"] == 0
    assert found["fidelity"]["scratch"] == found["fidelity"]["distilled"]


def test_equal_accuracies_with_other_mistakes_are_no_evidence_and_never_helped():
    for seed_shift in range(3):
        preds = predictions(0.9, 0.9)
        preds["test_logits_distilled"] = np.roll(preds["test_logits_distilled"], seed_shift, axis=0)
        found = F.evaluate_evidence(preds, shipped=0, samples=2000)
        assert found["verdict"] == "no evidence", found["verdict_line"]


def test_a_clearly_better_student_helped_and_a_clearly_worse_one_hurt():
    helped = F.evaluate_evidence(predictions(0.85, 0.93), shipped=2, samples=2000)
    assert helped["verdict"] == "helped" and helped["verdict_line"].startswith("distillation helped: +")
    assert "3 of 3 seeds better" in helped["verdict_line"] and "Shipped seed 2" in helped["verdict_line"]
    assert helped["gap_recovered"]["low"] > 0 and helped["per_class"]["fixed_most"]
    hurt = F.evaluate_evidence(predictions(0.93, 0.85), shipped=0, samples=2000)
    assert hurt["verdict"] == "hurt" and hurt["verdict_line"].startswith("distillation hurt: −")


# ---------------------------------------------------------------------------------------------------------
# The evaluate stage's outputs, and what a missing champion says


def test_evaluate_keeps_predictions_and_gives_the_same_evidence_twice(tiny_pipeline, tmp_path, monkeypatch):
    """The session's evaluate outputs: logits of every model in predictions.npz, the verdict on top of the report,
    in evaluate.json and last in the log; evaluate rerun on a copy writes the same bytes (seeded bootstrap)."""
    import json

    from conftest import rerun_params

    from kdpipe import config
    from kdpipe.stages import evaluate

    work, cfg = tiny_pipeline.work, tiny_pipeline.cfg
    preds = F.load_predictions(work / "models/predictions.npz")
    seeds = len(cfg.student.seeds)
    assert preds["test_logits_distilled"].shape == (seeds, len(preds["test_labels"]), len(preds["classes"]))
    assert preds["val_logits_teacher"].shape[:2] == (1, len(preds["val_labels"]))
    metrics = json.loads((work / "metrics/evaluate.json").read_text())
    assert metrics["verdict"] in ("helped", "no evidence", "hurt") and metrics["verdict_line"]
    assert metrics["evidence"] == F.evaluate_evidence(preds, metrics["shipped"]["seed"],
                                                      samples=cfg.evaluate.bootstrap_samples)
    report = (work / "reports/evaluate/evaluate.md").read_text().splitlines()
    assert report[2] == f"**Verdict:** {metrics['verdict_line']}"
    for name in ("teacher", "scratch", "distilled"):
        assert (work / f"reports/evaluate/reliability_{name}.png").stat().st_size > 0
        assert (work / f"reports/evaluate/reliability_{name}.csv").read_text().startswith("confidence,accuracy,count")
    params = rerun_params(work, tmp_path, monkeypatch, folders=("models", "plots"), ignore=("*.onnx", "predictions.npz"))
    again = evaluate.run(config.from_dict(params))
    assert (tmp_path / "models/predictions.npz").read_bytes() == (work / "models/predictions.npz").read_bytes()
    assert again["evidence"] == metrics["evidence"] and again["verdict_line"] == metrics["verdict_line"]


def test_no_champion_says_why_in_one_line_and_how_to_serve_the_candidate(tmp_path, capsys):
    import mlflow

    from kdpipe import cli, predict

    uri = f"sqlite:///{tmp_path / 'r.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("kdpipe-student")
    version = client.create_model_version("kdpipe-student", source=str(tmp_path), tags={
        "promotion_reason": "validation accuracy 0.9852 does not beat the scratch baseline's 0.9889"})
    client.set_registered_model_alias("kdpipe-student", "candidate", version.version)
    capsys.readouterr()  # the store's creation logs
    assert cli.main(["resolve", "models:/kdpipe-student@champion", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not beat the scratch baseline" in err
    assert "make serve ALIAS=candidate" in err and "v1 (candidate)" in err
    assert cli.main(["resolve", "models:/kdpipe-student@candidate", "--tracking-uri", uri]) == 0
    assert capsys.readouterr().out.strip() == "models:/kdpipe-student@candidate: kdpipe-student v1"
    with pytest.raises(predict.PredictError, match="models:/kdpipe-student@candidate names it"):
        predict.model_path("models:/kdpipe-student@champion", uri, tmp_path / "dl")


def test_the_end_of_make_run_says_whether_a_champion_was_crowned():
    from kdpipe.cli import outcome_line

    crowned = {"registry": {"student": {"version": "3", "champion": True, "reason": "no champion yet"}}}
    assert outcome_line(crowned, "kdpipe-student") == ("export: kdpipe-student v3 crowned champion (no champion yet); "
                                                       "make serve serves it")
    kept = {"registry": {"student": {"version": "4", "champion": False, "reason": "not better beyond noise"}}}
    assert "no new champion" in outcome_line(kept, "kdpipe-student")
    assert outcome_line(kept, "kdpipe-student").endswith("make serve ALIAS=candidate")


def test_temperature_scale_divides_the_shipped_logits_and_keeps_the_argmax(tiny_pipeline, tmp_path, monkeypatch):
    """export.temperature_scale: true exports the shipped seed with logits / T, T the one evaluate fitted on
    validation for that seed; the file says T in its metadata, and its predictions are the unscaled model's."""
    import json

    import onnxruntime
    from conftest import rerun_params

    from kdpipe import config
    from kdpipe.ship.onnx_export import read_metadata
    from kdpipe.stages import export

    work = tiny_pipeline.work
    export.run(config.from_dict(rerun_params(work, tmp_path, monkeypatch, int8=False, registry=False,
                                             temperature_scale=True)))
    evaluated = json.loads((work / "metrics/evaluate.json").read_text())
    row = evaluated["evidence"]["seeds"].index(evaluated["shipped"]["seed"])
    t = evaluated["evidence"]["calibration"]["distilled"]["per_seed"][row]["temperature"]
    assert float(read_metadata(tmp_path / "models/student.onnx")["temperature"]) == pytest.approx(t, rel=1e-5)
    x = np.random.default_rng(0).random((16, *evaluated_shape(work)), dtype=np.float32)

    def run(path):
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: x})[0]

    scaled, plain = run(tmp_path / "models/student.onnx"), run(work / "models/student.onnx")
    assert t != pytest.approx(1.0) and np.allclose(scaled, plain / t, atol=1e-4)
    assert (scaled.argmax(1) == plain.argmax(1)).all()


def evaluated_shape(work) -> tuple[int, int, int]:
    import json

    return tuple(json.loads((work / "data/prepared/meta.json").read_text())["image_shape"])


def test_a_seed_reads_as_helped_only_when_the_interval_and_mcnemar_agree():
    """Digits' shipped seed: 9 images only distilled got right, 2 only scratch; the percentile interval excludes
    0 (+0.28 to +3.90) but the exact test gives p = 0.065: no evidence, the stricter reading."""
    row = {"difference": 0.0195, "low": 0.0028, "high": 0.039, "confidence": 0.95,
           "mcnemar": {"a_only": 9, "b_only": 2, "p": stats.binomtest(9, 11, 0.5).pvalue}}
    assert E.direction(row) == "helped" and F.seed_direction(row) == "no evidence"
    row["mcnemar"]["p"] = 0.01
    assert F.seed_direction(row) == "helped"
