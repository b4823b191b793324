"""Photo augmentation (`augment: resized_crop`) on the device, a whole batch at once, no per-image Python loop.

Per image: a random-resized crop and horizontal flip as one bilinear resampling (F.grid_sample over a sampling grid
built for every image at once), colour jitter, then mixup or cutmix with a partner image. Everything a view needs
is drawn first into a `PhotoDraw` from the run's generator (a fixed number of draws in a fixed order, whatever
they turn out to be, so resume and reproducibility hold) and applied by `render`, which the live training step and
the teacher's cached views (kdpipe.distill.views) share: a view stored as a PhotoDraw renders bit for bit the
image the teacher labelled.

What matches torchvision, and where it departs:
- crops: RandomResizedCrop.get_params' draw (10 attempts, integer boxes, central fallback), vectorised; the
  resampling equals transforms.v2.functional.resized_crop on the same box (bilinear, align_corners False) to
  float rounding. A crop of the stored square resized back to its size only ever enlarges, where antialiasing
  changes nothing.
- colour: brightness, contrast, saturation as ColorJitter's adjust_* functions, in that fixed order (ColorJitter
  shuffles the order per call); no hue.
- mixing (timm's Mixup, per image): the partner gets the image's own crop, flip and colour (mixing two images
  and then cropping both alike), so a cached view needs only the partner's index; with both alphas set, each
  image takes cutmix or mixup with probability 1/2; cutmix's weight is the pasted box's exact area share.

Two ways to render the same draws: uint8 images on the CPU take `render_uint8` (each box resized straight to the
output size by torch's uint8 bilinear kernel, antialiased where it shrinks, as torchvision's resized_crop on a uint8
image; then flip, and colour in float32 on the small result, a few images at a time so a chunk stays in cache, on
one worker thread per torch thread); float images, and images on a GPU, take one grid_sample for the batch
(`resized_crop`; render_uint8 lives in kdpipe.data.photo_render). The uint8 path equals torchvision's per-sample transforms on uint8 images to float rounding (the
resized crop is rounded to uint8 there as here); the float path stays as it was, and the two differ by that
rounding (up to ~0.01). bench/augment.py measures both against torchvision; docs/speed.md has the figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from kdpipe.data.augment_params import AugmentParams, mixes
from kdpipe.data.batches import to_float
from kdpipe.data.photo_render import GREY, grey_weights, render_uint8

ATTEMPTS = 10  # torchvision's RandomResizedCrop: crops tried before the central fallback


@dataclass(frozen=True)
class PhotoDraw:
    """The random draws of one view per image (any leading shape: (N,) for a batch, (N, K) for cached views)."""

    box: Tensor  # (..., 4) top, left, height, width of the crop in the stored image, whole pixels
    flipped: Tensor  # (...) bool
    jitter: Tensor  # (..., 3) float32 brightness, contrast, saturation factors (1 = unchanged)
    partner: Tensor  # (...) the image mixed in: a row of the batch (live), or a train position (cached views)
    lam: Tensor  # (...) float32 share of the image itself, and of its label, in the mix (1 = not mixed)
    cut: Tensor  # (..., 4) cutmix box top, left, height, width in the output (height 0: mixup blends instead)

    def select(self, *index) -> PhotoDraw:
        """The draws at `index` of every field (e.g. cached views' [image, view])."""
        return PhotoDraw(*(getattr(self, f.name)[index] for f in fields(self)))

    def to(self, device) -> PhotoDraw:
        return PhotoDraw(*(getattr(self, f.name).to(device) for f in fields(self)))

    def compact(self) -> PhotoDraw:
        """Stored dtypes (int16 boxes, int32 partners): what cached views keep, and what both sides render from."""
        return PhotoDraw(self.box.to(torch.int16), self.flipped, self.jitter, self.partner.to(torch.int32),
                         self.lam, self.cut.to(torch.int16))

    def state(self) -> dict:
        return {f.name: getattr(self, f.name).cpu() for f in fields(self)}

    @classmethod
    def stack(cls, draws: list[PhotoDraw], dim: int = 1) -> PhotoDraw:
        return cls(*(torch.stack([getattr(d, f.name) for d in draws], dim) for f in fields(cls)))


def draw_crops(n: int, h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float],
               gen: torch.Generator) -> Tensor:
    """(N, 4) integer boxes (top, left, height, width) as RandomResizedCrop.get_params draws them, for n images of
    h × w at once: ATTEMPTS (area share, log aspect ratio) pairs each, the first that fits, else the central
    crop of the clamped ratio. Draws: rand (N, ATTEMPTS, 2), then rand (N, 2) for the offsets."""
    dev = gen.device
    u = torch.rand(n, ATTEMPTS, 2, generator=gen, device=dev)
    area = h * w * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    cw, ch = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))  # (N, ATTEMPTS)
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # the first attempt that fits (0 when none does)
    cw, ch = cw.gather(1, first).squeeze(1), ch.gather(1, first).squeeze(1)
    fw, fh = central_size(h, w, ratio)
    found = fits.any(1)
    cw, ch = torch.where(found, cw, float(fw)), torch.where(found, ch, float(fh))
    offsets = torch.rand(n, 2, generator=gen, device=dev)
    top = torch.minimum(torch.floor(offsets[:, 0] * (h - ch + 1)), h - ch)
    left = torch.minimum(torch.floor(offsets[:, 1] * (w - cw + 1)), w - cw)
    top, left = torch.where(found, top, float((h - fh) // 2)), torch.where(found, left, float((w - fw) // 2))
    return torch.stack([top, left, ch, cw], 1).long()


def central_size(h: int, w: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """(width, height) of RandomResizedCrop's fallback: the whole image, its aspect ratio clamped to `ratio`."""
    if w / h < ratio[0]:
        return w, int(round(w / ratio[0]))
    if w / h > ratio[1]:
        return int(round(h * ratio[1])), h
    return w, h


def draw_jitter(n: int, strengths: tuple[float, float, float], gen: torch.Generator) -> Tensor:
    """(N, 3) factors, each uniform in [max(0, 1 − s), 1 + s] (all ones without a draw when every s is 0)."""
    s = torch.tensor(strengths, device=gen.device)
    if not bool((s > 0).any()):
        return torch.ones(n, 3, device=gen.device)
    low = torch.clamp(1 - s, min=0)
    return low + (1 + s - low) * torch.rand(n, 3, generator=gen, device=gen.device)


def draw_mix(n: int, h: int, w: int, recipe: AugmentParams, pool: int, gen: torch.Generator
             ) -> tuple[Tensor, Tensor, Tensor]:
    """(partner, lam, cut) for n images: partners uniform in [0, pool); per image cutmix or mixup (a coin when
    both alphas are set); the weight ~ Beta(α, α) as a ratio of two Gamma(α) draws; a cutmix box of area share
    1 − λ centred uniformly and clipped to the image (timm's rand_bbox), λ then its exact share."""
    dev = gen.device
    partner = torch.randint(0, pool, (n,), generator=gen, device=dev)
    if recipe.mixup_alpha > 0 and recipe.cutmix_alpha > 0:
        use_cut = torch.rand(n, generator=gen, device=dev) < 0.5
    else:
        use_cut = torch.full((n,), recipe.cutmix_alpha > 0, device=dev)
    alpha = torch.where(use_cut, recipe.cutmix_alpha, recipe.mixup_alpha).float().expand(2, n).contiguous()
    g = torch._standard_gamma(alpha, generator=gen)  # (2, N): Beta(α, α) = g0 / (g0 + g1)
    lam = torch.where(g.sum(0) > 0, g[0] / g.sum(0).clamp_min(1e-30), 0.5)
    cut = torch.zeros(n, 4, dtype=torch.long, device=dev)
    if recipe.cutmix_alpha > 0:
        centre = torch.rand(n, 2, generator=gen, device=dev) * torch.tensor([h, w], device=dev)
        side = torch.sqrt(1 - lam)[:, None] * torch.tensor([h, w], device=dev)  # (N, 2) box height, width
        low = torch.clamp(torch.floor(centre) - torch.floor(side / 2), min=0)
        high = torch.minimum(torch.floor(centre) + torch.floor(side / 2), torch.tensor([h, w], device=dev))
        cut = torch.where(use_cut[:, None], torch.cat([low, high - low], 1), 0).long()
        area = (cut[:, 2] * cut[:, 3]).float() / (h * w)
        lam = torch.where(use_cut, 1 - area, lam)
    return partner, lam.float(), cut


def draw(n: int, h: int, w: int, recipe: AugmentParams, gen: torch.Generator, pool: int | None = None,
         flip: bool = False) -> PhotoDraw:
    """One view for each of n images of h × w: crops, then flips (if `flip`: rand < 0.5), then colour factors (if
    any), then mixing (if any alpha; partners drawn from [0, pool), default the batch itself)."""
    dev = gen.device
    box = draw_crops(n, h, w, recipe.crop_scale, recipe.crop_ratio, gen)
    flipped = torch.rand(n, generator=gen, device=dev) < 0.5 if flip else torch.zeros(n, dtype=torch.bool, device=dev)
    jitter = draw_jitter(n, recipe.color_jitter, gen)
    if mixes(recipe):
        partner, lam, cut = draw_mix(n, h, w, recipe, n if pool is None else pool, gen)
    else:
        partner, lam = torch.arange(n, device=dev), torch.ones(n, device=dev)
        cut = torch.zeros(n, 4, dtype=torch.long, device=dev)
    return PhotoDraw(box, flipped, jitter, partner, lam, cut)


def resized_crop(x: Tensor, box: Tensor, flipped: Tensor, size: tuple[int, int]) -> Tensor:
    """Each image's box (top, left, height, width) resized to `size` (bilinear, as F.interpolate with
    align_corners False samples it) and mirrored where `flipped`: one grid_sample for the batch."""
    n, _, h, w = x.shape
    top, left, ch, cw = box.to(x.dtype).unbind(-1)  # (N,) each
    ys = _source_coords(ch, size[0]) + top[:, None]  # (N, H_out) rows sampled in the stored image
    xs = _source_coords(cw, size[1]) + left[:, None]  # (N, W_out)
    xs = torch.where(flipped.to(x.device)[:, None], xs.flip(1), xs)
    gx = (2 * xs / (w - 1) - 1)[:, None, :].expand(n, size[0], size[1])  # (N, H_out, W_out), in [-1, 1]
    gy = (2 * ys / (h - 1) - 1)[:, :, None].expand(n, size[0], size[1])
    grid = torch.stack([gx, gy], -1)  # (N, H_out, W_out, 2): x then y, as grid_sample reads it
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


def _source_coords(extent: Tensor, out: int) -> Tensor:
    """(N, out) coordinates inside a crop of `extent` pixels that F.interpolate (bilinear, align_corners False)
    reads for each output pixel: (i + ½)·extent/out − ½, clamped to the crop's first and last pixel."""
    i = torch.arange(out, device=extent.device, dtype=extent.dtype) + 0.5
    coords = i[None, :] * (extent / out)[:, None] - 0.5
    return torch.minimum(coords.clamp_min(0), (extent - 1)[:, None])


def color(x: Tensor, factors: Tensor) -> Tensor:
    """Brightness, contrast, then saturation as torchvision's adjust_* (factors (N, 3)); grey images skip
    saturation. Each step blends with a reference (black, the image's mean grey, its grey image) and clamps to
    [0, 1]. A new tensor (x is left alone), then worked on in place: at 224 px a batch is 77 MB a copy."""
    b, c, s = (factors[:, i].to(x.dtype)[:, None, None, None] for i in range(3))  # (N, 1, 1, 1) each
    x = (b * x).clamp_(0, 1)
    grey_mean = (x.mean(dim=(2, 3)) * grey_weights(x)).sum(1)[:, None, None, None]  # mean grey, (N, 1, 1, 1)
    x = x.mul_(c).add_((1 - c) * grey_mean).clamp_(0, 1)
    if x.shape[1] == 3:
        grey = _grey(x).mul_(1 - s)  # before x changes in place
        x = x.mul_(s).add_(grey).clamp_(0, 1)
    return x


def _grey(x: Tensor) -> Tensor:
    """(N, 1, H, W) grey of RGB images: 0.2989 r + 0.587 g + 0.114 b, as rgb_to_grayscale."""
    r, g, b = x.unbind(1)
    return (r * GREY[0]).add_(g * GREY[1]).add_(b * GREY[2]).unsqueeze(1)


def _pastes_box_by_box(x: Tensor) -> bool:
    """Cutmix boxes pasted one slice at a time on the CPU; on a GPU a mask instead (.tolist() would sync)."""
    return x.device.type == "cpu"


def mix_(x: Tensor, partner: Tensor, lam: Tensor, cut: Tensor) -> Tensor:
    """In place on x, and returned: mixup λ·x + (1 − λ)·partner, or, where the cutmix box has a height, the partner
    pasted into it. In place because at 160 px a batch is 39 MB a copy: the out-of-place form (a blend, a paste and
    a choice between them, each a new batch) cost 86 ms a batch of 128 here, more than the crops it mixes."""
    _, _, h, w = x.shape
    is_cut = cut[:, 2] > 0
    lam4 = torch.where(is_cut, 1.0, lam.to(x.dtype))[:, None, None, None]  # (N, 1, 1, 1): cutmix rows stay x here
    x.mul_(lam4).add_(partner * (1 - lam4))
    if _pastes_box_by_box(x):  # only the boxes' pixels are touched
        for i, (top, left, ch, cw) in enumerate(cut.tolist()):
            if ch > 0:
                x[i, :, top : top + ch, left : left + cw] = partner[i, :, top : top + ch, left : left + cw]
        return x
    top, left, ch, cw = cut.long().unbind(-1)
    rows = torch.arange(h, device=x.device)[None, :]  # (1, H)
    cols = torch.arange(w, device=x.device)[None, :]
    inside = (((rows >= top[:, None]) & (rows < (top + ch)[:, None]))[:, :, None]
              & ((cols >= left[:, None]) & (cols < (left + cw)[:, None]))[:, None, :])  # (N, H, W), empty unless cut
    return torch.where(inside[:, None], partner, x, out=x)


def render(x: Tensor, partner_x: Tensor | None, d: PhotoDraw, jitter: bool = True) -> Tensor:
    """The views `d` of images x (N, C, H, W), uint8 or float in [0, 1]: crop + flip, colour, then the mix with
    partner_x (the partners' images, same dtype, given the same crop, flip and colour; None without mixing). Same
    size out, float32 in [0, 1]. uint8 on the CPU renders with render_uint8, anything else with one grid_sample."""
    size = tuple(x.shape[-2:])
    both = x if partner_x is None else torch.cat([x, partner_x])  # (N or 2N, C, H, W): one resampling for all
    twice = (lambda t: t) if partner_x is None else (lambda t: torch.cat([t, t]))
    if both.dtype == torch.uint8 and both.device.type == "cpu":
        out = render_uint8(both, twice(d.box), twice(d.flipped), twice(d.jitter) if jitter else None, size)
    else:
        both = to_float(both) if both.dtype == torch.uint8 else both
        out = resized_crop(both, twice(d.box), twice(d.flipped), size)
        out = color(out, twice(d.jitter)) if jitter else out
    if partner_x is None:
        return out
    own, other = out.chunk(2)
    return mix_(own, other, d.lam, d.cut)  # own: a chunk of render's fresh output


def mixed_targets(y: Tensor, y_partner: Tensor, lam: Tensor, num_classes: int) -> Tensor:
    """(N, K) float32 soft labels λ·onehot(y) + (1 − λ)·onehot(y_partner), for the CE term."""
    lam = lam.float()[:, None]
    return lam * F.one_hot(y, num_classes).float() + (1 - lam) * F.one_hot(y_partner, num_classes).float()


def augment(x: Tensor, y: Tensor, recipe: AugmentParams, gen: torch.Generator, num_classes: int | None,
            flip: bool) -> tuple[Tensor, Tensor]:
    """A training batch as the recipe draws it (partners from the batch itself) from images x (uint8, or float in
    [0, 1]): (float32 images, labels), the labels mixed (N, K) when the recipe mixes, else y itself."""
    d = draw(len(x), x.shape[-2], x.shape[-1], recipe, gen, flip=flip)
    jitters = any(s > 0 for s in recipe.color_jitter)
    if not mixes(recipe):
        return render(x, None, d, jitters), y
    if num_classes is None:
        raise ValueError("mixup/cutmix: the model must say its num_classes to mix labels")
    out = render(x, x[d.partner], d, jitters)
    return out, mixed_targets(y, y[d.partner], d.lam, num_classes)
