"""The model zoo: teachers and students sized for small images (8×8 digits, 28×28 Fashion-MNIST, 32×32 CIFAR).

Every network is wrapped in a `Classifier` that owns its input normalisation, so callers always feed float
images in [0, 1]. Every body network speaks one small protocol:

    body(x) -> logits                      # (N, num_classes)
    body.forward_features(x) -> (logits, feats)   # feats: per-stage maps (N, C_i, H_i, W_i), shallow to deep
    body.feature_channels: list[int]       # C_i of each feats entry

Names: the CIFAR ResNets and Wide ResNets of the KD literature (as in the CRD repository, Tian et al. 2020),
a small-input MobileNetV2, a small CNN, and "tv:<name>" for any torchvision classification model.
Only torch is imported at module level; torchvision is imported lazily (it costs seconds).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache, partial

import torch
from torch import Tensor, nn

TV_PREFIX = "tv:"
TV_PROBE_SIZE = 64  # spatial size of the dummy input that discovers a torchvision model's stages


# ---------------------------------------------------------------------------------------------------------
# Shared helpers


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal convs (fan_out, as in He et al. 2015), unit/zero norms; deterministic under a seed."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv (no bias: BN follows) → BN → ReLU, 'same' padding."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def pool_and_classify(fc: nn.Linear, x: Tensor) -> Tensor:
    """Global average pooling then the linear head; adaptive, so any input size works."""
    return fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))  # (N, C, H, W) -> (N, K)


# ---------------------------------------------------------------------------------------------------------
# CIFAR ResNets


class BasicBlock(nn.Module):
    """Two 3×3 convs with an identity (or 1×1 projection) shortcut — He et al. 2016, "Deep Residual Learning"."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        # Projection shortcut (option B) when the shape changes, as in the CRD repository.
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet: 3×3 stem then 3 stages of n basic blocks (depth = 6n + 2), strides 1, 2, 2.

    He et al. 2016, "Deep Residual Learning for Image Recognition", §4.2. `widths` = (stem, stage1, stage2,
    stage3): (16, 16, 32, 64) for resnet20 etc., (32, 64, 128, 256) for the "x4" variants of Tian et al. 2020
    (CRD). feats are the three stage outputs.
    """

    def __init__(self, depth: int, widths: tuple[int, int, int, int], in_channels: int, num_classes: int):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.stem = conv_bn_relu(in_channels, widths[0])
        self.stages = nn.ModuleList()
        cin = widths[0]
        for cout, stride in zip(widths[1:], (1, 2, 2), strict=True):
            blocks = [BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)]
            self.stages.append(nn.Sequential(*blocks))
            cin = cout
        self.fc = nn.Linear(cin, num_classes)
        self.feature_channels = list(widths[1:])
        init_weights(self)

    def forward_features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return pool_and_classify(self.fc, x), feats

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)[0]


# ---------------------------------------------------------------------------------------------------------
# Wide ResNets


class PreActBlock(nn.Module):
    """Pre-activation block BN-ReLU-conv ×2 — He et al. 2016 "Identity Mappings", as used by WRNs."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = torch.relu(self.bn1(x))
        out = self.conv2(torch.relu(self.bn2(self.conv1(act))))
        # The projection sees the activated input, as in the reference WRN code.
        return out + (x if self.shortcut is None else self.shortcut(act))


class WideResNet(nn.Module):
    """WRN-depth-k: 3 stages of pre-activation blocks, widths 16, 16k, 32k, 64k, depth = 6n + 4.

    Zagoruyko & Komodakis 2016, "Wide Residual Networks" (no dropout). feats are the three stage outputs;
    the last one after the final BN-ReLU, since that is the map that gets pooled.
    """

    def __init__(self, depth: int, k: int, in_channels: int, num_classes: int):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * k, 32 * k, 64 * k)
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.stages = nn.ModuleList()
        cin = widths[0]
        for cout, stride in zip(widths[1:], (1, 2, 2), strict=True):
            blocks = [PreActBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)]
            self.stages.append(nn.Sequential(*blocks))
            cin = cout
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)
        self.feature_channels = list(widths[1:])
        init_weights(self)

    def forward_features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        x = torch.relu(self.bn(x))
        feats[-1] = x
        return pool_and_classify(self.fc, x), feats

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)[0]


# ---------------------------------------------------------------------------------------------------------
# MobileNetV2

# (expansion t, channels c, repeats n, stride s) per row, as in Sandler et al. 2018, Table 2; grouped into
# the four resolution stages whose outputs are the feats. Strides: stem 1, then 1, 2, 2, 2, so a 32×32
# input ends at 4×4 and an 8×8 one at 1×1.
MOBILENETV2_STAGES = (
    ((1, 16, 1, 1), (6, 24, 2, 1)),
    ((6, 32, 3, 2),),
    ((6, 64, 4, 2), (6, 96, 3, 1)),
    ((6, 160, 3, 2), (6, 320, 1, 1)),
)


