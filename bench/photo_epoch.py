"""The photo recipe's distill epoch, end to end: kdpipe's step (the uint8 batch rendered in the training process,
photo_aug.render) against the same step fed by torchvision transforms in a 2-worker DataLoader (issue 35 item 3).

The recipe is bench/recipes/photos.yaml's student and distill sections as they are: tv:mobilenet_v3_small at the
stored 160 px, AdamW, cosine, random-resized crop (35-100 %) + flip + colour jitter 0.2, mixup 0.2 / cutmix 1.0,
KD at T = 1 from 8 cached teacher views per photo (distill.teacher_views: 8, FKD). The views are labelled once
before the clock (by an untrained tiny_cnn: what the teacher is changes the logits, not the epoch's work), so an
epoch is what every epoch of that distill stage does: each photo as one of its 8 views, its cached logits, the
student's forward, backward and AdamW step. Both sides share one _Trainer (the same student weights, optimizer,
loss, batch order); only where the views' pixels come from differs:

  kdpipe       the trainer's own epoch (train_epoch): index batches cut from the uint8 split, TeacherViews.augment
               renders each batch's views (crop, flip, colour, then the mix with its partner) in one batched call
  torchvision  a DataLoader (num_workers 2, persistent, prefetch 4) over the same (photo, view) rows and batch order,
               each view rendered image by image with torchvision.transforms.v2.functional (resized_crop with
               antialiasing, horizontal_flip, to_dtype, adjust_brightness/contrast/saturation; the partner likewise,
               then the mixup blend or cutmix paste), collated; the trainer steps on the collated float batch
  kdpipe_ahead kdpipe's render of batch i + 1 in a background thread while the trainer steps on batch i
  kdpipe_fp32  kdpipe's epoch with runtime.precision fp32 (against `auto`, which is bf16 on a CPU with native bf16)

Both sides render the same draws; their first batches are compared (max |difference|). The photos are generated
(smooth random colour fields, deterministic): 1,536 of 160 × 160, 10 classes, so an epoch is 12 steps of 128.
Each (side, round) runs in its own process: imports, photos, models and the views' labelling before the clock,
then `--warmup` untimed epochs and `--epochs` timed ones (wall time per epoch, and process CPU time: the loader's
workers are other processes, so the torchvision side's CPU share is its main process's). The side order rotates
each round; each side's ratios (torchvision's epoch seconds / its own, and kdpipe's / its own) are taken within a
round and reported as {median, min, max}. On a 2-core machine the DataLoader's workers share the cores with the training
step, as they would for a user training on that CPU.

    python bench/photo_epoch.py                       # native; bench/results/photo_epoch.json, a markdown table
    python bench/photo_epoch.py --cpu-profile avx2    # the AVX2 profile, kept beside native under `profiles`
    python bench/photo_epoch.py --quick               # 256 photos, 1 round: a smoke test into bench/work/
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))  # kdpipe from this checkout
RESULTS = BENCH / "results" / "photo_epoch.json"
QUICK_OUT = BENCH / "work" / "photo_epoch.json"
RECIPE = BENCH / "recipes" / "photos.yaml"
SIDES = ("kdpipe", "torchvision", "kdpipe_ahead", "kdpipe_fp32")
CLASSES, SIZE, WORKERS, PREFETCH = 10, 160, 2, 4


def recipe():
    """(student, distill) sections of the photo recipe, validated as the pipeline validates them."""
    import yaml

    from kdpipe.config import from_dict

    cfg = from_dict(yaml.safe_load(RECIPE.read_text()))
    return cfg.student, cfg.distill


def make_photos(n: int, size: int, seed: int = 0):
    """n smooth random colour fields (uint8 (n, 3, size, size)) and labels 0..CLASSES-1: photo-like statistics
    (neighbouring pixels correlated, every value used) without shipping photos."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, size // 16, size // 16, generator=gen)
    fine = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    noise = torch.rand(n, 3, size, size, generator=gen) * 0.15
    x = ((fine + noise).clamp(0, 1) * 255).round().to(torch.uint8)
    return x, torch.arange(n) % CLASSES


