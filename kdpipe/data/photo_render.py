"""The CPU's photo rendering on uint8 images (kdpipe.data.photo_aug.render calls it for uint8 batches on the CPU).

Each crop box is resized straight to the output size by torch's uint8 bilinear kernel (F.interpolate on a uint8
image, antialiased where it shrinks: what torchvision's resized_crop does to a uint8 image), flipped, and only then
turned into float32 for the colour jitter: a few images at a time (CHUNK_BYTES of output, which stays in cache),
each chunk by one worker thread running torch single-threaded (torch's uint8 resize does not split one small
image across threads; two images at once do). Figures of each lever: docs/speed.md, bench/augment.py --levers.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import Tensor

GREY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
CHUNK_BYTES = 4 << 20  # float32 output rendered per task: 4 MiB measured best of 0.5-8 (bench/augment.py --levers)
RECYCLE_BYTES = 32 << 20  # outputs this large reuse a released buffer (glibc returns them to the OS on free)


def render_uint8(x: Tensor, box: Tensor, flipped: Tensor, factors: Tensor | None, size: tuple[int, int]) -> Tensor:
    """uint8 images x (N, C, H, W) on the CPU -> float32 (N, C, *size): each box resized to `size` (uint8 bilinear,
    antialiased where it shrinks), mirrored where `flipped`, then colour (`factors` (N, 3), None: none) in float.
    Chunks of CHUNK_BYTES of output, each rendered whole by one worker thread; every image is computed alone, in
    one thread, so its result does not depend on the batch around it or the thread count (cached views replay)."""
    n, c = x.shape[:2]
    out = _output((n, c, *size))
    boxes, flips = box.tolist(), flipped.tolist()
    step = max(1, CHUNK_BYTES // (c * size[0] * size[1] * 4))
    inference = torch.is_inference_mode_enabled()  # thread-local: the workers take the caller's

    def work(start: int) -> None:
        rows = slice(start, min(start + step, n))
        with torch.inference_mode(inference):
            crops = _resize_chunk(x[rows], boxes[rows], flips[rows], size)
            _colour_into(crops, None if factors is None else factors[rows], out[rows])

    list(_workers().map(work, range(0, n, step)))  # list(): a worker's exception is raised here
    return out


def _resize_chunk(x: Tensor, boxes: list, flips: list, size: tuple[int, int]) -> Tensor:
    """(k, C, *size) uint8: image j's box (top, left, height, width) resized as torchvision's resized_crop does a
    uint8 image (F.interpolate, bilinear, antialias, align_corners False: torch's uint8 kernel), then flipped."""
    crops = torch.empty(len(boxes), x.shape[1], *size, dtype=torch.uint8)
    for j, ((top, left, h, w), flip) in enumerate(zip(boxes, flips, strict=True)):
        one = F.interpolate(x[j : j + 1, :, top : top + h, left : left + w], size=size, mode="bilinear",
                            antialias=True, align_corners=False)
        crops[j : j + 1] = one.flip(-1) if flip else one
    return crops


def _colour_into(crops: Tensor, factors: Tensor | None, out: Tensor) -> Tensor:
    """`out` (k, C, H, W) float32 = crops / 255, then brightness, contrast and saturation as `color` applies them,
    each step in place on the chunk (cache-resident: ten passes over a few MiB, not over the batch)."""
    if factors is None:
        return out.copy_(crops).div_(255.0)
    b, c, s = (factors[:, i].to(torch.float32)[:, None, None, None] for i in range(3))  # (k, 1, 1, 1) each
    x = out.copy_(crops).mul_(b / 255.0).clamp_(max=1)  # brightness: b·x, clamped (x ≥ 0 and b ≥ 0)
    grey_mean = (x.mean(dim=(2, 3)) * grey_weights(x)).sum(1)[:, None, None, None]  # (k, 1, 1, 1)
    x.mul_(c).add_((1 - c) * grey_mean).clamp_(0, 1)
    if x.shape[1] == 3:
        grey = (x[:, 0:1] * GREY[0]).add_(x[:, 1:2], alpha=GREY[1]).add_(x[:, 2:3], alpha=GREY[2]).mul_(1 - s)
        x.mul_(s).add_(grey).clamp_(0, 1)
    return x


# Process-wide, created on first use: a pool of worker threads (one per torch thread, each running torch single-
# threaded: torch's uint8 resize does not split one small image across threads, two images at once do), and the
# large outputs kept for reuse. Both are rebuilt in a forked child (its threads did not survive the fork).
_POOL: dict = {}
_SPARE: dict[int, list] = {}  # output bytes -> storages handed out before


def _workers() -> ThreadPoolExecutor:
    n, pid = torch.get_num_threads(), os.getpid()
    if _POOL.get("key") != (n, pid):
        old = _POOL.get("pool")
        if old is not None and _POOL["key"][1] == pid:
            old.shutdown(wait=False)
        started = threading.Barrier(n)
        pool = ThreadPoolExecutor(n, thread_name_prefix="kdpipe-photo", initializer=torch.set_num_threads,
                                  initargs=(1,))
        list(pool.map(lambda _: started.wait(), range(n)))  # all n threads started, each set to one torch thread
        torch.set_num_threads(n)  # the workers' call also set the default new threads start with: restored
        _POOL.update(key=(n, pid), pool=pool)
    return _POOL["pool"]


def _output(shape: tuple[int, ...]) -> Tensor:
    """An uninitialised float32 tensor of `shape`. Above RECYCLE_BYTES, a buffer handed out before when nothing
    holds it any more (no tensor or view left on its storage): a fresh 77 MB batch costs its page faults every
    step (a 224 px batch of 128: more than the rendering), a reused one none. At most two kept per size."""
    nbytes = math.prod(shape) * 4
    if nbytes < RECYCLE_BYTES:
        return torch.empty(shape)
    if _POOL.get("spare_pid") != os.getpid():
        _SPARE.clear()
        _POOL["spare_pid"] = os.getpid()
    spares = _SPARE.setdefault(nbytes, [])
    free = next((s for s in spares if torch._C._storage_Use_Count(s._cdata) == 1), None)
    if free is None:
        free = torch.empty(shape).untyped_storage()
        if len(spares) < 2:
            spares.append(free)
    return torch.empty(0).set_(free, 0, shape)  # contiguous


def grey_weights(x: Tensor) -> Tensor:
    return torch.tensor(GREY if x.shape[1] == 3 else (1.0,), dtype=x.dtype, device=x.device)
