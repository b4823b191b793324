"""Network bodies sized for small images (8×8 digits, 28×28 Fashion-MNIST, 32×32 CIFAR): the CIFAR ResNets and
Wide ResNets of the KD literature (as in the CRD repository, Tian et al. 2020), a small-input MobileNetV2 and a
small CNN. `kdpipe.models.zoo` names them and wraps them with their input normalisation. Every body speaks one
small protocol:

    body(x) -> logits                      # (N, num_classes)
    body.forward_features(x) -> (logits, feats)   # feats: per-stage maps (N, C_i, H_i, W_i), shallow to deep
    body.feature_channels: list[int]       # C_i of each feats entry
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

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


def residual_stages(block: type[nn.Module], widths: tuple[int, ...], n: int) -> nn.ModuleList:
    """Three stages of n `block(cin, cout, stride)` each, strides 1, 2, 2, from widths (stem, s1, s2, s3)."""
    stages = nn.ModuleList()
    cin = widths[0]
    for cout, stride in zip(widths[1:], (1, 2, 2), strict=True):
        stages.append(nn.Sequential(*[block(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)]))
        cin = cout
    return stages


def run_stages(stages: nn.ModuleList, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """The last stage's output and every stage's output (the features distillation can match)."""
    feats = []
    for stage in stages:
        x = stage(x)
        feats.append(x)
    return x, feats


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
        self.stages = residual_stages(BasicBlock, widths, n)
        self.fc = nn.Linear(widths[-1], num_classes)
        self.feature_channels = list(widths[1:])
        init_weights(self)

    def forward_features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        x, feats = run_stages(self.stages, self.stem(x))
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
        self.stages = residual_stages(PreActBlock, widths, n)
        self.bn = nn.BatchNorm2d(widths[-1])
        self.fc = nn.Linear(widths[-1], num_classes)
        self.feature_channels = list(widths[1:])
        init_weights(self)

    def forward_features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        x, feats = run_stages(self.stages, self.stem(x))
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