class ViewsPerSample:
    """Map-style dataset over flat rows r = i·K + v: photo i's view v as torchvision renders it, one at a time,
    from the cached draws; yields (r, float32 image, soft label) as TeacherViews.augment's batch holds them."""

    def __init__(self, images, labels, views):
        self.images, self.labels, self.views = images, labels, views

    def __len__(self) -> int:
        return len(self.images) * self.views.k

    def render(self, img, d):
        from augment import torchvision_view

        return torchvision_view(img, d.box, d.flipped, d.jitter if self.views.jitters else None)

    def __getitem__(self, r: int):
        import torch
        import torch.nn.functional as F

        i, v = divmod(r, self.views.k)
        d = self.views.photo.select(i, v)
        x = self.render(self.images[i], d)
        y = F.one_hot(self.labels[i], CLASSES).float()
        if self.views.mixes:
            partner = int(d.partner)
            p, lam = self.render(self.images[partner], d), float(d.lam)
            top, left, ch, cw = (int(t) for t in d.cut)
            if ch > 0:  # cutmix: the partner's pixels inside the box
                x = x.clone()
                x[:, top : top + ch, left : left + cw] = p[:, top : top + ch, left : left + cw]
            else:  # mixup
                x = lam * x + (1 - lam) * p
            y = lam * y + (1 - lam) * F.one_hot(self.labels[partner], CLASSES).float()
        return torch.tensor(r), x, y


class EpochRows:
    """Batch sampler: the trainer's batches and views, drawn as its own epoch draws them: the order from its
    shuffle generator (engine._batches), each photo's view from its augmentation generator (as
    TeacherViews.augment draws it), as flat rows i·K + v. It runs in the main process, so the draws are the
    trainer's, in order, however far ahead the loader prefetches."""

    def __init__(self, n: int, k: int, batch_size: int, shuffle_gen, aug_gen):
        self.n, self.k, self.batch_size, self.shuffle_gen, self.aug_gen = n, k, batch_size, shuffle_gen, aug_gen

    def __iter__(self):
        import torch

        from kdpipe.train.engine import _batches

        for idx in _batches(torch.arange(self.n), self.batch_size, self.shuffle_gen):
            v = torch.randint(self.k, (len(idx),), generator=self.aug_gen, device=self.aug_gen.device)
            yield (idx * self.k + v.cpu()).tolist()

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)


def build(args, precision: str | None = None):
    """(trainer, train split, cached views, runtime): the views labelled, the student ready to step; `precision`
    in place of args.precision (the kdpipe_fp32 side)."""
    import torch

    from kdpipe.data.batches import Split
    from kdpipe.distill.views import label_photo_views
    from kdpipe.models.zoo import build_model
    from kdpipe.run.runtime import make_runtime
    from kdpipe.train.distiller import distill_loss, fold_batchnorm, freeze
    from kdpipe.train.engine import _Trainer
    from kdpipe.train.objective import Objective

    student_cfg, distill_cfg = recipe()
    rt = make_runtime(device="cpu", precision=precision or args.precision)
    images, labels = make_photos(args.images, SIZE)
    torch.manual_seed(0)
    teacher = rt.prepare(fold_batchnorm(freeze(build_model("tiny_cnn", 3, CLASSES))))
    views = label_photo_views(teacher, images, distill_cfg.teacher_views, student_cfg, seed=0, rt=rt).to(rt.device)
    train = Split(images.to(rt.device), labels.to(rt.device))
    torch.manual_seed(1)
    student = rt.prepare(build_model(student_cfg.model, 3, CLASSES))
    weights = distill_cfg.resolved_weights()
    loss_fn = distill_loss(distill_cfg, teacher, weights=weights, cached_logits=views.flat_logits(),
                           label_smoothing=student_cfg.label_smoothing)
    trainer = _Trainer.build(student, student_cfg, rt, seed=0,
                             objective=Objective(loss_fn=loss_fn, augment=views.reading(train).augment))
    return trainer, train, views, rt


