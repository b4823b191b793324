"""Photo augmentation speed: kdpipe's batched `resized_crop` (kdpipe.data.photo_aug, where the training step runs)
against torchvision transforms.v2 applied image by image in a DataLoader (0 and 2 worker processes), on the same
crops, flips and colour factors, at 32, 96, 160 and 224 px. kdpipe is measured two ways, side by side in one run:
`uint8` (the default on a CPU: photo_aug.render on the uint8 batch, each box resized straight to the output size
by torch's uint8 kernel, colour on the result in chunks, one worker thread per torch thread) and `float` (the path
before it and still the GPU's: to_float, then one grid_sample and colour over the whole float batch).

Both sides do the same work on the same draws: a random-resized crop (scale 0.08-1, ratio 3/4-4/3) resized back to
the stored size, a horizontal flip, then brightness, contrast and saturation (0.4 each). The draws are made once by
photo_aug.draw; the per-sample side applies them with transforms.v2.functional (resized_crop with antialiasing,
horizontal_flip, to_dtype, adjust_*) to each uint8 image and collates float batches, as a torchvision pipeline
would (its main process does not touch the batches it receives); kdpipe's side takes the uint8 batch and writes a
float32 batch. Outputs are compared on the first batch (max |Δ| of each pair). Each figure: images per second over
a full pass after a warm-up pass, the median of `--rounds` passes. torch intra-op threads: the machine's default
for kdpipe's side (it runs in the training process; `--threads` sets them); each DataLoader worker uses one.

`--levers` adds, at 96, 160 and 224 px, the uint8 path with one lever changed at a time (one worker thread,
output buffers not reused, other chunk sizes, a channels_last uint8 source), each against the default in the
same run. `--cpu-profile avx2` runs it all with torch's kernels capped at AVX2 (kdpipe.run.kernels.PROFILES).
Writes bench/results/augment.json (each profile's run kept whole under `profiles`); `--quick` runs a few hundred
images at each size into bench/work/augment/ (a smoke test: results untouched). `--device cuda` runs the float
path on a GPU (the loader stays on CPU). Run from the repo root: `make bench-augment` (under
`flock -x /tmp/kdpipe-cpu.lock` on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
QUICK_OUT = BENCH / "work" / "augment"
SIZES = (32, 96, 160, 224)
LEVER_SIZES = (96, 160, 224)
BATCH = 128
IMAGES = {32: 8192, 96: 4096, 160: 2048, 224: 1024}  # per pass: a few seconds of the per-sample side each
QUICK_IMAGES = 256
CHUNKS_MIB = (0.5, 1, 4, 8)  # besides photo_render.CHUNK_BYTES


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
        return torchvision_view(self.images[i], self.d.box[i], self.d.flipped[i], self.d.jitter[i])


def torchvision_view(img: torch.Tensor, box: torch.Tensor, flipped: torch.Tensor, jitter: torch.Tensor | None
                     ) -> torch.Tensor:
    """One uint8 image (C, H, W) as torchvision v2 renders one view's draws: resized_crop of `box` (top, left,
    height, width; antialiased) back to H × W, the flip, float32, then brightness, contrast and saturation by the
    factors `jitter` (3,) (None: no colour)."""
    from torchvision.transforms.v2 import functional as TF

    top, left, h, w = box.tolist()
    img = TF.resized_crop(img, top, left, h, w, list(img.shape[-2:]), antialias=True)
    if flipped:
        img = TF.horizontal_flip(img)
    img = TF.to_dtype(img, torch.float32, scale=True)  # colour on floats, as the batched side does
    if jitter is None:
        return img
    b, c, s = jitter.tolist()
    return TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(img, b), c), s)


def timed(one_pass, n: int, rounds: int) -> float:
    """Median images/s of `rounds` calls of one_pass() (n images each), after one untimed call."""
    one_pass()
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        one_pass()
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def per_sample_rate(images: torch.Tensor, d, workers: int, rounds: int) -> tuple[float, torch.Tensor]:
    """Images/s of a DataLoader over PerSample (batches of BATCH, persistent workers), and its first batch."""
    loader = torch.utils.data.DataLoader(PerSample(images, d), batch_size=BATCH, num_workers=workers,
                                         persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
    first = next(iter(loader))

    def one_pass():
        for _ in loader:
            pass

    return timed(one_pass, len(images), rounds), first


def batched_rate(images: torch.Tensor, d, device: torch.device, rounds: int, path: str) -> tuple[float, torch.Tensor]:
    """Images/s of photo_aug.render over the images in batches of BATCH on `device`, and the first batch. `path`
    uint8: render takes the uint8 batch; float: to_float first (the grid_sample path)."""
    from kdpipe.data.batches import to_float
    from kdpipe.data.photo_aug import render

    images, d = images.to(device), d.to(device)
    prepare = to_float if path == "float" else (lambda x: x)
    first = render(prepare(images[:BATCH]), None, d.select(slice(0, BATCH)), jitter=True).cpu()

    def one_pass():
        for start in range(0, len(images), BATCH):
            rows = slice(start, start + BATCH)
            render(prepare(images[rows]), None, d.select(rows), jitter=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return timed(one_pass, len(images), rounds), first


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def one_size(size: int, n: int, device: torch.device, rounds: int) -> dict:
    from kdpipe.data.photo_aug import draw

    gen = torch.Generator().manual_seed(size)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)
    d = draw(n, size, size, recipe(), gen, flip=True)
    row, outs = {"images": n}, {}
    for path in ("uint8", "float") if device.type == "cpu" else ("float",):
        row[f"{path}_img_s"], outs[path] = batched_rate(images, d, device, rounds, path)
        row[f"{path}_img_s"] = round(row[f"{path}_img_s"], 1)
    for workers in (0, 2):
        rate, outs["torchvision"] = per_sample_rate(images, d, workers, rounds)
        row[f"per_sample_w{workers}_img_s"] = round(rate, 1)
        for path in ("uint8", "float"):
            if path in outs:
                row[f"{path}_speedup_vs_w{workers}"] = round(row[f"{path}_img_s"] / rate, 2)
    paths = [p for p in ("uint8", "float") if p in outs]
    row["max_abs_diff"] = {f"{p}_vs_torchvision": max_diff(outs[p], outs["torchvision"]) for p in paths}
    if len(paths) == 2:
        row["max_abs_diff"]["uint8_vs_float"] = max_diff(outs["uint8"], outs["float"])
    print(f"[bench] {size} px: {json.dumps(row)}", file=sys.stderr, flush=True)
    return row


def levers(size: int, n: int, rounds: int) -> dict:
    """The uint8 path's images/s with one lever changed at a time, beside the default, in this one run."""
    from kdpipe.data import photo_aug, photo_render

    gen = torch.Generator().manual_seed(size)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)
    d = photo_aug.draw(n, size, size, recipe(), gen, flip=True)
    threads, chunk, recycle = torch.get_num_threads(), photo_render.CHUNK_BYTES, photo_render.RECYCLE_BYTES

    def rate(source: torch.Tensor) -> float:
        def one_pass():
            for s in range(0, n, BATCH):  # each batch dropped before the next, as a training step drops it
                photo_aug.render(source[s : s + BATCH], None, d.select(slice(s, s + BATCH)))

        return timed(one_pass, n, rounds)

    row = {"default": rate(images)}
    torch.set_num_threads(1)
    row["one_worker_thread"] = rate(images)
    torch.set_num_threads(threads)
    photo_render.RECYCLE_BYTES = 1 << 62
    row["no_buffer_reuse"] = rate(images)
    photo_render.RECYCLE_BYTES = recycle
    for mib in CHUNKS_MIB:
        photo_render.CHUNK_BYTES = int(mib * (1 << 20))
        row[f"chunk_{mib}_mib"] = rate(images)
    photo_render.CHUNK_BYTES = chunk
    row["channels_last_source"] = rate(images.contiguous(memory_format=torch.channels_last))
    out = {k: {"img_s": round(v, 1), "vs_default": round(v / row["default"], 2)} for k, v in row.items()}
    print(f"[bench] levers {size} px: {json.dumps(out)}", file=sys.stderr, flush=True)
    return out


