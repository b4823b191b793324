"""Pretrained torchvision teachers: weights read from a local TORCH_HOME (nothing downloads), fine-tuned on the
dataset, feeding distill; a missing weights file is one line naming the cache path; bare state dicts load."""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import write_params

from kdpipe import config
from kdpipe.models.checkpoint import build_from_checkpoint
from kdpipe.models.zoo import cached_weights_file, pretrained_torchvision, torchvision_weights
from kdpipe.stages import distill, teacher

ARCH, WEIGHTS = "resnet18", "IMAGENET1K_V1"


def _imagenet_file(torch_home, monkeypatch) -> dict:
    """A resnet18 "ImageNet" state dict (random, 1000 classes) written where torchvision caches the real one."""
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    torch.manual_seed(0)
    state = torchvision.models.resnet18(num_classes=1000).state_dict()
    path = cached_weights_file(torchvision_weights(ARCH, WEIGHTS))
    assert str(path).startswith(str(torch_home))
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return state


def test_pretrained_weights_are_loaded_and_adapted(tmp_path, monkeypatch):
    state = _imagenet_file(tmp_path / "torch_home", monkeypatch)
    model = pretrained_torchvision(ARCH, f"ResNet18_Weights.{WEIGHTS}", in_channels=1, num_classes=10)
    net = model.body.net
    assert torch.equal(net.layer3[1].conv2.weight, state["layer3.1.conv2.weight"])  # the file's weights
    assert torch.equal(net.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))  # RGB filters summed to grey
    assert net.fc.out_features == 10  # a new head for the dataset
    assert model.mean.flatten().tolist() == pytest.approx([sum([0.485, 0.456, 0.406]) / 3])  # the weights' stats


@pytest.mark.slow
def test_a_torchvision_teacher_is_fine_tuned_and_feeds_distill(tiny_pipeline, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    params = tiny_pipeline.workspace(tmp_path, teacher__source="torchvision", teacher__model=f"tv:{ARCH}",
                        teacher__weights=WEIGHTS, teacher__finetune=True, teacher__epochs=1,
                        teacher__warmup_epochs=0, runtime__precision="fp32", student__seeds=[0], student__epochs=1,
                        student__warmup_epochs=0,
                        student__chance_guard=False)  # one epoch from this 37 % teacher: the student stays at chance
    # fp32: under bf16 autocast on an AMX CPU (AMD EPYC, avx512_bf16 + amx) fine-tuning these random "ImageNet"
    # weights at lr 0.05 went NaN at step 12 (the divergence guard stopped it); this test is about the torchvision
    # path, not bf16's numerics.
    path = write_params(tmp_path / "params.yaml", params)

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))  # no weights file: one line, no download
    assert teacher.main(["--params", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("kdpipe teacher: error: teacher.weights: ")
    assert str(tmp_path / "empty_home/hub/checkpoints/resnet18-f37072fd.pth") in err and "get_state_dict" in err

    _imagenet_file(tmp_path / "torch_home", monkeypatch)
    params["teacher"]["finetune"] = False  # 1000 ImageNet classes, 10 digits: a new head needs training
    assert teacher.main(["--params", str(write_params(tmp_path / "no_finetune.yaml", params))]) == 2
    assert "teacher.finetune: IMAGENET1K_V1 predicts 1000 classes, the dataset has 10" in capsys.readouterr().err

    params["teacher"]["finetune"] = True
    cfg = config.from_dict(params)
    metrics = teacher.run(cfg)
    assert metrics["source"] == "torchvision" and metrics["epochs_run"] == 1 and metrics["model"] == f"tv:{ARCH}"
    rebuilt, ckpt = build_from_checkpoint(tmp_path / "models/teacher.pt")
    assert rebuilt.body.net.fc.out_features == 10 and ckpt["params"]["teacher"]["weights"] == WEIGHTS
    assert distill.run(cfg)["per_seed"][0]["seed"] == 0


def test_a_bare_torchvision_state_dict_loads_into_the_tv_model(tmp_path):
    """Keys as torchvision saves them (or through DDP, "module."-prefixed): exact when the head fits, adapted
    (grey first conv, new head) with finetune."""
    torch.manual_seed(0)
    fits = torchvision.models.resnet18(num_classes=10)
    fits.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    torch.save({f"module.{k}": v for k, v in fits.state_dict().items()}, tmp_path / "ddp.pt")
    model, _ = build_from_checkpoint(tmp_path / "ddp.pt", fallback_model=f"tv:{ARCH}", in_channels=1, num_classes=10)
    assert all(torch.equal(model.state_dict()[f"body.net.{k}"], v) for k, v in fits.state_dict().items())

    imagenet = torchvision.models.resnet18(num_classes=1000).state_dict()
    torch.save(imagenet, tmp_path / "imagenet.pt")
    model, _ = build_from_checkpoint(tmp_path / "imagenet.pt", fallback_model=f"tv:{ARCH}", in_channels=1,
                                     num_classes=10, finetune=True)
    assert torch.equal(model.body.net.layer4[0].conv1.weight, imagenet["layer4.0.conv1.weight"])
    assert torch.equal(model.body.net.conv1.weight, imagenet["conv1.weight"].sum(1, keepdim=True))
    assert model.body.net.fc.weight.shape == (10, 512)


def test_a_teacher_sees_its_input_size_and_keeps_it_in_its_checkpoint(tiny_pipeline, tmp_path, monkeypatch):
    """teacher.input_size: the teacher resizes 8×8 digits to 16×16 on the device; its checkpoint remembers it."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    params = tiny_pipeline.workspace(tmp_path, teacher__input_size=16, teacher__epochs=1, teacher__warmup_epochs=0)
    teacher.run(config.from_dict(params))
    model, ckpt = build_from_checkpoint(tmp_path / "models/teacher.pt")
    assert ckpt["input_size"] == model.input_size == 16
    _, feats = model.eval().forward_features(torch.rand(2, 1, 8, 8))
    assert feats[0].shape[-1] == 16  # small_cnn's first stage keeps the resolution it was given: 16, not 8
    plain = build_from_checkpoint(tiny_pipeline.work / "models/teacher.pt")[0]
    assert plain.input_size is None and plain.forward_features(torch.rand(2, 1, 8, 8))[1][0].shape[-1] == 8
    from kdpipe.ship.onnx_export import export_onnx, parity

    path = export_onnx(model, tmp_path / "teacher.onnx", (1, 8, 8), metadata={})
    images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    assert parity(model, path, images)["parity_max_abs_diff"] < 1e-4  # the resize is inside the ONNX file
