"""params.yaml validation: every bad value fails before any work, in one line naming the key, exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from conftest import REPO, subprocess_env, tiny_params, write_params
from pydantic import ValidationError

from kdpipe import cli, config
from kdpipe.stages import prepare

BAD_CASES = [
    # (id, mutate(params) , expected key path, expected words)
    ("negative lr", lambda p: p["teacher"].update(lr=-1), "teacher.lr", "must be > 0, got -1"),
    ("zero epochs", lambda p: p["student"].update(epochs=0), "student.epochs", "must be >= 1"),
    ("epochs not int", lambda p: p["teacher"].update(epochs="ten"), "teacher.epochs", "integer"),
    ("unknown key", lambda p: p["teacher"].update(lrr=0.1), "teacher.lrr", "unknown key"),
    ("unknown section", lambda p: p.update(trainer={"lr": 1}), "trainer", "unknown key"),
    ("unknown dataset", lambda p: p["data"].update(dataset="mnist"), "data.dataset", "must be one of"),
    ("unknown model", lambda p: p["teacher"].update(model="resnet999"), "teacher.model", "resnet999"),
    ("momentum >= 1", lambda p: p["student"].update(momentum=1.5), "student.momentum", "must be < 1"),
    ("val fraction", lambda p: p["data"].update(val_fraction=1.2), "data.val_fraction", "must be < 1"),
    ("checkpoint missing", lambda p: p["teacher"].update(source="checkpoint"), "teacher.checkpoint", "required"),
    ("imagefolder folder", lambda p: p["data"].update(dataset="imagefolder"), "data.folder", "required"),
    ("negative seed", lambda p: p.update(seed=-3), "seed", "must be >= 0"),
    ("unknown optimizer", lambda p: p["teacher"].update(optimizer="adam"), "teacher.optimizer", "'adam'"),
    ("warmup too long", lambda p: p["teacher"].update(warmup_epochs=5, epochs=5), "teacher.warmup_epochs", "< epochs"),
    ("empty experiment", lambda p: p["tracking"].update(experiment=""), "tracking.experiment", "at least 1"),
    ("zero batch", lambda p: p["student"].update(batch_size=0), "student.batch_size", "must be >= 1"),
    ("label smoothing", lambda p: p["teacher"].update(label_smoothing=1.0), "teacher.label_smoothing", "< 1"),
    ("bool as list", lambda p: p["data"].update(download=[1]), "data.download", "bool"),
]


@pytest.fixture
def produced(workdir):
    """A workspace whose outputs already exist: bad params must leave them byte-for-byte untouched."""
    outputs = {}
    for rel in ("data/prepared/dataset.pt", "data/prepared/meta.json", "models/teacher.pt", "metrics/teacher.json"):
        path = workdir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"earlier output {rel}".encode())
        outputs[path] = path.read_bytes()
    return outputs


def _snapshot(root):
    return sorted((str(p.relative_to(root)), p.read_bytes()) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("case", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_params_exit_2_one_line_key_path_outputs_untouched(case, workdir, produced, capsys):
    _, mutate, key, words = case
    params = tiny_params(workdir)
    mutate(params)
    path = write_params(workdir / "bad.yaml", params)
    before = _snapshot(workdir)

    assert cli.main(["check-params", str(path)]) == 2
    assert prepare.main(["--params", str(path)]) == 2  # a stage validates before touching anything

    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2, err  # one line from each command
    for line in err:
        assert f"{key}:" in line and words in line, line
        assert "Traceback" not in line
    assert _snapshot(workdir) == before


def test_error_message_format_is_exact():
    with pytest.raises(config.ConfigError) as e:
        config.from_dict({"teacher": {"lr": -1}})
    assert str(e.value) == "teacher.lr: must be > 0, got -1"


def test_cli_process_prints_one_line_no_traceback(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["teacher"]["lr"] = -1
    path = write_params(tmp_path / "p.yaml", params)
    out = subprocess.run([sys.executable, "-m", "kdpipe.cli", "check-params", str(path)],
                         capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip() == "kdpipe check-params: error: teacher.lr: must be > 0, got -1"


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("teacher: [unclosed\n")
    with pytest.raises(config.ConfigError, match=r"broken.yaml: not valid YAML"):
        config.load(bad)
    with pytest.raises(config.ConfigError, match="file not found"):
        config.load(tmp_path / "nope.yaml")
    bad.write_text("- a list\n")
    with pytest.raises(config.ConfigError, match="must be a mapping"):
        config.load(bad)


def test_repo_params_are_valid_and_frozen():
    cfg = config.load(REPO / "params.yaml")
    assert cfg.data.dataset == "digits"
    with pytest.raises(ValidationError):
        cfg.teacher.lr = 1.0  # frozen: params are read once and never mutated
    flat = cfg.flat()
    assert flat["teacher.lr"] == cfg.teacher.lr and flat["paths.models"] == "models"


def test_empty_file_is_refused_but_an_empty_mapping_in_code_gives_defaults(tmp_path):
    """An empty params.yaml is a mistake (issue 21: check-params passed it, then `make run` failed in DVC); the
    defaults stay reachable from code."""
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(config.ConfigError, match="empty.yaml: is empty; it must be a mapping of sections"):
        config.load(path)
    assert config.from_dict({}) == config.Config()
