"""Teacher outputs cached per augmented view (FKD: Shen & Xing 2022, "A Fast Knowledge Distillation Framework
for Visual Recognition").

Online KD runs the teacher on every augmented batch the student sees, so on a CPU most of a step is the
teacher's. Here the teacher labels K seeded crop/flip views of every training image once; each distillation
step then draws, per image, one of its K views, rebuilds exactly that image from the stored crop offset and flip,
and reads the teacher's stored logits for it: the same consistent teaching (the teacher labels the very view
the student sees; Beyer et al. 2022) without a teacher forward per step. Storage is (N, K, classes) fp16 logits
and (N, K) view parameters: 12 MB for Fashion-MNIST's 60k images with K = 10.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kdpipe.data.batches import Views, apply_views, draw_views, to_float


@dataclass(frozen=True)
class TeacherViews:
    """K views per training image: where each is cropped, whether it is flipped, and the teacher's logits."""

    crop_padding: int
    flip: bool
    dy: torch.Tensor  # (N, K) uint8 row offsets into the padded image (zeros without cropping)
    dx: torch.Tensor  # (N, K) uint8 column offsets
    flipped: torch.Tensor  # (N, K) bool
    logits: torch.Tensor  # (N, K, classes) fp16

    @property
    def k(self) -> int:
        return self.dy.shape[1]

    def to(self, device: torch.device) -> TeacherViews:
        return TeacherViews(self.crop_padding, self.flip, *(t.to(device) for t in
                                                             (self.dy, self.dx, self.flipped, self.logits)))

    def flat_logits(self) -> torch.Tensor:
        """(N·K, classes): row i·K + v holds the teacher's logits for view v of image i."""
        return self.logits.reshape(-1, self.logits.shape[-1])

    def views(self, idx: torch.Tensor, v: torch.Tensor) -> Views:
        """The crop and flip of view v[j] of train image idx[j]."""
        return Views(self.dy[idx, v] if self.crop_padding else None, self.dx[idx, v] if self.crop_padding else None,
                     self.flipped[idx, v] if self.flip else None)

    def augment(self, x: torch.Tensor, idx: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The engine's augment hook: each image of the batch as one of its K views, drawn uniformly (as FKD
        samples among its stored crops), and the rows of flat_logits() that label them."""
        v = torch.randint(self.k, (len(idx),), generator=gen, device=gen.device).to(self.dy.device)
        idx = idx.to(self.dy.device)
        return apply_views(x, self.crop_padding, self.views(idx, v)), idx * self.k + v

    def state(self) -> dict:
        """Plain tensors and numbers, for torch.save and a weights_only load."""
        return {"crop_padding": self.crop_padding, "flip": self.flip, "dy": self.dy.cpu(), "dx": self.dx.cpu(),
                "flipped": self.flipped.cpu(), "logits": self.logits.cpu()}


def draw_all(n: int, k: int, crop_padding: int, flip: bool, seed: int) -> tuple[torch.Tensor, ...]:
    """(dy, dx, flipped), each (N, K), from a host generator seeded with `seed`: the same views on any device."""
    gen = torch.Generator().manual_seed(seed)
    drawn = [draw_views(n, crop_padding, flip, gen) for _ in range(k)]
    zeros = torch.zeros(n, dtype=torch.uint8)
    dy = torch.stack([d.dy.to(torch.uint8) if d.dy is not None else zeros for d in drawn], 1)
    dx = torch.stack([d.dx.to(torch.uint8) if d.dx is not None else zeros for d in drawn], 1)
    flipped = torch.stack([d.flipped if d.flipped is not None else zeros.bool() for d in drawn], 1)
    return dy, dx, flipped


@torch.inference_mode()
def label_views(teacher: nn.Module, x_uint8: torch.Tensor, k: int, crop_padding: int, flip: bool, seed: int, rt,
                batch_size: int = 512) -> TeacherViews:
    """The teacher's logits on K seeded views of each image of x_uint8 (N, C, H, W): K·N teacher forwards once,
    instead of one per image per epoch per student seed. `teacher` is frozen and on rt.device."""
    if crop_padding > 255:
        raise ValueError(f"crop_padding {crop_padding}: offsets are stored as uint8 (at most 255)")
    teacher.eval()
    dy, dx, flipped = draw_all(len(x_uint8), k, crop_padding, flip, seed)
    partial = TeacherViews(crop_padding, flip, dy, dx, flipped, torch.empty(0))
    out = []
    for start in range(0, len(x_uint8), batch_size):
        x = to_float(x_uint8[start : start + batch_size].to(rt.device, non_blocking=True))
        rows = torch.arange(start, start + len(x))
        per_view = []
        for v in range(k):
            view = apply_views(x, crop_padding, partial.views(rows, torch.full_like(rows, v)))
            with rt.autocast():
                per_view.append(teacher(rt.layout(view)).to(torch.float16).cpu())
        out.append(torch.stack(per_view, 1))  # (B, K, classes)
    return TeacherViews(crop_padding, flip, dy, dx, flipped, torch.cat(out))
