"""Teacher outputs cached per augmented view (FKD: Shen & Xing 2022, "A Fast Knowledge Distillation Framework
for Visual Recognition").

Online KD runs the teacher on every augmented batch the student sees, so on a CPU most of a step is the
teacher's. Here the teacher labels K seeded crop/flip views of every training image once; each distillation
step then draws, per image, one of its K views, rebuilds exactly that image from the stored crop offset and flip,
and reads the teacher's stored logits for it: the same consistent teaching (the teacher labels the very view
the student sees; Beyer et al. 2022) without a teacher forward per step. Storage is (N, K, classes) fp16 logits
and (N, K) view parameters: 12 MB for Fashion-MNIST's 60k images with K = 10.

With `augment: resized_crop` a view is a kdpipe.data.photo_aug.PhotoDraw instead: its crop box, flip, colour
factors and mixup / cutmix partner (a train position) and weight, (N, K) each (about 60 bytes a view); the
student's step renders it from the same stored numbers with the same function, so it sees bit for bit the image
the teacher labelled, and its CE term gets the labels mixed with the same weight.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from kdpipe.data import photo_aug
from kdpipe.data.augment_params import mixes
from kdpipe.data.batches import Split, Views, apply_views, draw_views, to_float


@dataclass(frozen=True)
class TeacherViews:
    """K views per training image: where each is cropped, whether it is flipped, and the teacher's logits."""

    crop_padding: int
    flip: bool
    dy: torch.Tensor  # (N, K) uint8 row offsets into the padded image (zeros without cropping; empty with photo)
    dx: torch.Tensor  # (N, K) uint8 column offsets
    flipped: torch.Tensor  # (N, K) bool
    logits: torch.Tensor  # (N, K, classes) fp16
    photo: photo_aug.PhotoDraw | None = None  # augment: resized_crop: each view's draws, (N, K, ...) per field
    jitters: bool = False  # with photo: colour factors are applied
    mixes: bool = False  # with photo: views mix in a partner image (mixup / cutmix)
    source: Split | None = None  # with mixes: the train split the partners' images and labels are read from

    @property
    def k(self) -> int:
        return self.logits.shape[1]

    def to(self, device: torch.device) -> TeacherViews:
        return TeacherViews(self.crop_padding, self.flip, *(t.to(device) for t in
                                                             (self.dy, self.dx, self.flipped, self.logits)),
                            self.photo.to(device) if self.photo is not None else None, self.jitters, self.mixes,
                            self.source)

    def reading(self, train: Split) -> TeacherViews:
        """These views with `train` as the split mixing partners come from (the split training reads)."""
        return dataclasses.replace(self, source=train)

    def flat_logits(self) -> torch.Tensor:
        """(N·K, classes): row i·K + v holds the teacher's logits for view v of image i."""
        return self.logits.reshape(-1, self.logits.shape[-1])

    def views(self, idx: torch.Tensor, v: torch.Tensor) -> Views:
        """The crop and flip of view v[j] of train image idx[j]."""
        return Views(self.dy[idx, v] if self.crop_padding else None, self.dx[idx, v] if self.crop_padding else None,
                     self.flipped[idx, v] if self.flip else None)

    def augment(self, x: torch.Tensor, idx: torch.Tensor, y: torch.Tensor, gen: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The engine's augment hook: each image of the batch as one of its K views, drawn uniformly (as FKD
        samples among its stored crops), the rows of flat_logits() that label them, and the labels (mixed as
        the view mixed its images, with photo views that mix)."""
        v = torch.randint(self.k, (len(idx),), generator=gen, device=gen.device).to(self.logits.device)
        idx = idx.to(self.logits.device)
        if self.photo is None:
            return apply_views(x, self.crop_padding, self.views(idx, v)), idx * self.k + v, y
        d = self.photo.select(idx, v)
        if self.mixes and self.source is None:
            raise ValueError("teacher views that mix images need the train split: call reading(train) first")
        x = render_view(x, self.source.x if self.mixes else None, d, self.jitters)
        if self.mixes:
            y_partner = self.source.y[d.partner.long().to(self.source.y.device)].to(y.device)
            y = photo_aug.mixed_targets(y, y_partner, d.lam, self.logits.shape[-1])
        return x, idx * self.k + v, y

    def state(self) -> dict:
        """Plain tensors and numbers, for torch.save and a weights_only load."""
        photo = {"photo": self.photo.state(), "jitters": self.jitters, "mixes": self.mixes} if self.photo else {}
        return {"crop_padding": self.crop_padding, "flip": self.flip, "dy": self.dy.cpu(), "dx": self.dx.cpu(),
                "flipped": self.flipped.cpu(), "logits": self.logits.cpu(), **photo}


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


def render_view(x: torch.Tensor, images, d: photo_aug.PhotoDraw, jitters: bool) -> torch.Tensor:
    """Photo views `d` of the uint8 batch x; `images` (uint8 (N, C, H, W), on the device or an ondisk.OnDiskArray)
    holds the partners at d.partner when the views mix (None otherwise). Labelling and replay both call this."""
    partner_x = None
    if images is not None:
        rows = d.partner.long()
        partner = images[rows.to(images.device)] if isinstance(images, torch.Tensor) else images.take(rows.cpu())
        partner_x = partner.to(x.device, non_blocking=True)
        partner_x = partner_x if x.dtype == torch.uint8 else to_float(partner_x)
    return photo_aug.render(x, partner_x, d, jitters)


@torch.inference_mode()
def label_photo_views(teacher: nn.Module, x_uint8, k: int, recipe, seed: int, rt, batch_size: int = 512
                      ) -> TeacherViews:
    """`augment: resized_crop`: the teacher's logits on K seeded photo views of each image of x_uint8 (N, C, H, W;
    a tensor or an ondisk.OnDiskArray), partners drawn among all N. The draws come from a host generator seeded
    with `seed` (the same views on any device), stored compact (PhotoDraw.compact), and rendered from the stored
    numbers, exactly as the student's replay renders them."""
    n, _, h, w = x_uint8.shape
    gen = torch.Generator().manual_seed(seed)
    draws = photo_aug.PhotoDraw.stack([photo_aug.draw(n, h, w, recipe, gen, pool=n, flip=recipe.flip).compact()
                                       for _ in range(k)])  # (N, K, ...) per field
    jitters, mixing = any(s > 0 for s in recipe.color_jitter), mixes(recipe)
    teacher.eval()
    out = []
    for start in range(0, n, batch_size):
        x = x_uint8[start : start + batch_size].to(rt.device, non_blocking=True)  # uint8, as the trainer's step
        rows = torch.arange(start, start + len(x))
        per_view = []
        for v in range(k):
            d = draws.select(rows, torch.full_like(rows, v)).to(rt.device)
            view = render_view(x, x_uint8 if mixing else None, d, jitters)
            with rt.autocast():
                per_view.append(teacher(rt.layout(view)).to(torch.float16).cpu())
        out.append(torch.stack(per_view, 1))  # (B, K, classes)
    empty = torch.zeros(0, dtype=torch.uint8)
    return TeacherViews(0, recipe.flip, empty, empty, empty.bool(), torch.cat(out), draws, jitters, mixing)
