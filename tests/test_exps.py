"""`kdpipe exps` (kdpipe/experiments.py) on `dvc exp show --json` output shaped as DVC 3 writes it: every
line fits 80 columns, experiments sit under their commit with the params they changed (each on its own line,
none dropped), and the accuracies are evaluate's. The real `dvc exp show` on a real experiment:
tests/test_pipeline_dvc.py."""

from __future__ import annotations

import copy

from kdpipe.experiments import WIDTH, table


def state(rev: str, name: str | None, params: dict, distilled: float, experiments=None) -> dict:
    evaluate = {"teacher": {"test_accuracy": 0.9833}, "scratch": {"test_accuracy": 0.955},
                "distilled": {"test_accuracy": distilled}, "gap_recovered": 0.5,
                "verdict": "helped" if distilled > 0.97 else "no evidence"}
    return {"rev": rev, "name": name, "error": None, "experiments": experiments,
            "data": {"rev": rev, "params": {"params.yaml": {"data": params}},
                     "metrics": {"metrics/evaluate.json": {"data": evaluate},
                                 "metrics/export.json": {"data": {"latency_ms": 0.123}}}}}


PARAMS = {"distill": {"temperature": 4.0, "method": "kd", "weights": {}},
          "student": {"model": "tiny_cnn", "lr": 0.05, "seeds": [0, 1, 2]}}


def shown() -> list[str]:
    changed = copy.deepcopy(PARAMS)
    changed["distill"].update(temperature=2.0, method="a_method_with_a_name_long_enough_to_be_cut_" * 2)
    changed["student"]["seeds"] = [0, 1]
    exp = state("e" * 40, "warmer", changed, 0.9712)
    commit = state("c" * 40, "main", PARAMS, 0.9650, experiments=[{"revs": [exp], "executor": None, "name": "warmer"}])
    return table([state("workspace", None, PARAMS, 0.9650), commit])


def test_every_line_fits_80_columns_and_the_experiment_shows_its_changes():
    lines = shown()
    assert max(map(len, lines)) <= WIDTH, "\n".join(lines)
    start = next(i for i, line in enumerate(lines) if line.startswith("  warmer"))
    row = lines[start].split()
    assert row[1:6] == ["98.33", "95.50", "97.12", "50.00", "helped"], lines[start]
    continued = [line.strip() for line in lines[start + 1:]]
    changes = [lines[start].split(maxsplit=6)[6], *continued]
    assert changes[0].startswith('distill.method="a_meth') and changes[0].endswith("…"), changes[0]
    assert len(lines[start]) == WIDTH  # cut at the edge, not dropped
    assert changes[1:] == ["distill.temperature=2.0", "student.seeds=[0, 1]"]


def test_a_commit_and_a_clean_workspace_show_no_changes():
    lines = shown()
    assert lines[3].split() == ["workspace", "98.33", "95.50", "96.50", "50.00", "noise"]
    assert lines[4].split() == ["main", "98.33", "95.50", "96.50", "50.00", "noise"]
