"""Metrics against hand-computed values (kdpipe.metrics), plots checked as real PNG files written atomically
(kdpipe.report.plots), Markdown tables and reports (kdpipe.report.markdown)."""

import subprocess
import sys

import pytest
import torch
from torch import nn

from kdpipe import metrics as M
from kdpipe.report import markdown as R
from kdpipe.report import plots as P

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def one_hot_logits(preds: list[int], num_classes: int) -> torch.Tensor:
    """Logits whose argmax is `preds`."""
    return torch.eye(num_classes)[preds] * 5.0  # (N, K)


# ---------------------------------------------------------------------------------------------------------
# classification_metrics

# labels 0 0 1 1 2 2, predictions 0 1 1 1 2 0. Per class (P, R, F1):
#   0: TP 1, FP 1, FN 1 -> (1/2, 1/2, 1/2);  1: TP 2, FP 1, FN 0 -> (2/3, 1, 4/5);  2: TP 1, FP 0, FN 1 -> (1, 1/2, 2/3)
LABELS_3 = [0, 0, 1, 1, 2, 2]
PREDS_3 = [0, 1, 1, 1, 2, 0]
CLASSES_3 = ["cat", "dog", "eel"]


def test_metrics_three_classes_match_hand_values():
    m = M.classification_metrics(one_hot_logits(PREDS_3, 3), torch.tensor(LABELS_3), CLASSES_3)
    assert m["test_accuracy"] == pytest.approx(4 / 6)
    assert m["macro_f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert all(type(c) is int for row in m["confusion"] for c in row)
    assert "top5_accuracy" not in m
    assert set(CLASSES_3) <= set(m["report"])
    assert m["report"]["dog"]["recall"] == pytest.approx(1.0)
    assert all(name in m["report_text"] for name in CLASSES_3)


def test_metrics_cover_classes_absent_from_labels():
    m = M.classification_metrics(one_hot_logits([0, 1], 3), torch.tensor([0, 1]), CLASSES_3)
    assert "eel" in m["report"]
    assert m["confusion"] == [[1, 0, 0], [0, 1, 0], [0, 0, 0]]


def test_top5_on_crafted_ranks():
    # Every row ranks class c at position c + 1, so labels 0 and 4 are in the top 5, labels 5 and 9 are not.
    logits = -torch.arange(10.0).repeat(4, 1)  # (4, 10)
    labels = torch.tensor([0, 4, 5, 9])
    m = M.classification_metrics(logits, labels, [f"c{i}" for i in range(10)])
    assert m["test_accuracy"] == pytest.approx(0.25)
    assert m["top5_accuracy"] == pytest.approx(0.5)


def test_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="logits must be"):
        M.classification_metrics(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), ["a", "b"])
    with pytest.raises(ValueError, match="labels must be"):
        M.classification_metrics(torch.zeros(4, 2), torch.zeros(3, dtype=torch.long), ["a", "b"])


# ---------------------------------------------------------------------------------------------------------
# count_macs and cpu_latency_ms


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))


def test_count_macs_tiny_model_by_hand():
    assert M.count_macs(tiny_model(), (1, 8, 8)) == 8 * 8 * 4 * 1 * 3 * 3 + 256 * 10


def test_count_macs_grouped_and_strided_convs():
    grouped = nn.Conv2d(4, 8, 3, padding=1, groups=2)  # each output sees 4/2 input channels
    assert M.count_macs(grouped, (4, 6, 6)) == 6 * 6 * 8 * 2 * 3 * 3
    depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    assert M.count_macs(depthwise, (4, 6, 6)) == 6 * 6 * 4 * 1 * 3 * 3
    strided = nn.Conv2d(1, 2, 3, stride=2)  # 7×7 -> 3×3
    assert M.count_macs(strided, (1, 7, 7)) == 3 * 3 * 2 * 1 * 3 * 3


