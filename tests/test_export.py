"""Tests for kdpipe.ship.onnx_export: a checked, self-contained ONNX file with a dynamic batch, torch-vs-onnxruntime parity
(and a broken export that fails it), latency, int8 quantisation that keeps accuracy, and atomic writes."""

import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from kdpipe.models.zoo import build_model
from kdpipe.ship.onnx_export import (
    ExportError,
    export_onnx,
    onnx_accuracy,
    ort_latency_ms,
    ort_predict,
    ort_session,
    parity,
    quantize_int8,
    read_metadata,
)

METADATA = {"classes": '["left", "right"]', "input_size": "1x8x8", "params_hash": "abc123", "git_commit": "deadbeef"}


def build(name: str, in_channels: int, num_classes: int = 10, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return build_model(name, in_channels, num_classes, **kwargs)


def random_uint8(n: int, shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory):
    """small_cnn on 1×8×8 exported once: (model, path)."""
    model = build("small_cnn", 1)
    path = tmp_path_factory.mktemp("small") / "small_cnn.onnx"
    export_onnx(model, path, (1, 8, 8), metadata=METADATA)
    return model, path


def test_export_is_checked_self_contained_with_dynamic_batch(small_onnx):
    _, path = small_onnx
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    assert {o.domain: o.version for o in proto.opset_import}[""] >= 17
    [graph_input], [graph_output] = proto.graph.input, proto.graph.output
    assert (graph_input.name, graph_output.name) == ("images", "logits")
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    batch_dim, *rest = graph_input.type.tensor_type.shape.dim
    assert batch_dim.dim_param == "batch" and not batch_dim.HasField("dim_value")
    assert [d.dim_value for d in rest] == [1, 8, 8]
    session = ort_session(path, threads=1)
    for n in (1, 5):
        assert ort_predict(session, torch.rand(n, 1, 8, 8)).shape == (n, 10)
    assert sorted(p.name for p in path.parent.iterdir()) == ["small_cnn.onnx"]  # no .onnx.data, no temp file
    assert read_metadata(path) == METADATA


def test_onnx_model_normalises_itself(tmp_path):
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    model = build("resnet8", 3, mean=mean, std=std).eval()
    path = export_onnx(model, tmp_path / "m.onnx", (3, 16, 16), metadata={})
    x = torch.rand(6, 3, 16, 16)
    with torch.inference_mode():
        expected = model(x).numpy()
        unnormalised = model.body(x).numpy()
    actual = ort_predict(ort_session(path), x)
    np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=0)
    assert np.abs(unnormalised - expected).max() > 1e-2  # the normalisation really changes the logits


def test_ort_predict_scales_uint8_and_batches(small_onnx):
    _, path = small_onnx
    images = random_uint8(10, (1, 8, 8))
    session = ort_session(path)
    from_uint8 = ort_predict(session, images, batch_size=3)
    from_float = ort_predict(session, images.numpy().astype(np.float32) / 255.0)
    assert from_uint8.dtype == np.float32 and from_uint8.shape == (10, 10)
    np.testing.assert_allclose(from_uint8, from_float, atol=1e-6, rtol=0)


def test_parity_passes_for_the_exported_model(small_onnx):
    model, path = small_onnx
    report = parity(model, path, random_uint8(64, (1, 8, 8)))
    assert report["passed"] and report["n_images"] == 64
    assert report["parity_max_abs_diff"] <= 1e-4 and report["argmax_agreement"] == 1.0
    assert 0 <= report["parity_max_rel_diff"] < 1e-3


def test_parity_fails_against_other_weights(small_onnx):
    _, path = small_onnx
    other = build("small_cnn", 1, seed=1)
    report = parity(other, path, random_uint8(64, (1, 8, 8)))
    assert not report["passed"] and report["parity_max_abs_diff"] > 1e-2


def test_parity_does_not_touch_the_callers_model(small_onnx):
    model, path = small_onnx
    model.train()
    parity(model, path, random_uint8(4, (1, 8, 8)))
    assert model.training


def test_latency_is_positive(small_onnx):
    _, path = small_onnx
    for batch_size in (1, 8):
        ms = ort_latency_ms(path, (1, 8, 8), batch_size=batch_size, warmup=1, repeats=3, threads=1)
        assert isinstance(ms, float) and ms > 0


def test_int8_runs_is_smaller_and_keeps_metadata(tmp_path):
    model = build("resnet8", 3)
    fp32 = export_onnx(model, tmp_path / "fp32.onnx", (3, 16, 16), metadata=METADATA)
    int8 = quantize_int8(fp32, tmp_path / "int8.onnx", random_uint8(64, (3, 16, 16)))
    onnx.checker.check_model(onnx.load(int8), full_check=True)
    assert int8.stat().st_size < 0.5 * fp32.stat().st_size
    assert read_metadata(int8) == METADATA
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in onnx.load(int8).graph.node}
    assert ort_predict(ort_session(int8), random_uint8(5, (3, 16, 16))).shape == (5, 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp32.onnx", "int8.onnx"]


def brighter_half_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1×8×8 uint8 noise; label 0 if the left half is brighter, 1 if the right half is."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    images = torch.randint(0, 150, (n, 1, 8, 8), generator=g)
    bright_cols = torch.where(labels[:, None] == 0, torch.arange(8) < 4, torch.arange(8) >= 4)  # (N, 8)
    images = images + 100 * bright_cols[:, None, None, :]  # (N, 1, 8, 8)
    return images.to(torch.uint8), labels


def test_int8_accuracy_close_to_fp32(tmp_path):
    train_x, train_y = brighter_half_data(512, seed=0)
    test_x, test_y = brighter_half_data(256, seed=1)
    model = build("small_cnn", 1, num_classes=2).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(10):
        batch = slice(64 * (step % 8), 64 * (step % 8 + 1))
        loss = torch.nn.functional.cross_entropy(model(train_x[batch].float() / 255), train_y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    fp32 = export_onnx(model, tmp_path / "fp32.onnx", (1, 8, 8), metadata={})
    int8 = quantize_int8(fp32, tmp_path / "int8.onnx", train_x[:128])
    fp32_accuracy, int8_accuracy = onnx_accuracy(fp32, test_x, test_y), onnx_accuracy(int8, test_x, test_y)
    assert fp32_accuracy > 0.9  # so that the comparison means something
    assert abs(int8_accuracy - fp32_accuracy) <= 0.05


def test_failed_export_leaves_nothing(tmp_path):
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    with pytest.raises(ExportError, match="broken.onnx"):
        export_onnx(Broken(), tmp_path / "broken.onnx", (1, 8, 8), metadata={})
    with pytest.raises(ExportError, match="opset"):
        export_onnx(build("small_cnn", 1), tmp_path / "old.onnx", (1, 8, 8), metadata={}, opset=13)
    assert list(tmp_path.iterdir()) == []


def test_export_overwrites_in_place(small_onnx, tmp_path):
    model, _ = small_onnx
    path = tmp_path / "m.onnx"
    export_onnx(model, path, (1, 8, 8), metadata={"version": "1"})
    export_onnx(model, path, (1, 8, 8), metadata={"version": "2"})
    assert read_metadata(path) == {"version": "2"}
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_missing_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.onnx"
    for call in (lambda: read_metadata(missing), lambda: ort_session(missing)):
        with pytest.raises(ExportError, match="nope.onnx"):
            call()


def test_import_stays_cheap():
    code = "import sys, kdpipe.ship.onnx_export; print(sorted(m for m in ('onnx', 'onnxruntime', 'onnxscript') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
