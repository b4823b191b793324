"""On-device batching and augmentation: splits placed on the training device (or left on disk to stream), uint8
to float, and crop/flip views drawn and applied to a whole batch without a Python loop."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Split:
    """One split as the training loop reads it."""

    x: torch.Tensor  # uint8 (N, C, H, W) on the training device, or an ondisk.OnDiskArray when streamed
    y: torch.Tensor  # int64 (N,), on the device with x, on the host when streamed
    workers: int = 0  # streamed: DataLoader worker processes that read ahead
    lengths: torch.Tensor | None = None  # text: int32 (N,) tokens per text, on the host (x: int32 (N, max_length) ids)

    @property
    def is_text(self) -> bool:
        return self.lengths is not None

    def __len__(self) -> int:
        return len(self.y)

    @property
    def streamed(self) -> bool:
        return not isinstance(self.x, torch.Tensor)


def place_splits(prepared: dict, device: torch.device, *, in_memory: bool,
                 workers: int = 0) -> tuple[Split, Split, Split]:
    """(train, val, test) on the training device, or left on disk and streamed batch by batch by `workers`
    DataLoader processes."""

    def split(name: str) -> Split:
        x, y = prepared[f"{name}_x"], prepared[f"{name}_y"]
        if f"{name}_lengths" in prepared:  # token ids: always on the device (a few bytes a token); the lengths
            # stay on the host, where batching and trimming read them (no device sync per step)
            return Split(x.to(device), y.to(device), lengths=prepared[f"{name}_lengths"].cpu())
        if not in_memory:
            return Split(x, y, workers)
        return Split((x if isinstance(x, torch.Tensor) else x.load()).to(device), y.to(device))

    return split("train"), split("val"), split("test")


# Splits fit "in memory" when their images take at most this share of the device's memory (a GPU's total, or the
# host's available RAM): the rest is left to models, activations and the optimizer.
IN_MEMORY_SHARE = 0.25


def fits_in_memory(nbytes: int, device: torch.device) -> bool:
    """data.in_memory: auto: do images of `nbytes` fit IN_MEMORY_SHARE of the device's memory?"""
    if device.type == "cuda":
        capacity = torch.cuda.get_device_properties(device).total_memory
    else:
        import psutil

        capacity = psutil.virtual_memory().available
    return nbytes <= IN_MEMORY_SHARE * capacity


def to_float(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1], on the same device."""
    if x_uint8.dtype != torch.uint8:
        raise TypeError(f"to_float expects uint8, got {x_uint8.dtype}")
    return x_uint8.to(torch.float32).div_(255.0)


@dataclass(frozen=True)
class Views:
    """Where each image of a batch is cropped and whether it is flipped: dy, dx (N,) row and column offsets into
    the zero-padded image (None without cropping), flipped (N,) bool (None without flips)."""

    dy: torch.Tensor | None
    dx: torch.Tensor | None
    flipped: torch.Tensor | None


def draw_views(n: int, crop_padding: int, flip: bool, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu") -> Views:
    """Random crop offsets and flips for n images, drawn on the generator's device (`device` without one), in
    this order: flips as `torch.rand(n) < 0.5` (if flip), then offsets as `torch.randint(0, 2p + 1, (2, n))`
    (if crop_padding p > 0)."""
    draw_device = generator.device if generator is not None else device
    flipped = (torch.rand(n, generator=generator, device=draw_device) < 0.5) if flip else None
    dy = dx = None
    if crop_padding > 0:
        dy, dx = torch.randint(0, 2 * crop_padding + 1, (2, n), generator=generator, device=draw_device)
    return Views(dy, dx, flipped)


def apply_views(x: torch.Tensor, crop_padding: int, views: Views) -> torch.Tensor:
    """Crop and flip each image as `views` says, without a Python loop: image i is padded by crop_padding on
    every side and its H x W window at (dy[i], dx[i]) is taken; a flipped image reads its window's columns in
    reverse."""
    if views.dy is None and views.flipped is None:
        return x
    n, _, h, w = x.shape
    rows = torch.arange(h, device=x.device).expand(n, h)  # (N, H)
    cols = torch.arange(w, device=x.device).expand(n, w)  # (N, W)
    if views.flipped is not None:
        cols = torch.where(views.flipped.to(x.device)[:, None], cols.flip(1), cols)
    if views.dy is not None:
        dy, dx = views.dy.to(x.device).long(), views.dx.to(x.device).long()
        x = F.pad(x, (crop_padding,) * 4)  # (N, C, H + 2p, W + 2p), zeros outside the image
        rows, cols = rows + dy[:, None], cols + dx[:, None]
    batch = torch.arange(n, device=x.device)[:, None, None]
    # Advanced indices on dims 0, 2, 3 broadcast to (N, H, W) and go first: the result is (N, H, W, C).
    out = x.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()  # (N, H, W, C) -> (N, C, H, W)


def augment_batch(
    x: torch.Tensor, crop_padding: int, flip: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip (p=0.5), per image: draw_views, then
    apply_views. crop_padding 0 and flip False return x itself."""
    if crop_padding == 0 and not flip:
        return x
    return apply_views(x, crop_padding, draw_views(len(x), crop_padding, flip, generator, x.device))
