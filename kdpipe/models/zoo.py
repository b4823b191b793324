"""The model zoo: names → network bodies (kdpipe.models.nets, or "tv:<name>" for any torchvision classification
model), each wrapped in a `Classifier` that owns its input normalisation, so callers always feed float images
in [0, 1]. Only torch is imported at module level; torchvision is imported lazily (it costs seconds).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache, partial
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from kdpipe.errors import UserError
from kdpipe.models.nets import CifarResNet, MobileNetV2, SmallCNN, WideResNet, init_weights
from kdpipe.models.text_nets import TEXT_ZOO

TV_PREFIX = "tv:"
TV_PROBE_SIZE = 64  # spatial size of the dummy input that discovers a torchvision model's stages


# ---------------------------------------------------------------------------------------------------------
# torchvision models ("tv:<name>")


@lru_cache(maxsize=1)
def torchvision_model_names() -> frozenset[str]:
    """Names of torchvision's classification models; imports torchvision (slow), so only on demand."""
    import torchvision

    return frozenset(torchvision.models.list_models(module=torchvision.models))


def replace_first_conv(net: nn.Module, in_channels: int) -> None:
    """Swap the first Conv2d for one taking `in_channels` (same out channels, kernel, stride, padding)."""
    name, conv = next((n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d))
    if conv.in_channels == in_channels:
        return  # keep torchvision's own init when nothing changes
    new = nn.Conv2d(
        in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        dilation=conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode,
    )
    init_weights(new)
    parent_name, _, attr = name.rpartition(".")
    setattr(net.get_submodule(parent_name), attr, new)


POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def candidate_stage_modules(net: nn.Module) -> list[str]:
    """Modules whose outputs may be feats: ResNet layer1..4, else children of `features`, else top-level.

    Pooling layers are skipped: feats are pre-pooling maps, and a global pool is not a stage.
    """
    if all(hasattr(net, f"layer{i}") for i in range(1, 5)):
        return [f"layer{i}" for i in range(1, 5)]
    parent = net.features if isinstance(getattr(net, "features", None), nn.Module) else net
    prefix = "features." if parent is not net else ""
    return [prefix + n for n, m in parent.named_children() if not isinstance(m, POOLS)]


def capture_outputs(net: nn.Module, names: list[str], x: Tensor) -> tuple[Tensor, list[Tensor | None]]:
    """Run `net(x)` with temporary forward hooks; returns its output and the named modules' outputs.

    A module that did not run (e.g. an auxiliary head in eval mode) yields None.
    """
    outputs: dict[str, Tensor] = {}

    def hook_for(name: str):
        return lambda _module, _inputs, output: outputs.__setitem__(name, output)

    handles = [net.get_submodule(n).register_forward_hook(hook_for(n)) for n in names]
    try:
        out = net(x)
    finally:
        for h in handles:
            h.remove()
    return out, [outputs.get(n) for n in names]


def last_module_per_resolution(names: list[str], outputs: list[object], max_stages: int = 4) -> list[str]:
    """Keep 4-D outputs; of each run of equal spatial size keep the last module; then the last `max_stages`."""
    kept = [(n, o) for n, o in zip(names, outputs, strict=True) if isinstance(o, Tensor) and o.dim() == 4]
    stages = [n for i, (n, o) in enumerate(kept) if i + 1 == len(kept) or kept[i + 1][1].shape[2:] != o.shape[2:]]
    return stages[-max_stages:]


class TorchvisionBody(nn.Module):
    """A torchvision classifier exposing per-stage feats through forward hooks (registered only per call).

    Stages are found once at build time by probing with a TV_PROBE_SIZE² input, so `feature_channels` is
    fixed; e.g. ResNets give layer1..layer4 (He et al. 2016), MobileNetV3 the last block of each resolution.
    """

    def __init__(self, net: nn.Module, in_channels: int):
        super().__init__()
        self.net = net
        candidates = candidate_stage_modules(net)
        probe = torch.zeros(1, in_channels, TV_PROBE_SIZE, TV_PROBE_SIZE)
        was_training = net.training
        net.eval()  # eval: the probe must not touch BN running statistics
        with torch.no_grad():
            _, outputs = capture_outputs(net, candidates, probe)
        net.train(was_training)
        self.feature_names = last_module_per_resolution(candidates, outputs)
        chosen = dict(zip(candidates, outputs, strict=True))
        self.feature_channels = [chosen[n].shape[1] for n in self.feature_names]

    def forward_features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        return capture_outputs(self.net, self.feature_names, x)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def build_torchvision(arch: str, in_channels: int, num_classes: int) -> TorchvisionBody:
    """torchvision.models.<arch>(weights=None, num_classes=...) with its first conv adapted to in_channels."""
    import torchvision

    net = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    replace_first_conv(net, in_channels)
    return TorchvisionBody(net, in_channels)


