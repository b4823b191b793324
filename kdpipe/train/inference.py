"""A trained model's outputs on a split: logits batch by batch on the training device, and loss and accuracy.

Apart from the training loop, so that the stages that only score models (evaluate) do not depend on it.
"""

from __future__ import annotations

import torch
from torch import nn

from kdpipe.data.batches import Split, to_float
from kdpipe.distill import losses
from kdpipe.run.runtime import Runtime


@torch.inference_mode()
def predict(model: nn.Module, x: torch.Tensor, rt: Runtime, batch_size: int = 512) -> torch.Tensor:
    """Logits (N, K) in fp32 on the host for uint8 images (N, C, H, W); the model is left in eval mode."""
    model.eval()
    out = []
    for start in range(0, len(x), batch_size):
        xb = rt.layout(to_float(x[start : start + batch_size].to(rt.device, non_blocking=True)))
        with rt.autocast():
            out.append(model(xb).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def score(model: nn.Module, split: Split, rt: Runtime) -> dict[str, float]:
    """Mean cross-entropy and top-1 accuracy of `model` on a split (validation during training)."""
    logits = predict(model, split.x, rt)
    y = split.y.cpu()
    return {"loss": losses.cross_entropy(logits, y).item(), "accuracy": (logits.argmax(1) == y).float().mean().item()}
