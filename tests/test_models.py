"""Tests for kdpipe.models.zoo: every zoo name builds, runs on 8×8 and 32×32, and exposes consistent feats."""

import re
import subprocess
import sys

import pytest
import torch

from kdpipe.models.zoo import (
    MODEL_NAMES,
    Classifier,
    build_model,
    count_parameters,
    is_known_model,
    last_module_per_resolution,
)

# Torchvision models are slower to build, so only two of them, with one channel count each.
TV_CASES = [("tv:resnet18", 3), ("tv:mobilenet_v3_small", 1)]
CASES = [(name, c) for name in MODEL_NAMES for c in (1, 3)] + TV_CASES


def build(name: str, in_channels: int, seed: int = 0, **kwargs) -> Classifier:
    torch.manual_seed(seed)
    return build_model(name, in_channels, 10, **kwargs)


@pytest.mark.parametrize(("name", "in_channels"), CASES)
def test_forward_and_features(name, in_channels):
    model = build(name, in_channels).eval()
    assert (model.name, model.in_channels, model.num_classes) == (name, in_channels, 10)
    for size in (8, 32):
        x = torch.rand(2, in_channels, size, size)
        with torch.no_grad():
            logits = model(x)
            feat_logits, feats = model.forward_features(x)
        assert logits.shape == (2, 10) and torch.isfinite(logits).all()
        torch.testing.assert_close(feat_logits, logits)
        assert feats and all(f.dim() == 4 and f.shape[0] == 2 for f in feats)
        assert [f.shape[1] for f in feats] == model.feature_channels


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_2", "mobilenetv2", "small_cnn"])
def test_trains_on_8x8_batch_of_2(name):
    # Train-mode BN needs >1 value per channel at the deepest stage; 8×8 digits with batch 2 must still work.
    model = build(name, 1).train()
    logits, feats = model.forward_features(torch.rand(2, 1, 8, 8))
    (logits.square().mean() + feats[-1].mean()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_torchvision_stages_are_last_module_of_each_resolution():
    shapes = {"a": (1, 8, 16, 16), "b": (1, 8, 16, 16), "c": (1, 16, 8, 8), "d": (1, 16), "e": (1, 32, 4, 4),
              "f": (1, 32, 2, 2), "g": (1, 64, 1, 1)}
    outputs = [torch.zeros(s) for s in shapes.values()] + [None]
    names = [*shapes, "never_ran"]
    # "d" is 2-D and "never_ran" produced nothing; the last 4 resolution groups end at c, e, f, g.
    assert last_module_per_resolution(names, outputs) == ["c", "e", "f", "g"]
    assert last_module_per_resolution(names, outputs, max_stages=10) == ["b", "c", "e", "f", "g"]


def test_init_is_deterministic_given_seed():
    a, b, c = build("resnet8", 3, seed=1), build("resnet8", 3, seed=1), build("resnet8", 3, seed=2)
    for key, value in a.state_dict().items():
        torch.testing.assert_close(value, b.state_dict()[key])
    assert not torch.equal(a.body.fc.weight, c.body.fc.weight)


def test_classifier_applies_its_own_normalisation():
    mean, std = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]
    model = build("resnet8", 3, mean=mean, std=std).eval()
    assert model.mean.shape == model.std.shape == (1, 3, 1, 1)
    x = torch.rand(4, 3, 32, 32)
    expected = model.body((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
        torch.testing.assert_close(model.forward_features(x)[0], expected)


def test_default_normalisation_is_identity():
    model = build("small_cnn", 1).eval()
    x = torch.rand(2, 1, 8, 8)
    assert model.mean.flatten().tolist() == [0.0] and model.std.flatten().tolist() == [1.0]
    torch.testing.assert_close(model(x), model.body(x))


@pytest.mark.parametrize(("mean", "std"), [([0.5, 0.5], None), (None, [0.0])])
def test_bad_normalisation_raises(mean, std):
    with pytest.raises(ValueError):
        build_model("small_cnn", 1, 10, mean=mean, std=std)


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [
        ("resnet20", 0.26e6, 0.28e6),
        ("resnet8x4", 1.1e6, 1.3e6),
        ("resnet32x4", 7.2e6, 7.6e6),
        ("wrn_40_2", 2.1e6, 2.3e6),
        ("small_cnn", 0, 150e3),
    ],
)
def test_parameter_counts_match_the_literature(name, low, high):
    # RGB CIFAR-10 sizes, as reported by He et al. 2016 and Tian et al. 2020 (CRD).
    assert low <= count_parameters(build_model(name, 3, 10)) <= high


def test_count_parameters_by_hand():
    assert count_parameters(torch.nn.Linear(3, 2)) == 3 * 2 + 2


@pytest.mark.parametrize("name", [*MODEL_NAMES, "tv:resnet18", "tv:mobilenet_v3_small"])
def test_known_models(name):
    assert is_known_model(name)


@pytest.mark.parametrize("name", ["resnet9", "tv:not_a_model", "tv:", "", "ResNet20", "tv:fasterrcnn_resnet50_fpn"])
def test_unknown_models(name):
    assert not is_known_model(name)
    with pytest.raises(ValueError, match=re.escape(repr(name))):
        build_model(name, 3, 10)


def test_import_does_not_load_torchvision():
    code = "import sys, kdpipe.models.zoo; assert 'torchvision' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
