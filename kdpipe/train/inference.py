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
    """Logits (N, K) in fp32 on the host for uint8 images (N, C, H, W), or for token ids (N, max_length) right-
    padded with the text model's pad_id; the model is left in eval mode."""
    model.eval()
    if getattr(model, "modality", "image") == "text":
        return predict_text(model, x, rt, batch_size)
    out = []
    for start in range(0, len(x), batch_size):
        xb = rt.layout(to_float(x[start : start + batch_size].to(rt.device, non_blocking=True)))
        with rt.autocast():
            out.append(model(xb).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def predict_text(model: nn.Module, ids: torch.Tensor, rt: Runtime, batch_size: int) -> torch.Tensor:
    """Logits of texts batched shortest first, each batch cut to its longest text, in the input's order."""
    from kdpipe.data.text_batches import by_length, trim

    lengths = (ids != model.pad_id).sum(1)  # right-padded: the tokens before the first pad
    batches, parts = by_length(lengths, batch_size), []
    for rows in batches:
        dev_rows = rows.to(ids.device)
        xb = trim(ids[dev_rows], lengths[dev_rows]).to(rt.device, non_blocking=True)
        with rt.autocast():
            parts.append(model(xb).float().cpu())
    if not parts:
        return torch.empty(0)
    out = torch.empty(len(ids), parts[0].shape[1])
    out[torch.cat(batches)] = torch.cat(parts)  # back to the input's order
    return out


def score(model: nn.Module, split: Split, rt: Runtime) -> dict[str, float]:
    """Mean cross-entropy and top-1 accuracy of `model` on a split (validation during training)."""
    logits = predict(model, split.x, rt)
    y = split.y.cpu()
    return {"loss": losses.cross_entropy(logits, y).item(), "accuracy": (logits.argmax(1) == y).float().mean().item()}