def test_count_macs_restores_modes_and_bn_statistics():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    model[1].eval()  # a mixed-mode model: frozen BN inside a training model
    before = model[1].running_mean.clone()
    M.count_macs(model, (1, 5, 5))
    assert model.training and model[0].training and not model[1].training
    assert torch.equal(model[1].running_mean, before)


def test_count_macs_on_zoo_model():
    from kdpipe.models.zoo import build_model

    assert M.count_macs(build_model("small_cnn", 1, 10), (1, 8, 8)) > 0


def test_cpu_latency_positive_and_leaves_model_alone():
    model = nn.Sequential(tiny_model(), nn.BatchNorm1d(10)).train()
    before = model[1].running_mean.clone()
    ms = M.cpu_latency_ms(model, (1, 8, 8), batch_size=4, warmup=1, repeats=3)
    assert isinstance(ms, float) and ms > 0
    assert model.training and model[1].training
    assert torch.equal(model[1].running_mean, before)
    assert next(model.parameters()).device.type == "cpu"


# ---------------------------------------------------------------------------------------------------------
# gap_recovered and mean_std


def test_gap_recovered_values():
    assert M.gap_recovered(0.9, 0.8, 0.85) == pytest.approx(0.5)
    assert M.gap_recovered(0.9, 0.8, 0.9) == pytest.approx(1.0)
    assert M.gap_recovered(0.9, 0.8, 0.75) == pytest.approx(-0.5)
    assert M.gap_recovered(0.9, 0.9, 0.95) is None


def test_mean_std_sample_std():
    r = M.mean_std([1.0, 2.0, 3.0, 4.0])
    assert r["mean"] == pytest.approx(2.5)
    assert r["std"] == pytest.approx((5 / 3) ** 0.5)  # Σ(x − 2.5)² = 5, over n − 1 = 3
    assert r["n"] == 4 and r["values"] == [1.0, 2.0, 3.0, 4.0]
    assert M.mean_std([0.7]) == {"mean": 0.7, "std": 0.0, "n": 1, "values": [0.7]}
    with pytest.raises(ValueError):
        M.mean_std([])


# ---------------------------------------------------------------------------------------------------------
# Plots


def assert_png(path, folder):
    assert path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 1000
    assert [p.name for p in folder.iterdir()] == [path.name]  # no temp file left beside it


def test_confusion_png(tmp_path):
    out = P.confusion_png([[5, 1, 0], [0, 6, 0], [2, 0, 4]], CLASSES_3, tmp_path / "figs" / "cm.png", "teacher")
    assert_png(out, tmp_path / "figs")


def test_confusion_png_many_classes_without_counts(tmp_path):
    k = 25
    confusion = [[10 if i == j else 1 for j in range(k)] for i in range(k)]
    assert_png(P.confusion_png(confusion, [f"c{i}" for i in range(k)], tmp_path / "cm.png", "big"), tmp_path)


def test_confusion_png_rejects_wrong_shape(tmp_path):
    with pytest.raises(ValueError, match="3×3"):
        P.confusion_png([[1, 0], [0, 1]], CLASSES_3, tmp_path / "cm.png", "bad")


def test_curves_png_with_csv_style_rows(tmp_path):
    curves = {
        "teacher": [{"epoch": 1, "val_accuracy": 0.8}, {"epoch": 2, "val_accuracy": 0.9}],
        "distilled": [{"epoch": "1", "val_accuracy": "0.7"}, {"epoch": "2", "val_accuracy": ""},
                      {"epoch": "3", "val_accuracy": "0.85"}],  # as read back from CSV, one empty cell
    }
    assert_png(P.curves_png(curves, tmp_path / "curves.png", title="validation accuracy"), tmp_path)
    with pytest.raises(ValueError, match="train_loss"):
        P.curves_png(curves, tmp_path / "loss.png", metric="train_loss")


