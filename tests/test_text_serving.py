"""The registered text model: a pyfunc over raw strings (kdpipe/ship/text_pyfunc.py) logged through
registrations.register_onnx with the tokenizer.json, loaded back from the registry, and served by `mlflow models
serve`, whose REST answer to raw text has the argmax onnxruntime gives on the tokenized ids."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import subprocess_env
from mlflow.tracking._tracking_service import utils as tracking_utils
from test_registry_server import free_port, stop, wait_healthy
from test_text_export import CLASSES, MAX_LENGTH, StandIn, make_tokenizer

from kdpipe.ship import registrations, registry, text_onnx, text_runtime
from kdpipe.ship.onnx_export import ort_session

NAME = "kdpipe-text-student"
TEXTS = ["the cat sat on the mat", "stocks fell sharply today", "a storm hit the coast and rain fell",
         "an unseen zebra word", ""]


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """(store URI, folder, ONNX path, tokenizer.json path): one version registered through the export's code."""
    folder = tmp_path_factory.mktemp("text_serving")
    tokenizer = make_tokenizer()
    tokenizer_path = folder / "tokenizer.json"
    tokenizer.save(str(tokenizer_path))
    torch.manual_seed(1)
    model = StandIn(tokenizer.get_vocab_size(), len(CLASSES), pad_id=0).eval()
    meta = {"modality": "text", "classes": json.dumps(CLASSES), "pad_id": "0",
            text_runtime.TOKENIZER_KEY: tokenizer.to_str()}
    onnx_path = text_onnx.export_text_onnx(model, folder / "student.onnx", max_length=MAX_LENGTH, pad_id=0,
                                           vocab_size=tokenizer.get_vocab_size(), metadata=meta)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    # set_tracking_uri also writes MLFLOW_TRACKING_URI; setting the old URI back after (as this fixture once did)
    # left the variable at mlflow's default for the rest of the worker, where it outranked the next stage's
    # tracking.uri (a later export logged to another store). The context puts the variable and mlflow's global back.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
        mlflow.set_tracking_uri(uri)
        experiment = mlflow.create_experiment("kdpipe", artifact_location=(folder / "mlartifacts").as_uri())
        entry = registrations.Registration(name=NAME, onnx_path=onnx_path, artifact_name="student",
                                           test_accuracy=0.5, dataset_digest="d1", val_accuracy=0.5)
        with mlflow.start_run(experiment_id=experiment):
            gate = registrations.register_onnx(entry, TEXTS[:2], tokenizer=tokenizer_path)
    assert gate["champion"] and gate["version"] == "1"
    return uri, folder, onnx_path, tokenizer_path


def expected_argmax(onnx_path: Path, tokenizer_path: Path, texts: list[str]) -> np.ndarray:
    """onnxruntime on the ids the tokenizer gives, straight from the two files (not through the pyfunc)."""
    from tokenizers import Tokenizer

    feed = text_runtime.encode(Tokenizer.from_file(str(tokenizer_path)), texts, pad_id=0)
    return ort_session(onnx_path).run(None, feed)[0].argmax(1)


def test_the_registered_pyfunc_takes_raw_strings(registered):
    uri, _, onnx_path, tokenizer_path = registered
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    expected = expected_argmax(onnx_path, tokenizer_path, TEXTS)
    for model_input in (TEXTS, pd.DataFrame({"text": TEXTS})):
        out = model.predict(model_input)
        assert list(out.columns) == ["label", "label_index", "probabilities"]
        assert out["label_index"].tolist() == expected.tolist()
        assert out["label"].tolist() == [CLASSES[i] for i in expected]
        probs = np.array(out["probabilities"].tolist())
        assert probs.shape == (len(TEXTS), len(CLASSES)) and np.allclose(probs.sum(1), 1)
    assert model.predict("the cat sat on the mat")["label_index"].tolist() == expected[:1].tolist()


def test_the_logged_model_carries_its_onnx_tokenizer_and_code(registered):
    uri, folder, onnx_path, tokenizer_path = registered
    downloaded = registry.download_onnx(f"models:/{NAME}@champion", uri, folder / "download")
    assert downloaded.read_bytes() == onnx_path.read_bytes()  # kdpipe predict and the gate find it
    root = downloaded.parent.parent
    assert (root / "artifacts" / "tokenizer.json").read_text() == tokenizer_path.read_text()
    assert (root / "code" / "kdpipe" / "ship" / "text_runtime.py").is_file()
    assert not list(root.rglob("*.pkl"))  # models from code: a script to run, no pickle to trust
    assert "set_model(TextPyfunc())" in (root / "text_model.py").read_text()
    requirements = (root / "requirements.txt").read_text()
    assert "onnxruntime==" in requirements and "tokenizers==" in requirements


def invoke(base: str, body: dict) -> list[dict]:
    request = urllib.request.Request(f"{base}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["predictions"]


@pytest.mark.slow
def test_the_rest_server_answers_raw_text_with_onnxruntimes_argmax(registered, tmp_path):
    uri, _, onnx_path, tokenizer_path = registered
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@champion",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path, env=subprocess_env(MLFLOW_TRACKING_URI=uri), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, server, route="/ping", timeout_s=120, what="mlflow models serve")
        as_list = invoke(base, {"inputs": TEXTS})  # the curl line of docs/shipping.md
        as_records = invoke(base, {"dataframe_records": [{"text": t} for t in TEXTS]})
    finally:
        stop(server)
    expected = expected_argmax(onnx_path, tokenizer_path, TEXTS).tolist()
    for answer in (as_list, as_records):
        assert [row["label_index"] for row in answer] == expected
        assert [row["label"] for row in answer] == [CLASSES[i] for i in expected]