class WeightsError(UserError):
    """Pretrained weights that cannot be found or used: named by the param that asked for them."""


def torchvision_weights(arch: str, name: str):
    """torchvision's weights enum member for `arch`: "IMAGENET1K_V1", "DEFAULT" or "ResNet18_Weights.IMAGENET1K_V1"."""
    import torchvision

    options = torchvision.models.get_model_weights(arch)
    member = name.rpartition(".")[2]
    if name.count(".") > 1 or ("." in name and name.partition(".")[0] != options.__name__) \
            or member not in options.__members__:
        known = ", ".join(options.__members__)
        raise WeightsError(f"teacher.weights: {name!r} is not a weights name of {arch}; known: {known}")
    return options[member]


def cached_weights_file(weights) -> Path:
    """Where torchvision keeps `weights` once downloaded: <torch hub dir>/checkpoints/<file> ($TORCH_HOME/hub)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def pretrained_torchvision(arch: str, weights_name: str, in_channels: int, num_classes: int,
                           input_size: int | None = None) -> Classifier:
    """A torchvision classifier with its pretrained weights, read from the torch hub cache (kdpipe never downloads
    in a stage: a pipeline step should not depend on the network), adapted to the dataset as a fine-tuned bare
    state dict is (artifacts.bare_state): the first conv summed over the input channels for grey images (the
    usual RGB → grey transfer), a fresh head for `num_classes`, and the weights' own normalisation."""
    from kdpipe.models.zoo import bare_state

    weights = torchvision_weights(arch, weights_name)
    path = cached_weights_file(weights)
    if not path.is_file():
        raise WeightsError(
            f"teacher.weights: {weights} is not in the torch hub cache ({path}); fetch it once where there is "
            f"network: python -c \"import torchvision; torchvision.models.get_weight('{weights}')"
            f".get_state_dict(progress=True)\" (TORCH_HOME moves the cache), or copy the file there")
    transform = weights.transforms()
    mean, std = list(transform.mean), list(transform.std)
    if in_channels != len(mean):
        mean, std = [sum(mean) / len(mean)] * in_channels, [sum(std) / len(std)] * in_channels
    model = build_model(f"{TV_PREFIX}{arch}", in_channels, num_classes, mean, std, input_size)
    try:
        model.load_state_dict(bare_state(model, torch.load(path, map_location="cpu", weights_only=True), True))
    except Exception as e:  # truncated file, another architecture's weights
        raise WeightsError(f"teacher.weights: {path} does not load into {arch}: {str(e).splitlines()[0]}") from None
    return model


# ---------------------------------------------------------------------------------------------------------
# The zoo

CIFAR_WIDTHS = (16, 16, 32, 64)
CRD_X4_WIDTHS = (32, 64, 128, 256)

