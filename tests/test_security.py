"""Security defaults: pickle-free torch.load, servers bound to 127.0.0.1, no secrets or home paths in logged
params, and no ONNX external data read from outside the model's folder. Each check is also run on a bad
example, so it can fail."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import mlflow
import numpy as np
import onnx
import onnxruntime
import pytest
from conftest import REPO
from mlflow.tracking._tracking_service import utils as tracking_utils
from PIL import Image

from kdpipe import cli, config, store, tracking

# ------------------------------------------------------------------------------ torch.load(weights_only=True)


def torch_loads(source: str, filename: str = "<snippet>") -> dict[str, bool]:
    """{`file:line`: has a literal weights_only=True} for every torch.load call. Follows `import torch as t`
    and `from torch import load as l`; torch.serialization.load counts too."""
    tree = ast.parse(source, filename)
    modules, loads = {"torch"}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.asname or a.name for a in node.names if a.name == "torch"}
        elif isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization"):
            loads |= {a.asname or a.name for a in node.names if a.name == "load"}
    calls = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and is_torch_load(node.func, modules, loads):
            flag = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
            calls[f"{filename}:{node.lineno}"] = isinstance(flag, ast.Constant) and flag.value is True
    return calls


def is_torch_load(func: ast.expr, modules: set[str], loads: set[str]) -> bool:
    if isinstance(func, ast.Name):
        return func.id in loads
    if not (isinstance(func, ast.Attribute) and func.attr == "load"):
        return False
    owner = ast.unparse(func.value)
    return owner in modules or owner in {f"{m}.serialization" for m in modules}


@pytest.mark.parametrize("snippet, unsafe", [
    ("import torch\ntorch.load(p, weights_only=True)", False),
    ("import torch\ntorch.load(p, map_location='cpu', weights_only=True)", False),
    ("import pickle, onnx\npickle.load(f)\nonnx.load(p)\nnp.load(p)", False),
    ("import torch\ntorch.load(p)", True),
    ("import torch\ntorch.load(p, weights_only=False)", True),
    ("import torch\nsafe = True\ntorch.load(p, weights_only=safe)", True),  # not a literal: not provable
    ("import torch\ntorch.load(p, **options)", True),
    ("import torch as t\nt.load(p)", True),
    ("from torch import load as read\nread(p)", True),
    ("import torch\ntorch.serialization.load(p)", True),
])
def test_scanner_finds_unsafe_loads(snippet, unsafe):
    assert (False in torch_loads(snippet).values()) == unsafe


def test_every_torch_load_in_kdpipe_is_weights_only():
    calls = {}
    for path in sorted((REPO / "kdpipe").rglob("*.py")):
        calls.update(torch_loads(path.read_text(), str(path.relative_to(REPO))))
    assert calls  # the scan finds the real calls (kdpipe/files.py), not nothing
    assert [where for where, safe in calls.items() if not safe] == []


# ------------------------------------------------------------------------------ servers on 127.0.0.1


def mlflow_servers(makefile: str) -> dict[str, str | None]:
    """{target: host} for each recipe line starting `mlflow ui` or `mlflow server` (None: no --host given)."""
    text = makefile.replace("\\\n", " ")  # continuation lines join their command
    out, target = {}, None
    for line in text.splitlines():
        if match := re.match(r"^([\w.-]+):", line):
            target = match[1]
        elif line.startswith("\t") and re.search(r"\bmlflow\s+(ui|server)\b", line):
            host = re.search(r"(?:--host|-h)[ =](\S+)", line)
            out[target] = host[1] if host else None
    return out


def test_makefile_parser_sees_hosts():
    snippet = "a: venv\n\tmlflow ui --host 0.0.0.0\nb:\n\tmlflow server \\\n\t  -h 127.0.0.1 --port 1\nc:\n\tmlflow ui\n"
    assert mlflow_servers(snippet) == {"a": "0.0.0.0", "b": "127.0.0.1", "c": None}


def test_mlflow_ui_and_server_bind_loopback():
    servers = mlflow_servers((REPO / "Makefile").read_text())
    assert {"ui", "mlflow-server"} <= set(servers)
    assert servers == dict.fromkeys(servers, "127.0.0.1")


# ------------------------------------------------------------------------------ logged params


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """$HOME is tmp_path, so paths under it are "home paths"."""
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def leaky_config(home: Path, uri: str | None = None):
    """A config with a token in a URI (user info and query) and paths under the home folder."""
    return config.from_dict({
        "paths": {"raw": "https://me:s3cr3t@data.example.com/raw?token=abc123&v=2", "models": f"{home}/models"},
        "tracking": {"uri": uri or "http://me:tok3n@mlflow.example.com:5000", "system_metrics": False},
    })


def assert_clean(params: dict[str, str], home: Path) -> None:
    assert not [v for v in params.values() if re.search(r"s3cr3t|tok3n|abc123", v) or str(home) in v], params
    assert params["paths.raw"] == "https://***@data.example.com/raw?token=***&v=2"
    assert params["paths.models"] == "~/models"


def test_redacted_params(home):
    cfg = leaky_config(home)
    params = tracking.redacted_params(cfg.flat())
    assert_clean(params, home)
    assert params["tracking.uri"] == "http://***@mlflow.example.com:5000"
    assert params.keys() == cfg.flat().keys()
    assert params["seed"] == "0" and params["paths.prepared"] == "data/prepared"  # the rest as MLflow logs it
    assert tracking.redacted_params({"p": f"{home}2/x"}) == {"p": f"{home}2/x"}  # another folder, untouched


def test_stage_run_logs_redacted_params(home, monkeypatch):
    """A real run in a temp sqlite store; the params read back hold no secret, home path or env value."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(store, "_USER_URI", None)
    monkeypatch.setattr(store, "_MLFLOW_SET", {})
    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)  # stage_run sets mlflow's global: restored
    monkeypatch.setenv("KDPIPE_TEST_SECRET", "envs3cr3t")
    cfg = leaky_config(home, uri=f"sqlite:///{home / 'mlflow.db'}")
    with tracking.stage_run("security", cfg, root=home):
        pass
    [run] = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list")
    params = run.data.params
    assert_clean(params, home)
    assert params["tracking.uri"] == "sqlite:///~/mlflow.db"
    assert not [v for v in params.values() if "envs3cr3t" in v]