def prerendered(trainer):
    """The trainer set to step on batches rendered elsewhere (its augment the identity); returns its own augment."""
    render = trainer.augment
    trainer.augment = lambda x, rows, y, gen: (x, rows, y)
    return render


def stepping(trainer, batches, n_batches: int, e: int) -> float:
    """Epoch e of the trainer over rendered (rows, x, y) batches, as train_epoch steps (lr per step from
    lr_factor); the summed loss, one host sync per epoch as there."""
    import torch

    from kdpipe.train.engine import lr_factor

    cfg = trainer.cfg
    for m in trainer.modules:
        m.train()
    total = torch.zeros(())
    for i, (rows, x, y) in enumerate(batches):
        _, _, parts = trainer.step(rows, x, y, cfg.lr * lr_factor(e + i / n_batches, cfg))
        total += parts["loss"].detach().float()
    return float(total)


def torchvision_epoch(trainer, train, views):
    """An epoch function stepping the trainer on batches a 2-worker DataLoader renders (ViewsPerSample)."""
    import math

    import torch

    dataset = ViewsPerSample(train.x, train.y, views)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=EpochRows(len(train), views.k, trainer.cfg.batch_size,
                                                                          trainer.shuffle_gen, trainer.aug_gen),
                                         num_workers=WORKERS, persistent_workers=True, prefetch_factor=PREFETCH)
    prerendered(trainer)  # the loader renders the views
    n_batches = math.ceil(len(train) / trainer.cfg.batch_size)
    return (lambda e: stepping(trainer, loader, n_batches, e)), loader


def ahead_epoch(trainer, train):
    """An epoch function rendering batch i + 1 in a background thread while the trainer steps on batch i (torch's
    kernels release the GIL): the same draws in the same order, one thread ahead."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from kdpipe.train.engine import _batches

    render, ex = prerendered(trainer), ThreadPoolExecutor(1)

    def submit(idx):
        return ex.submit(render, train.x[idx], idx, train.y[idx], trainer.aug_gen)

    def rendered(batches):
        ahead = submit(batches[0])
        for i in range(len(batches)):
            x, rows, y = ahead.result()
            if i + 1 < len(batches):
                ahead = submit(batches[i + 1])
            yield rows, x, y

    def epoch(e: int) -> float:
        batches = list(_batches(torch.arange(len(train)), trainer.cfg.batch_size, trainer.shuffle_gen))
        return stepping(trainer, rendered(batches), len(batches), e)

    return epoch


def first_batches(args) -> float:
    """Max |difference| between the two sides' renderings of one batch of the same (photo, view) rows."""
    import torch

    _, train, views, _ = build(args)
    idx = torch.arange(min(len(train), 128))
    ours, rows, y = views.reading(train).augment(train.x[idx], idx, train.y[idx], torch.Generator().manual_seed(5))
    dataset = ViewsPerSample(train.x, train.y, views)
    theirs = torch.stack([dataset[int(r)][1] for r in rows])
    labels = torch.stack([dataset[int(r)][2] for r in rows])
    return max(float((ours - theirs).abs().max()), float((y - labels).abs().max()))


