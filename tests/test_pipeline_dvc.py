"""The whole pipeline under DVC in a fresh git repo (the README's `make run` path, minus venv set-up) on small
params: every stage's outputs, the MLflow store beside them, a no-op second repro, metrics and plots, and an
experiment with an override. Marked slow; CI still runs it. The repo is the session's `dvc_repo` fixture."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import dvc, dvc_stage_names, sh, stages_run

pytestmark = pytest.mark.slow

# What each metrics file must report (key fields, not every field).
METRIC_KEYS = {
    "teacher": {"test_accuracy", "val_accuracy", "epochs_run", "params"},
    "scratch": {"test_accuracy", "test_accuracy_std", "val_accuracy", "per_seed", "seeds", "params"},
    "distill": {"test_accuracy", "test_accuracy_std", "val_accuracy", "per_seed", "seeds", "method", "params"},
    "evaluate": {"teacher", "scratch", "distilled", "gap_recovered"},
    "export": {"parity_max_abs_diff", "argmax_agreement", "student_seed", "student_onnx_accuracy",
               "registered_version", "champion", "params"},
}


def declared_outputs(root: Path) -> dict[str, list[Path]]:
    """Per stage, every out, metrics and plots path of the repo's dvc.yaml, resolved from its params.yaml."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]

    def resolve(entry) -> Path:
        path = next(iter(entry)) if isinstance(entry, dict) else entry
        for key, value in params["paths"].items():
            path = path.replace(f"${{paths.{key}}}", str(value))
        assert "${" not in path, path
        return root / path

    return {name: [resolve(e) for kind in ("outs", "metrics", "plots") for e in stage.get(kind, [])]
            for name, stage in stages.items()}


def test_first_repro_runs_every_stage_and_writes_every_output(dvc_repo):
    root = dvc_repo.root
    assert stages_run(dvc_repo.first_repro) == dvc_stage_names()
    for stage, paths in declared_outputs(root).items():
        for path in paths:
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            assert files and all(f.stat().st_size > 0 for f in files), f"{stage}: {path} missing or empty"
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert list(lock["stages"]) == dvc_stage_names()
    print(f"small-params pipeline under DVC: {dvc_repo.seconds:.0f} s")


@pytest.mark.parametrize("stage", sorted(METRIC_KEYS))
def test_metrics_files_have_their_key_fields(dvc_repo, stage):
    metrics = json.loads((dvc_repo.root / "metrics" / f"{stage}.json").read_text())
    assert METRIC_KEYS[stage] <= set(metrics), METRIC_KEYS[stage] - set(metrics)
    accuracies = [metrics[k]["test_accuracy"] for k in ("teacher", "scratch", "distilled")] if stage == "evaluate" \
        else [metrics.get("test_accuracy", metrics.get("student_onnx_accuracy"))]
    assert all(0 <= a <= 1 for a in accuracies), accuracies


def test_mlflow_store_is_at_repo_root_and_not_a_dvc_output(dvc_repo):
    root = dvc_repo.root
    assert (root / "mlflow.db").is_file() and (root / "mlartifacts").is_dir()
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    names = {r.info.run_name for r in mlflow.search_runs(experiment_names=["kdpipe"], output_format="list")}
    assert set(dvc_stage_names()) <= names
    lock = (root / "dvc.lock").read_text()  # every DVC output is listed here
    assert "mlflow" not in lock and "mlartifacts" not in lock


def test_second_repro_is_up_to_date_and_fast(dvc_repo):
    t0 = time.perf_counter()
    out = dvc("repro", cwd=dvc_repo.root)
    seconds = time.perf_counter() - t0
    assert "Data and pipelines are up to date." in out.stdout, out.stdout
    assert stages_run(out.stdout) == []
    assert seconds < 15, seconds