# ------------------------------------------------------------------------------ ONNX external data


MODEL = """<ir_version: 8, opset_import: ["" : 17]>
tiny (float[N, 1, 2, 2] images) => (float[N, 2] logits)
<float[4, 2] w = {1, 0, 0, 1, 1, 0, 0, 1}> {
  flat = Flatten(images)
  logits = MatMul(flat, w)
}"""


def external_model(folder: Path, location: str) -> Path:
    """folder/model.onnx whose initializer w takes its 32 bytes from `location` (written there when it is
    inside the folder)."""
    model = onnx.parser.parse_model(MODEL)
    onnx.helper.set_model_props(model, {"classes": json.dumps(["left", "right"]), "input_size": "1x2x2"})
    w = model.graph.initializer[0]
    if not Path(location).is_absolute() and ".." not in location:
        (folder / location).write_bytes(w.raw_data or np.array(w.float_data, np.float32).tobytes())
    w.ClearField("raw_data")
    w.ClearField("float_data")
    w.data_location = onnx.TensorProto.EXTERNAL
    for key, value in {"location": location, "offset": "0", "length": "32"}.items():
        w.external_data.add(key=key, value=value)
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize("location", ["../../etc/passwd", "/etc/passwd"])
def test_external_data_outside_the_folder_is_refused(tmp_path, capsys, monkeypatch, location):
    folder = tmp_path / "models"
    folder.mkdir()
    model = external_model(folder, location)
    Image.new("L", (2, 2)).save(tmp_path / "x.png")

    def untouched(*args, **kwargs):
        raise AssertionError("onnxruntime opened the model")

    monkeypatch.setattr(onnxruntime, "InferenceSession", untouched)
    assert cli.main(["predict", "--model", str(model), str(tmp_path / "x.png")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert str(model) in err and repr(location) in err and "outside the model's folder" in err


def test_external_data_inside_the_folder_loads(tmp_path, capsys):
    model = external_model(tmp_path, "model.onnx.data")
    Image.fromarray(np.array([[255, 0], [255, 0]], np.uint8)).save(tmp_path / "left.png")
    assert cli.main(["predict", "--model", str(model), str(tmp_path / "left.png"), "--top", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[1] == "left"