# name -> constructor(in_channels, num_classes): a plain table, no registry magic.
ZOO: dict[str, Callable[[int, int], nn.Module]] = {
    **{f"resnet{d}": partial(CifarResNet, d, CIFAR_WIDTHS) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": partial(CifarResNet, 8, CRD_X4_WIDTHS),
    "resnet32x4": partial(CifarResNet, 32, CRD_X4_WIDTHS),
    "wrn_16_2": partial(WideResNet, 16, 2),
    "wrn_40_2": partial(WideResNet, 40, 2),
    "mobilenetv2": MobileNetV2,
    "small_cnn": SmallCNN,
    # ~6.3k params: an edge-sized student where the teacher–student gap (and so distillation) matters most.
    "tiny_cnn": partial(SmallCNN, widths=(8, 16, 32)),
}
MODEL_NAMES: tuple[str, ...] = tuple(ZOO)
TEXT_MODEL_NAMES: tuple[str, ...] = tuple(TEXT_ZOO)  # token ids in (kdpipe.models.text_nets), built by build_text_model


def is_known_model(name: str) -> bool:
    """True for zoo names (image and text) and "tv:<torchvision classification model>"; builds nothing."""
    if name.startswith(TV_PREFIX):
        return name.removeprefix(TV_PREFIX) in torchvision_model_names()
    return name in ZOO or name in TEXT_ZOO


class Classifier(nn.Module):
    """A body network behind its own per-channel input normalisation.

    Input: float images in [0, 1], (N, C, H, W); it computes body((x - mean) / std) with buffers `mean`,
    `std` of shape (1, C, 1, 1) (default 0 and 1), so the model, not the data pipeline, owns its
    normalisation (as timm's distillation teacher wrapper does) and travels with it in checkpoints and ONNX.
    forward(x) -> logits (N, num_classes); forward_features(x) -> (logits, feats), feats one map per stage,
    shallow to deep, with channels `feature_channels`.
    """

    def __init__(self, name: str, body: nn.Module, in_channels: int, num_classes: int,
                 mean: list[float] | None = None, std: list[float] | None = None, input_size: int | None = None):
        super().__init__()
        self.name, self.in_channels, self.num_classes = name, in_channels, num_classes
        # Resized to input_size × input_size on the device first (bilinear): a pretrained teacher at the size its
        # weights were trained for, while the data (and the student) keep theirs. None: as given.
        self.input_size = input_size
        self.body = body
        self.feature_channels: list[int] = list(body.feature_channels)
        self.register_buffer("mean", channel_buffer(mean, in_channels, 0.0, "mean"))
        self.register_buffer("std", channel_buffer(std, in_channels, 1.0, "std"))
        if not bool((self.std > 0).all()):
            raise ValueError(f"std must be positive, got {std}")

    def normalise(self, x: Tensor) -> Tensor:
        if self.input_size is not None:  # unconditional: the same size is an identity, and ONNX traces no branch
            x = torch.nn.functional.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                                                align_corners=False)
        return (x - self.mean) / self.std

    def forward(self, x: Tensor) -> Tensor:
        return self.body(self.normalise(x))

    def forward_features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        return self.body.forward_features(self.normalise(x))


def channel_buffer(values: list[float] | None, channels: int, default: float, what: str) -> Tensor:
    """Per-channel statistics as a (1, C, 1, 1) tensor; None means `default` for every channel."""
    values = [default] * channels if values is None else list(values)
    if len(values) != channels:
        raise ValueError(f"{what} has {len(values)} values but the model has {channels} input channels")
    return torch.tensor(values, dtype=torch.float32).view(1, channels, 1, 1)  # (C,) -> (1, C, 1, 1)


def build_model(name: str, in_channels: int, num_classes: int,
                mean: list[float] | None = None, std: list[float] | None = None,
                input_size: int | None = None) -> Classifier:
    """Build zoo model `name` (or "tv:<torchvision name>") as a Classifier; weights depend only on the seed."""
    if not is_known_model(name):
        known = ", ".join(MODEL_NAMES)
        raise ValueError(f"unknown model {name!r}; known: {known}, or tv:<torchvision classification model>")
    if name.startswith(TV_PREFIX):
        body = build_torchvision(name.removeprefix(TV_PREFIX), in_channels, num_classes)
    else:
        body = ZOO[name](in_channels, num_classes)
    return Classifier(name, body, in_channels, num_classes, mean, std, input_size)


class Ensemble(nn.Module):
    """Teachers whose logits are averaged: an ensemble of seeds of one recipe (teacher.ensemble). Distillation
    from it needs logits only; it has no forward_features."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.name = f"ensemble of {len(members)} {getattr(members[0], 'name', type(members[0]).__name__)}"
        if getattr(members[0], "modality", "image") == "text":  # what inference needs to batch token ids
            self.modality, self.pad_id = "text", members[0].pad_id

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([member(x).float() for member in self.members]).mean(0)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers such as BN statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def bare_state(model, state: dict, finetune: bool) -> dict:
    """A bare network state dict (a torchvision model's, or one saved through DDP with "module." keys) keyed as
    `model`, a Classifier: its body under "body." (a tv: model's network under "body.net."), the dataset's
    normalisation kept. With `finetune`, a first conv for RGB is summed to grey (the usual transfer to one
    channel) and a tensor that still does not fit (the old classification head) keeps its fresh initialisation."""
    prefix = "body.net." if hasattr(model.body, "net") else "body."
    own = model.state_dict()
    out = {"mean": model.mean, "std": model.std}
    for key, value in state.items():
        key = key.removeprefix("module.")
        key = key if key.startswith("body.") else prefix + key
        if finetune and key in own and isinstance(value, torch.Tensor) and value.shape != own[key].shape:
            grey = value.dim() == 4 and own[key].shape[1] == 1 and value.shape[0] == own[key].shape[0]
            value = value.sum(1, keepdim=True) if grey else own[key]
        out[key] = value
    return out