class InvertedResidual(nn.Module):
    """Expand 1×1 → depthwise 3×3 → linear 1×1 project, residual when shapes match — Sandler et al. 2018."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [conv_bn_relu(cin, hidden, 1)] if expand != 1 else []
        layers += [conv_bn_relu(hidden, hidden, 3, stride, groups=hidden)]
        # No ReLU after the projection: the "linear bottleneck" keeps low-dimensional information.
        layers += [nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    """Small-input MobileNetV2 (Sandler et al. 2018, "MobileNetV2: Inverted Residuals and Linear Bottlenecks").

    Like the CRD repository's `mobile_half` (width 0.5, 1280-channel head) but with a stride-1 stem, so
    8×8 inputs still reach the last stage. feats are the four resolution-stage outputs (before the 1×1 head).
    """

    def __init__(self, in_channels: int, num_classes: int, width: float = 0.5, head_channels: int = 1280):
        super().__init__()
        cin = int(32 * width)
        self.stem = conv_bn_relu(in_channels, cin, 3, 1)
        self.stages = nn.ModuleList()
        self.feature_channels = []
        for rows in MOBILENETV2_STAGES:
            blocks = []
            for t, c, n, s in rows:
                cout = int(c * width)
                for i in range(n):
                    blocks.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                    cin = cout
            self.stages.append(nn.Sequential(*blocks))
            self.feature_channels.append(cin)
        self.head = conv_bn_relu(cin, head_channels, 1)
        self.fc = nn.Linear(head_channels, num_classes)
        init_weights(self)

    def forward_features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return pool_and_classify(self.fc, self.head(x)), feats

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)[0]


# ---------------------------------------------------------------------------------------------------------
# Small CNN


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU layers (32, 64, 128 channels), 2×2 max-pool between them, GAP, linear (~94k params).

    A fast student in the spirit of the small students of Hinton et al. 2015, "Distilling the Knowledge in a
    Neural Network". feats are the three conv outputs before pooling; 8×8 inputs end at 2×2.
    """

    def __init__(self, in_channels: int, num_classes: int, widths: tuple[int, ...] = (32, 64, 128)):
        super().__init__()
        chans = (in_channels, *widths)
        self.convs = nn.ModuleList(conv_bn_relu(a, b) for a, b in zip(chans[:-1], chans[1:], strict=True))
        self.fc = nn.Linear(widths[-1], num_classes)
        self.feature_channels = list(widths)
        init_weights(self)

    def forward_features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        feats = []
        for i, conv in enumerate(self.convs):
            if i > 0:
                x = nn.functional.max_pool2d(x, 2)  # (N, C, H, W) -> (N, C, H/2, W/2)
            x = conv(x)
            feats.append(x)
        return pool_and_classify(self.fc, x), feats

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)[0]


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


def is_known_model(name: str) -> bool:
    """True for zoo names and "tv:<torchvision classification model>"; builds nothing."""
    if name.startswith(TV_PREFIX):
        return name.removeprefix(TV_PREFIX) in torchvision_model_names()
    return name in ZOO


class Classifier(nn.Module):
    """A body network behind its own per-channel input normalisation.

    Input: float images in [0, 1], (N, C, H, W); it computes body((x - mean) / std) with buffers `mean`,
    `std` of shape (1, C, 1, 1) (default 0 and 1), so the model, not the data pipeline, owns its
    normalisation (as timm's distillation teacher wrapper does) and travels with it in checkpoints and ONNX.
    forward(x) -> logits (N, num_classes); forward_features(x) -> (logits, feats), feats one map per stage,
    shallow to deep, with channels `feature_channels`.
    """

    def __init__(self, name: str, body: nn.Module, in_channels: int, num_classes: int,
                 mean: list[float] | None = None, std: list[float] | None = None):
        super().__init__()
        self.name, self.in_channels, self.num_classes = name, in_channels, num_classes
        self.body = body
        self.feature_channels: list[int] = list(body.feature_channels)
        self.register_buffer("mean", channel_buffer(mean, in_channels, 0.0, "mean"))
        self.register_buffer("std", channel_buffer(std, in_channels, 1.0, "std"))
        if not bool((self.std > 0).all()):
            raise ValueError(f"std must be positive, got {std}")

    def normalise(self, x: Tensor) -> Tensor:
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
                mean: list[float] | None = None, std: list[float] | None = None) -> Classifier:
    """Build zoo model `name` (or "tv:<torchvision name>") as a Classifier; weights depend only on the seed."""
    if not is_known_model(name):
        known = ", ".join(MODEL_NAMES)
        raise ValueError(f"unknown model {name!r}; known: {known}, or tv:<torchvision classification model>")
    if name.startswith(TV_PREFIX):
        body = build_torchvision(name.removeprefix(TV_PREFIX), in_channels, num_classes)
    else:
        body = ZOO[name](in_channels, num_classes)
    return Classifier(name, body, in_channels, num_classes, mean, std)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers such as BN statistics excluded)."""
    return sum(p.numel() for p in model.parameters())