def run_side(side: str, args) -> dict:
    import resource

    import torch

    torch.set_num_threads(args.threads)
    trainer, train, views, rt = build(args, "fp32" if side == "kdpipe_fp32" else None)
    if side in ("kdpipe", "kdpipe_fp32"):
        pool = torch.arange(len(train))

        def epoch(e: int) -> float:
            return trainer.train_epoch(train, pool, e)["train_loss"]
    elif side == "kdpipe_ahead":
        epoch = ahead_epoch(trainer, train)
    else:
        epoch, _loader = torchvision_epoch(trainer, train, views)
    walls, cpus, losses = [], [], []
    for e in range(args.warmup + args.epochs):
        wall0, cpu0 = time.perf_counter(), time.process_time()
        losses.append(epoch(e))
        walls.append(time.perf_counter() - wall0)
        cpus.append(time.process_time() - cpu0)
    w = args.warmup
    return {"side": side, "epoch_wall_s": walls[w:], "epoch_cpu_s": cpus[w:], "warmup_wall_s": walls[:w],
            "loss_per_epoch": losses, "threads": torch.get_num_threads(), "precision": rt.precision,
            "channels_last": rt.channels_last, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def spawn(what: list[str], args) -> dict:
    """Run this script as a child (`--child ...`) under the chosen CPU profile; its last stdout line is JSON."""
    from speed import profile_environ

    cmd = [sys.executable, __file__, *what, "--images", str(args.images), "--warmup", str(args.warmup),
           "--epochs", str(args.epochs), "--threads", str(args.threads), "--precision", args.precision]
    done = subprocess.run(cmd, env=profile_environ(args.cpu_profile), capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        raise SystemExit(f"photo_epoch: {' '.join(what)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(rounds: list[dict]) -> dict:
    """Each side's median epoch over rounds; against torchvision and against kdpipe (the peer's epoch ÷ this side's,
    within each round) where those sides ran."""
    def med(side):
        return [statistics.median(r[side]["epoch_wall_s"]) for r in rounds]

    out = {side: {"epoch_wall_s_median": statistics.median(med(side)), "per_round": med(side)}
           for side in SIDES if side in rounds[0]}
    for side in out:
        for peer in ("torchvision", "kdpipe"):
            if peer in out and side != peer and not (peer == "kdpipe" and side == "torchvision"):
                ratios = [t / k for t, k in zip(med(peer), med(side), strict=True)]
                out[side][f"{peer}_over_this"] = {"median": statistics.median(ratios), "min": min(ratios),
                                                  "max": max(ratios), "per_round": ratios}
    return out


def benchmark(args) -> dict:
    import torch

    rounds = []
    for r in range(args.rounds):
        order = args.sides[r % len(args.sides):] + args.sides[: r % len(args.sides)]  # rotated each round
        rounds.append({side: spawn(["--child", side], args) for side in order})
    diff = spawn(["--child", "compare"], args)["max_abs_diff"]
    from speed import versions

    return {"work": {"recipe": str(RECIPE.relative_to(REPO)), "images": args.images, "size": SIZE,
                     "classes": CLASSES, "workers": WORKERS, "prefetch_factor": PREFETCH},
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "max_abs_diff_first_batch": diff, "summary": summarise(rounds),
            "rounds": rounds, "machine": {"cpu": platform.processor() or platform.machine(),
                                          "cpus": os.cpu_count(), "torch": torch.__version__, **versions()},
            "reproduce": " ".join(["python bench/photo_epoch.py", *sys.argv[1:]])}


def table(result: dict) -> str:
    rows = ["| side | epoch seconds (median over rounds) | torchvision's epoch / this side's | kdpipe's / this side's |",
            "|---|---:|---:|---:|"]

    def cell(r):
        return f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})" if r else ""

    for side, s in result["summary"].items():
        rows.append(f"| {side} | {s['epoch_wall_s_median']:.2f} | {cell(s.get('torchvision_over_this'))} | "
                    f"{cell(s.get('kdpipe_over_this'))} |")
    return "\n".join(rows) + f"\n\nfirst batch max |diff| {result['max_abs_diff_first_batch']:.2g}"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    p.add_argument("--images", type=int, default=1536)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--cpu-profile", default="native")
    p.add_argument("--quick", action="store_true", help="256 photos, 1 round, results into bench/work/")
    p.add_argument("--out", type=Path, help=f"results file (default {RESULTS.relative_to(REPO)})")
    p.add_argument("--child", choices=(*SIDES, "compare"), help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> int:
    args = parse_args()
    if args.child:
        out = {"max_abs_diff": first_batches(args)} if args.child == "compare" else run_side(args.child, args)
        print(json.dumps(out))
        return 0
    if args.quick:
        args.images, args.rounds, args.epochs = 256, 1, 1
    result = benchmark(args)
    out = QUICK_OUT if args.quick else args.out or RESULTS
    kept = json.loads(out.read_text()) if out.exists() else {}
    kept.setdefault("profiles", {})[args.cpu_profile] = result
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(kept, indent=2) + "\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
