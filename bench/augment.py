"""Photo augmentation speed: kdpipe's batched `resized_crop` (kdpipe.data.photo_aug: one grid_sample and a few
tensor ops for the whole batch, where the training step runs) against torchvision transforms.v2 applied image by
image in a DataLoader (0 and 2 worker processes), on the same crops, flips and colour factors, at 32, 96 and
224 px.

Both sides do the same work on the same draws: a random-resized crop (scale 0.08-1, ratio 3/4-4/3) resized back to
the stored size, a horizontal flip, then brightness, contrast and saturation (0.4 each). The draws are made once
by photo_aug.draw; the per-sample side applies them with transforms.v2.functional (resized_crop with
antialiasing, horizontal_flip, adjust_*) to each uint8 image and collates float batches, as a torchvision
pipeline would; the batched side takes the uint8 batch (as the training loop cuts it from the device) and does
to_float + render. Their outputs are compared on the first batch (max |Δ| reported). Each figure: images per
second over a full pass after a warm-up pass, the best of `repeats` passes. `torch` intra-op threads: the
machine's default for the batched side (it runs in the training process; `--threads` sets them); each
DataLoader worker uses one. The per-sample side crops the uint8 image (torchvision's fast path) and rounds it,
so the two differ by up to ~1/100 (max_abs_diff); tests/test_photo_aug.py checks the float crop to 2e-6.

Writes bench/results/augment.json; `--quick` runs a few hundred images at each size into bench/work/augment/
(a smoke test: results untouched). `--device cuda` runs the batched side on a GPU (the loader stays on CPU, and
its batches are copied there, as training would). Run from the repo root: `make bench-augment`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
QUICK_OUT = BENCH / "work" / "augment"
SIZES = (32, 96, 224)
BATCH = 128
IMAGES = {32: 8192, 96: 4096, 224: 1024}  # per pass: a few seconds of the per-sample side each
QUICK_IMAGES = 256


def recipe():
    from kdpipe.config import StudentConfig

    return StudentConfig(model="tiny_cnn", augment="resized_crop", crop_padding=0, flip=True,
                         crop_scale=(0.08, 1.0), color_jitter=(0.4, 0.4, 0.4))


class PerSample(torch.utils.data.Dataset):
    """Image i as torchvision v2 transforms it, one image at a time, with the draws of `d` (photo_aug.PhotoDraw)."""

    def __init__(self, images: torch.Tensor, d):
        self.images, self.d = images, d

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        img, size = self.images[i], list(self.images.shape[-2:])
        top, left, h, w = self.d.box[i].tolist()
        img = TF.resized_crop(img, top, left, h, w, size, antialias=True)
        if self.d.flipped[i]:
            img = TF.horizontal_flip(img)
        img = TF.to_dtype(img, torch.float32, scale=True)  # colour on floats, as the batched side does
        b, c, s = self.d.jitter[i].tolist()
        return TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(img, b), c), s)


def per_sample_rate(images: torch.Tensor, d, workers: int, repeats: int) -> tuple[float, torch.Tensor]:
    """Images/s of a DataLoader over PerSample (batches of BATCH, persistent workers), and its first batch."""
    loader = torch.utils.data.DataLoader(PerSample(images, d), batch_size=BATCH, num_workers=workers,
                                         persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
    first = next(iter(loader))
    for _ in loader:  # warm-up pass: workers started, caches warm
        pass
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in loader:
            pass
        best = max(best, len(images) / (time.perf_counter() - t0))
    return best, first


def batched_rate(images: torch.Tensor, d, device: torch.device, repeats: int) -> tuple[float, torch.Tensor]:
    """Images/s of to_float + photo_aug.render over the images in batches of BATCH on `device`, and the first."""
    from kdpipe.data.batches import to_float
    from kdpipe.data.photo_aug import render

    images, d = images.to(device), d.to(device)

    def one_pass() -> torch.Tensor:
        out = None
        for start in range(0, len(images), BATCH):
            rows = slice(start, start + BATCH)
            batch = render(to_float(images[rows]), None, d.select(rows), jitter=True)
            out = batch if out is None else out
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    first = one_pass()
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        one_pass()
        best = max(best, len(images) / (time.perf_counter() - t0))
    return best, first.cpu()


def one_size(size: int, n: int, device: torch.device, repeats: int) -> dict:
    from kdpipe.data.photo_aug import draw

    gen = torch.Generator().manual_seed(size)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)
    d = draw(n, size, size, recipe(), gen, flip=True)
    batched, first = batched_rate(images, d, device, repeats)
    row = {"images": n, "batched_img_s": round(batched, 1)}
    for workers in (0, 2):
        rate, reference = per_sample_rate(images, d, workers, repeats)
        row[f"per_sample_w{workers}_img_s"] = round(rate, 1)
        row[f"speedup_vs_w{workers}"] = round(batched / rate, 2)
        row["max_abs_diff"] = float((reference - first).abs().max())
    print(f"[bench] {size} px: {json.dumps(row)}", file=sys.stderr, flush=True)
    return row


def machine(device: torch.device) -> dict:
    facts = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
             "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
    return facts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_IMAGES} images a size, into {QUICK_OUT}")
    parser.add_argument("--device", default="cpu", help="where the batched side runs (cpu, cuda)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per figure (best kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the batched side (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    repeats = 1 if args.quick else args.repeats
    rows = {str(s): one_size(s, QUICK_IMAGES if args.quick else IMAGES[s], device, repeats) for s in SIZES}
    out = {"what": "images/s of batched resized_crop + flip + colour jitter vs torchvision v2 per sample in a "
                   "DataLoader, same draws", "batch_size": BATCH, "quick": args.quick,
           "recipe": recipe().model_dump(include={"crop_scale", "crop_ratio", "flip", "color_jitter"}, mode="json"),
           "sizes": rows, "machine": machine(device)}
    folder = QUICK_OUT if args.quick else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "augment.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