def machine(device: torch.device, profile: str) -> dict:
    from kdpipe.data import photo_render
    from kdpipe.run.kernels import profile_env

    facts = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
             "torch": torch.__version__, "device": str(device), "cpu_profile": profile,
             "cpu_profile_env": profile_env(profile), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
             "chunk_bytes": photo_render.CHUNK_BYTES, "recycle_bytes": photo_render.RECYCLE_BYTES}
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
    return facts


def under_profile(profile: str) -> None:
    """Re-run this script with CPU profile `profile`'s kernel caps (and no others) unless they are already set:
    ATen reads them once, at its first kernel."""
    from kdpipe.run.kernels import KNOBS, profile_env

    wanted = profile_env(profile)
    if all(os.environ.get(k) == wanted.get(k) for k in KNOBS):
        return
    env = {**{k: v for k, v in os.environ.items() if k not in KNOBS}, **wanted}
    os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], env)


def with_profile(out: Path, profile: str, result: dict) -> dict:
    """The results file `out` with this run as its `profiles[profile]` block, the other profiles' as they were."""
    kept = json.loads(out.read_text()).get("profiles", {}) if out.is_file() else {}
    return {"profiles": {**kept, profile: result}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_IMAGES} images a size, into {QUICK_OUT}")
    parser.add_argument("--device", default="cpu", help="where kdpipe's side runs (cpu, cuda)")
    parser.add_argument("--rounds", type=int, default=3, help="timed passes per figure (the median kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of kdpipe's side (default: torch's)")
    parser.add_argument("--cpu-profile", default="native", choices=("native", "avx2"))
    parser.add_argument("--levers", action="store_true", help="the uint8 path's levers one at a time")
    args = parser.parse_args()
    under_profile(args.cpu_profile)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rounds = 1 if args.quick else args.rounds
    count = (lambda s: QUICK_IMAGES) if args.quick else IMAGES.get
    rows = {str(s): one_size(s, count(s), device, rounds) for s in SIZES}
    result = {"what": "images/s of kdpipe's batched resized_crop + flip + colour jitter (uint8 and float paths) vs "
                      "torchvision v2 per sample in a DataLoader, same draws; median of rounds",
              "batch_size": BATCH, "rounds": rounds, "quick": args.quick,
              "recipe": recipe().model_dump(include={"crop_scale", "crop_ratio", "flip", "color_jitter"}, mode="json"),
              "sizes": rows, "machine": machine(device, args.cpu_profile)}
    if args.levers and device.type == "cpu":
        result["levers"] = {str(s): levers(s, count(s), rounds) for s in LEVER_SIZES}
    folder = QUICK_OUT if args.quick else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "augment.json"
    out.write_text(json.dumps(with_profile(out, args.cpu_profile, result), indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
