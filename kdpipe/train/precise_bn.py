"""BatchNorm statistics recomputed for the current weights (`bn_recalibrate: N`), before a validation score.

"Precise BN" (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", §3): the running mean and variance a BatchNorm
keeps during training are an exponential average over weights that kept changing; here they are replaced by the
statistics of its inputs over a fixed sample of training images through the current weights. Why kdpipe needs it:
torchvision's MobileNetV3 uses BatchNorm momentum 0.01 (TensorFlow's 0.99 decay), so after the few hundred steps
of a short fine-tuning run its running statistics still lean on their initial values (mean 0, variance 1). On a
small photo folder that student scored chance in eval mode while its train accuracy reached 0.96 (issue 19;
tests/test_photos.py: the same weights score 0.32 with the running statistics, 0.95 with recomputed ones). The
images are un-augmented (the stored squares the model is evaluated on), read in train-position order, and nothing
else runs in train mode, so no random number is drawn: training itself goes exactly as without it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from kdpipe.data.batches import Split, to_float


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate(model: nn.Module, train: Split, images: int, rt,
                read: Callable[[Split, Iterable[torch.Tensor]], Iterator[tuple]]) -> int:
    """Set every BatchNorm's running mean and (unbiased) variance to those of its inputs over the first `images`
    training images, passed as one batch with the BatchNorms in train mode and the rest in eval mode (no dropout:
    nothing draws from any generator), read with `read` (the engine's reader: from the device, or streamed). One batch, because in train mode each BatchNorm normalises with its batch's statistics: then the
    layers after it see what they will see in eval mode with the new statistics. Averaging batches instead
    (fvcore's precise BN) did not: at batch 16 a MobileNetV3's statistics, compounded over 34 BatchNorms and
    1×1 maps, scored 0.55 on a 3-class val split that one batch of the same 50 images scored 1.0 on. Momenta and
    the train/eval mode are restored. Returns the number of images used (0: fewer than 2, nothing changed)."""
    norms = batchnorms(model)
    n = min(images, len(train))
    if not norms or n < 2:  # a batch of one has no variance (and BatchNorm refuses it in train mode)
        return 0
    momenta, was_training = [m.momentum for m in norms], model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: after one batch, exactly that batch's statistics
    model.eval()
    for m in norms:
        m.train()
    try:
        for _, xb, _ in read(train, [torch.arange(n)]):
            x = to_float(xb.to(rt.device, non_blocking=True))  # (n, C, H, W)
            with rt.autocast():
                model(rt.layout(x))
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return n