def test_tradeoff_png_with_a_log_axis(tmp_path):
    points = [{"label": "teacher", "ms": 2.0, "acc": 0.99, "bytes": 300_000},
              {"label": "student", "ms": 0.1, "acc": 0.95, "bytes": 20_000}]  # 20× apart: a log latency axis
    assert_png(P.tradeoff_png(points, tmp_path / "tradeoff.png"), tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Markdown


def test_headline_table_formats():
    rows = {
        "teacher": {"model": "resnet32x4", "test_accuracy": 0.98333, "macro_f1": 0.98,
                    "num_parameters": 270_000, "macs": 12_500_000, "latency_ms": 0.5},
        "distilled": {"model": "small_cnn", "test_accuracy": M.mean_std([0.97, 0.975]),
                      "num_parameters": 94_000},
    }
    table = R.headline_table(rows)
    lines = table.splitlines()
    assert len(lines) == 4 and "top-5" not in lines[0]
    assert "98.33 %" in lines[2] and "0.27 M" in lines[2] and "12.50" in lines[2]
    assert "97.25 ± 0.35 %" in lines[3] and "94 k" in lines[3]
    assert "–" in lines[3]  # no macro-F1, MACs or latency for the distilled row
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_headline_table_top5_column_only_when_present():
    rows = {"teacher": {"test_accuracy": 0.9, "top5_accuracy": 0.99}, "scratch": {"test_accuracy": 0.8}}
    lines = R.headline_table(rows).splitlines()
    assert "top-5" in lines[0] and "99.00 %" in lines[2]
    assert lines[3].split("|")[4].strip() == "–"  # scratch has no top-5


def test_evaluate_table_from_evaluate_json_rows():
    """Rows as the evaluate stage writes them: a student's spread over seeds is `<key>_std` beside `<key>`."""
    evaluated = {
        "teacher": {"model": "resnet20", "test_accuracy": 0.99, "macro_f1": 0.98},
        "scratch": {"model": "tiny_cnn", "test_accuracy": 0.9, "test_accuracy_std": 0.01, "per_seed": [{}, {}]},
        "distilled": {"model": "tiny_cnn", "test_accuracy": 0.95, "test_accuracy_std": 0.02, "macro_f1": 0.94,
                      "macro_f1_std": 0.001, "per_seed": [{}, {}]},
        "gap_recovered": 0.5, "shipped": {"seed": 1},
    }
    lines = R.evaluate_table(evaluated).splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["teacher", "scratch", "distilled"]
    assert "99.00 %" in lines[2] and "90.00 ± 1.00 %" in lines[3]
    assert "95.00 ± 2.00 %" in lines[4] and "0.9400 ± 0.0010" in lines[4]
    assert evaluated["distilled"]["macro_f1"] == 0.94  # the rows read are left as they were


def test_markdown_report_has_every_part():
    table = R.headline_table({"teacher": {"test_accuracy": 0.9}})
    report = R.markdown_report(title="KD on digits", dataset="digits (8×8, 10 classes)", table=table, gap=0.5,
                               sections={"teacher report": "precision recall"},
                               images={"confusion": "plots/cm.png"})
    assert report.startswith("# KD on digits")
    assert "digits (8×8, 10 classes)" in report and table in report
    assert "50.0 %" in report and "share of the teacher–scratch gap that distillation closed" in report
    assert "## teacher report" in report and "```text\nprecision recall\n```" in report
    assert "![confusion](plots/cm.png)" in report
    undefined = R.markdown_report(title="t", dataset="d", table=table, gap=None, sections={}, images={})
    assert "undefined" in undefined


def test_import_is_cheap():
    code = ("import sys, kdpipe.metrics, kdpipe.report.plots, kdpipe.report.markdown, kdpipe.ship.shipping, kdpipe.ship.registrations; "
            "heavy = [m for m in ('sklearn', 'matplotlib', 'torchvision', 'onnx', 'mlflow') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