def test_runs_of_a_repro_on_a_clean_checkout_are_not_dirty(dvc_repo):
    """The first `dvc repro` ran on a clean commit ("init"): every stage's run says git_dirty false, although
    the stages before it had already rewritten dvc.lock and their outputs (what the pipeline writes is no change
    to the code that ran)."""
    init = sh(["git", "rev-list", "--max-parents=0", "HEAD"], dvc_repo.root).stdout.strip()
    uri = f"sqlite:///{dvc_repo.root / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("kdpipe").experiment_id],
                              f"tags.git_commit = '{init}'")
    assert {r.info.run_name for r in runs} == set(dvc_stage_names()), [r.info.run_name for r in runs]
    assert {r.data.tags["git_dirty"] for r in runs} == {"false"}


def test_metrics_and_plots_show(dvc_repo, tmp_path):
    shown = json.loads(dvc("metrics", "show", "--json", cwd=dvc_repo.root).stdout)
    assert "test_accuracy" in json.dumps(shown) and "gap_recovered" in json.dumps(shown)
    dvc("plots", "show", "-o", str(tmp_path / "plots"), cwd=dvc_repo.root)
    assert (tmp_path / "plots" / "index.html").stat().st_size > 0


def test_exp_run_with_override_shows_in_exp_show(dvc_repo, temperature_experiment):
    """`dvc exp run -S distill.temperature=...` (the session's experiment) is a row of `dvc exp show` with the
    overridden value and its own metrics, under the baseline commit."""
    table = json.loads(dvc("exp", "show", "--json", cwd=dvc_repo.root).stdout)
    runs = {run["name"]: run for row in table for exp in (row.get("experiments") or []) for run in exp["revs"]}
    assert temperature_experiment.name in runs, sorted(runs)
    data = runs[temperature_experiment.name]["data"]
    key, value = temperature_experiment.override.split("=")
    section, name = key.split(".")
    assert data["params"]["params.yaml"]["data"][section][name] == float(value)
    assert 0 <= data["metrics"]["metrics/distill.json"]["data"]["test_accuracy"] <= 1


def test_a_dvc_exp_run_registers_a_candidate_and_leaves_champion_where_it_was(dvc_repo, temperature_experiment):
    """The experiment reran export (a new temperature): a new version takes `candidate`, and `champion` stays on
    the baseline's version, because DVC runs the stages of a `dvc exp run` with DVC_EXP_NAME set (export.promote:
    auto); the new version's promotion_reason says so."""
    uri = f"sqlite:///{dvc_repo.root / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    versions = sorted(int(v.version) for v in client.search_model_versions("name = 'kdpipe-student'"))
    assert len(versions) >= 2, versions  # the baseline's export and the experiment's
    aliases = client.get_registered_model("kdpipe-student").aliases  # alias -> version
    assert int(aliases["candidate"]) == versions[-1]
    assert int(aliases.get("champion", 0)) < versions[-1], aliases  # older (or none: a 1-epoch baseline may fail
    # the floor, whose reason tag then says so); never the experiment's
    reason = client.get_model_version("kdpipe-student", str(versions[-1])).tags["promotion_reason"]
    assert f"DVC_EXP_NAME={temperature_experiment.name}" in reason, reason


def test_kdpipe_exps_shows_the_experiment_in_80_columns(dvc_repo, temperature_experiment):
    """`kdpipe exps`: the experiment under its commit with its changed param and its accuracies, every line at
    most 80 characters (plain `dvc exp show` prints `…` here)."""
    out = sh([str(Path(sys.executable).parent / "kdpipe"), "exps"], dvc_repo.root).stdout.splitlines()
    assert max(len(line) for line in out) <= 80, "\n".join(out)
    (line,) = [line for line in out if line.startswith(f"  {temperature_experiment.name}")]
    key, value = temperature_experiment.override.split("=")
    assert f"{key}={float(value)}" in line, line
    cells = line.split()[1:5]  # teacher, scratch, distilled, gap
    metrics = json.loads(dvc("exp", "show", "--json", cwd=dvc_repo.root).stdout)
    tip = next(run for row in metrics for exp in (row.get("experiments") or []) for run in exp["revs"]
               if run["name"] == temperature_experiment.name)
    distilled = tip["data"]["metrics"]["metrics/evaluate.json"]["data"]["distilled"]["test_accuracy"]
    assert cells[2] == f"{100 * distilled:.2f}", (cells, distilled)
