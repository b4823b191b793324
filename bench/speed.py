"""Distill-step throughput: kdpipe's engine against torchdistill 1.1.5 and a seed-style loop, same work.

The work, identical on every side: teacher resnet56 (855,770 params, frozen, eval mode) → student resnet20
(272,474 params), both `kdpipe.models.zoo.build_model` Classifiers taking float images in [0, 1], the teacher
initialised under torch.manual_seed(0), the student under torch.manual_seed(1) (an untrained teacher
costs what a trained one does). The first `--train-size` (10,240) Fashion-MNIST train images, padded
28 → 32 (2 px of zeros each side) and repeated to 3 channels; random crop (padding 4) + horizontal flip;
batches of 128 (a last partial batch dropped, so every timed step is 128 images); loss
0.5·CE + 0.5·T²·KL(p_t^T ‖ p_s^T), T = 4; SGD lr 0.1, momentum 0.9, weight decay 5e-4, no Nesterov; 2 CPU
threads. The sides:

  torchdistill_online  DistillationBox (its KDLoss, alpha 0.5, T 4, set through its config dict) and its own
                       train loader: torchvision DataLoader, num_workers 0, per-sample PIL RandomCrop(32,
                       padding=4), RandomHorizontalFlip, ToTensor (as torchvision's CIFAR10 serves images)
  torchdistill_ce      TrainingBox, plain CE on the student, the same loader
  seedloop_online      a plain loop over the same DataLoader, fp32 eager teacher under no_grad every step
  kdpipe_online        kdpipe's _Trainer.step: the split on the device as uint8, batches cut by index and
                       augmented in one batched op, the live teacher inside distill_loss
  kdpipe_views         the same step replaying K teacher-labelled views per image (FKD-style cached views);
                       the one-off labelling is timed apart (`labelling_seconds`), outside the steps
  kdpipe_ce            the same step with plain CE

  kdpipe_online+LEVER  kdpipe_online with one change (LEVERS below: NCHW, the teacher unfolded, its forward under
                       inference_mode, foreach or fused SGD, fewer host copies, torch.compile); `--levers` runs
                       torchdistill_online, kdpipe_online and each named lever in the same rounds, and the result's
                       `levers` block gives each against both (write it elsewhere than throughput.json: --out)

kdpipe runs at the precision its runtime picks (`--precision auto`: bf16 autocast on a CPU with native bf16,
else fp32) in channels_last; torchdistill and the seed loop run as their defaults do, fp32 and contiguous.
`--precision fp32` measures kdpipe without the low precision. `--cpu-profile avx2` runs every side with torch's
CPU kernels capped at AVX2 (kdpipe/run/kernels.py PROFILES): what an x86-64 CPU without AVX-512 runs, measured
here (auto is then fp32, as there); `--cpu-profile reproducible` with the reproducible mode's pins.

Method. Each side runs in its own subprocess, one at a time: imports, data loading, model building and the
views' labelling come before the clock, and the peak RSS (ru_maxrss) is that process's own (it includes the
whole Fashion-MNIST load, the same on every side). A step is timed from fetching its batch to the end of
optimizer.step (.item() on the loss after it, which on the CPU waits for nothing): wall time (perf_counter)
and process CPU time (process_time, all threads). A timed step whose CPU time is below `--min-cpu-share` ×
threads × wall was starved by another process: it is discarded and counted. A side's images/s in a round is
128 × kept steps / Σ kept walls (total images over total time, not a median of per-step rates). `--rounds`
rounds run every side once, the order rotated each round so that no side always goes first or last; each
ratio is taken within a round (kdpipe side / peer) and reported as {median, min, max} over the rounds.

torchdistill wiring. The boxes are built directly (not through its YAML loader), with the models passed as
objects and the dataset as a plain map-style object. 1.1.5 needs `forward_proc: forward_batch_only` spelled
out (it has no default: None is not a registered key) and the sampler passed as a class (RandomSampler, what
`!import_get` yields from YAML). The teacher gets `requires_grad: False`, so the box runs it under no_grad
as kdpipe does, and is put in eval mode before the box is built (the box only ever calls .train() on the
student). A step is its example loop's: pre_forward_process, forward_process, post_forward_process (backward,
optimizer.step, zero_grad), over the (x, y, supp_dict) batches of the box's train_data_loader.

    python bench/speed.py             # bench/results/throughput.json and a markdown table; ~5 min on 2 cores
    python bench/speed.py --rounds 1 --steps 3 --warmup 1 --train-size 512 --views 2 --out /tmp/t.json
    python bench/speed.py --rounds 3 --steps 20 --warmup 3 --levers contiguous fused --out bench/results/levers.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # kdpipe from this checkout, also where it is not installed in the venv

SIDES = ("torchdistill_online", "torchdistill_ce", "seedloop_online",
         "kdpipe_online", "kdpipe_views", "kdpipe_ce")  # fmt: skip
# One change each to kdpipe_online's default step (side `kdpipe_online+<lever>`, measured alone against it and
# against torchdistill in the same round; `--sides ... kdpipe_online+fused` or `--levers`).
LEVERS = {
    "none": "the default step again: a control, whose ratio to kdpipe_online is the run's noise",
    "contiguous": "runtime.channels_last false: models and batches in NCHW",
    "no_fold": "the teacher's BatchNorms left unfolded",
    "inference_mode": "the teacher's forward under torch.inference_mode (its logits cloned out of it)",
    "foreach": "torch.optim.SGD(foreach=True): one multi-tensor update instead of a loop over parameters",
    "fused": "torch.optim.SGD(fused=True): the fused CPU kernel",
    "fewer_copies": "crop + flip on the uint8 batch, then one float conversion, the result left in NHWC "
                    "(no NCHW copy for channels_last to undo)",
    "compile": "runtime.compile true: teacher and student torch.compile'd, inductor's cache in "
               "bench/work/inductor-cache ($TORCHINDUCTOR_CACHE_DIR where set) kept across rounds and runs (round 1 "
               "cold unless an earlier run filled it)",
    "compile_teacher": "the teacher alone torch.compile'd with inductor's freezing (weights as constants), same cache",
}
LEVER_SIDES = tuple(f"kdpipe_online+{lever}" for lever in LEVERS)
INDUCTOR_CACHE = REPO / "bench" / "work" / "inductor-cache"
# Ratio name -> (kdpipe side, peer side); each is computed within one round.
RATIOS = {
    "ratio_torchdistill_online": ("kdpipe_online", "torchdistill_online"),
    "ratio_torchdistill_views": ("kdpipe_views", "torchdistill_online"),
    "ratio_torchdistill_ce": ("kdpipe_ce", "torchdistill_ce"),
    "ratio_seedloop_online": ("kdpipe_online", "seedloop_online"),
}
BATCH, LR, MOMENTUM, WEIGHT_DECAY, TEMPERATURE, ALPHA, CROP_PADDING = 128, 0.1, 0.9, 5e-4, 4.0, 0.5, 4
WORK = {
    "teacher": "resnet56", "student": "resnet20", "teacher_seed": 0, "student_seed": 1,
    "dataset": "fashion_mnist", "image": "28x28 zero-padded to 32x32, repeated to 3 channels",
    "augment": "random crop (padding 4) + horizontal flip", "batch_size": BATCH,
    "loss": "0.5*CE + 0.5*T^2*KL(softmax(t/T) || softmax(s/T)), T=4 (the ce sides: CE alone)",
    "optimizer": {"name": "sgd", "lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY,
                  "nesterov": False},
}  # fmt: skip


# ------------------------------------------------------------------------------ the work, shared by all sides


def load_images(n: int):
    """The first n Fashion-MNIST train images as uint8 (n, 3, 32, 32) and their int64 labels (n,)."""
    import torch.nn.functional as F

    from kdpipe.data.datasets import load_raw

    raw = load_raw("fashion_mnist", "/tmp/unused")  # the Debian copy in /usr/share/datasets/fashion-mnist
    x = F.pad(raw.train_x[:n], (2, 2, 2, 2))  # (n, 1, 28, 28) -> (n, 1, 32, 32), zeros around
    return x.repeat(1, 3, 1, 1).contiguous(), raw.train_y[:n].clone()  # (n, 3, 32, 32)


def build_models():
    """(teacher, student): the teacher frozen in eval mode; both seeded the same way on every side."""
    import torch

    from kdpipe.models.zoo import build_model

    torch.manual_seed(WORK["teacher_seed"])
    teacher = build_model(WORK["teacher"], 3, 10).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    torch.manual_seed(WORK["student_seed"])
    return teacher, build_model(WORK["student"], 3, 10)


class PilImages:
    """uint8 images served one PIL image at a time through per-sample transforms, as torchvision's CIFAR10
    does. A duck-typed map-style dataset (len + getitem: all DataLoader and torchdistill's wrapper use), so
    that this module imports no torch at import time."""

    def __init__(self, x, y, augment: bool = True):
        from torchvision import transforms

        self.x_hwc = x.permute(0, 2, 3, 1).contiguous().numpy()  # (N, C, H, W) -> (N, H, W, C) for PIL
        self.y = y.tolist()
        views = [transforms.RandomCrop(32, padding=CROP_PADDING), transforms.RandomHorizontalFlip()] if augment else []
        self.transform = transforms.Compose([*views, transforms.ToTensor()])  # augment False: validation images

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.x_hwc[i])), self.y[i]


def endless(make_iter: Callable[[int], Iterator]) -> Iterator:
    """Batches across epochs: make_iter(epoch) is called again whenever an epoch runs out."""
    epoch = 0
    while True:
        yield from make_iter(epoch)
        epoch += 1


def kd_loss(student_logits, teacher_logits, labels):
    """The seed loop's loss, inline: α·CE + (1 − α)·T²·KL(p_t^T ‖ p_s^T), KL summed over classes and averaged
    over the batch (T² keeps the soft term's gradients on CE's scale; Hinton et al. 2015)."""
    import torch.nn.functional as F

    log_p_student = F.log_softmax(student_logits / TEMPERATURE, dim=1)
    p_teacher = F.softmax(teacher_logits / TEMPERATURE, dim=1)
    soft = F.kl_div(log_p_student, p_teacher, reduction="batchmean")
    return ALPHA * F.cross_entropy(student_logits, labels) + (1 - ALPHA) * TEMPERATURE**2 * soft


# ----------------------------------------------------------------------------------------------- the sides
# Each side builds everything, then returns step(): one optimizer step, its batch fetch included, -> the loss.


def seedloop_online(x, y, args) -> Callable:
    import torch
    from torch.utils.data import DataLoader

    teacher, student = build_models()
    student.train()
    opt = torch.optim.SGD(student.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    loader = DataLoader(PilImages(x, y), batch_size=BATCH, shuffle=True, num_workers=0, drop_last=True)
    batches = endless(lambda epoch: iter(loader))

    def step():
        images, labels = next(batches)
        with torch.no_grad():
            teacher_logits = teacher(images)
        loss = kd_loss(student(images), teacher_logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss

    return step


def torchdistill_config(criterion: dict, models: dict) -> dict:
    """A torchdistill train config: its DataLoader over dataset "train", SGD, one epoch, no scheduler."""
    from torch.utils.data import RandomSampler

    loader = {"dataset_id": "train", "sampler": {"class_or_func": RandomSampler, "kwargs": {}},
              "kwargs": {"batch_size": BATCH, "num_workers": 0, "drop_last": True}, "requires_supp": True}
    sgd = {"lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY, "nesterov": False}
    return {"num_epochs": 1, "train_data_loader": loader, "optimizer": {"key": "SGD", "kwargs": sgd},
            "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": criterion}}, **models}


def torchdistill_step(box) -> Callable:
    """One step as torchdistill's example loop takes it, over the box's own train loader."""

    def epoch_batches(epoch: int):
        box.pre_epoch_process(epoch=epoch)  # student.train() and its I/O dicts cleared, as at each epoch
        return iter(box.train_data_loader)

    batches = endless(epoch_batches)

    def step():
        sample_batch, targets, supp_dict = next(batches)
        sample_batch, targets = sample_batch.to(box.device), targets.to(box.device)
        box.pre_forward_process(sample_batch=sample_batch, targets=targets, supp_dict=supp_dict)
        loss = box.forward_process(sample_batch, targets, supp_dict)
        box.post_forward_process(loss=loss)
        return loss

    return step


def torchdistill_kd_config(**train_config) -> dict:
    """The online-KD train config (torchdistill_config with its KDLoss on the models' outputs, the teacher frozen),
    updated with `train_config` (bench/time_to_accuracy.py: epochs and a scheduler)."""
    logits = {"student_module_path": ".", "student_module_io": "output",
              "teacher_module_path": ".", "teacher_module_io": "output"}  # fmt: skip
    kd = {"key": "KDLoss", "kwargs": {**logits, "temperature": TEMPERATURE, "alpha": ALPHA,
                                      "reduction": "batchmean"}}
    models = {"teacher": {"forward_proc": "forward_batch_only", "requires_grad": False},
              "student": {"forward_proc": "forward_batch_only", "requires_grad": True}}
    return {**torchdistill_config({"kd": {"criterion": kd, "weight": 1.0}}, models), **train_config}


def torchdistill_online(x, y, args) -> Callable:
    import torch
    from torchdistill.core.distillation import DistillationBox

    teacher, student = build_models()
    data = {"train": PilImages(x, y)}
    box = DistillationBox(teacher, student, data, torchdistill_kd_config(), torch.device("cpu"), None, False, 1)
    return torchdistill_step(box)


def torchdistill_ce(x, y, args) -> Callable:
    import torch
    from torchdistill.core.training import TrainingBox

    _, student = build_models()
    wrapper = {"input": {"is_from_teacher": False, "module_path": ".", "io": "output"},
               "target": {"uses_label": True}}
    ce = {"criterion": {"key": "CrossEntropyLoss", "kwargs": {"reduction": "mean"}},
          "criterion_wrapper": {"key": "SimpleLossWrapper", "kwargs": wrapper}, "weight": 1.0}
    config = torchdistill_config({"ce": ce}, {"model": {"forward_proc": "forward_batch_only"}})
    data = {"train": PilImages(x, y)}
    return torchdistill_step(TrainingBox(student, data, config, torch.device("cpu"), None, False, 1))


def kdpipe_side(x, y, args, facts: dict, hook: Callable | None = None) -> Callable:
    """kdpipe's engine step for args.side (with its lever, if any); `facts` gets the runtime's choices (and the
    views' labelling). hook(trainer, gather) may return a replacement for gather(idx) -> (uint8 x, y)."""
    import torch

    from kdpipe.config import StudentConfig
    from kdpipe.data.batches import Split
    from kdpipe.run.runtime import make_runtime
    from kdpipe.train.distiller import fold_batchnorm, freeze
    from kdpipe.train.engine import _Trainer

    lever = args.side.partition("+")[2]
    rt = make_runtime(device="cpu", precision=args.precision, channels_last=lever != "contiguous",
                      compile=lever == "compile")
    facts.update(precision=rt.precision, channels_last=rt.channels_last, compile=rt.compile, lever=lever or None)
    teacher, student = build_models()
    # the teacher as the distill stage prepares it for logits-only methods: frozen, BatchNorm folded
    teacher = freeze(teacher) if lever == "no_fold" else fold_batchnorm(freeze(teacher))
    teacher, student = rt.prepare(teacher), rt.prepare(student)
    teacher = lever_teacher(teacher, lever)
    train = Split(x.to(rt.device), y.to(rt.device))
    cfg = StudentConfig(model=WORK["student"], epochs=1, batch_size=BATCH, optimizer="sgd", lr=LR,
                        momentum=MOMENTUM, nesterov=False, weight_decay=WEIGHT_DECAY, warmup_epochs=0,
                        schedule="constant", crop_padding=CROP_PADDING, flip=True, patience=0)
    objective = kdpipe_objective(args, teacher, train, rt, facts)
    trainer = _Trainer.build(student, cfg, rt, seed=0, objective=objective)
    lever_trainer(trainer, lever)
    for module in trainer.modules:
        module.train()  # as train_epoch does; step() alone leaves the mode as it is
    shuffle = torch.Generator().manual_seed(0)

    def epoch_batches(epoch: int):  # index batches from a randperm per epoch, as the engine draws them
        return iter(torch.randperm(len(train), generator=shuffle).split(BATCH)[: len(train) // BATCH])

    batches = endless(epoch_batches)

    def gather(idx):
        return train.x[idx], train.y[idx]

    gather = (hook(trainer, gather) if hook else None) or gather

    def step():
        idx = next(batches)
        return trainer.step(idx, *gather(idx), lr=LR)[2]["loss"]

    return step


def lever_teacher(teacher, lever: str):
    """The teacher as `lever` runs it: compiled (inductor freezing its weights), or called under inference_mode."""
    import torch

    if lever == "compile_teacher":
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # weights as constants: folded and prepacked for oneDNN (inference only)
        return torch.compile(teacher)
    if lever != "inference_mode":
        return teacher

    def forward(x):
        with torch.inference_mode():
            logits = teacher(x)
        return logits.clone()  # an inference tensor may not be saved for backward (the KL term saves it)

    return forward


def lever_trainer(trainer, lever: str) -> None:
    """The trainer's optimizer or augmentation as `lever` has it."""
    import torch

    from kdpipe.data import batches
    from kdpipe.train import engine

    if lever in ("foreach", "fused"):
        params = [p for group in trainer.opt.param_groups for p in group["params"]]
        trainer.opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, nesterov=False,
                                      **{lever: True})
    if lever == "fewer_copies":
        engine.to_float = lambda xb: xb  # the engine converts after the crop instead (below)

        def augment(x, idx, y, gen):
            views = batches.draw_views(len(x), CROP_PADDING, True, gen, x.device)
            return batches.to_float(apply_views_nhwc(x, CROP_PADDING, views)), idx, y

        trainer.augment = augment


def apply_views_nhwc(x, crop_padding: int, views):
    """batches.apply_views without its last NCHW copy: the (N, C, H, W) view of the NHWC gather, which is
    channels_last in memory already."""
    import torch
    import torch.nn.functional as F

    n, _, h, w = x.shape
    rows = torch.arange(h, device=x.device).expand(n, h)  # (N, H)
    cols = torch.arange(w, device=x.device).expand(n, w)  # (N, W)
    cols = torch.where(views.flipped[:, None], cols.flip(1), cols)
    x = F.pad(x, (crop_padding,) * 4)  # (N, C, H + 2p, W + 2p)
    rows, cols = rows + views.dy[:, None], cols + views.dx[:, None]
    batch = torch.arange(n, device=x.device)[:, None, None]
    return x.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (N, C, H, W) NHWC


def kdpipe_objective(args, teacher, train, rt, facts: dict):
    """The kdpipe side's Objective: the live teacher, cached views (labelled here, timed), or plain CE."""
    from kdpipe.config import DistillConfig
    from kdpipe.train.distiller import distill_loss
    from kdpipe.train.objective import Objective

    weights = {"ce": ALPHA, "kd": 1 - ALPHA}
    dcfg = DistillConfig(method="kd", weights=weights, temperature=TEMPERATURE)
    side = args.side.partition("+")[0]  # a lever's side is kdpipe_online's
    if side == "kdpipe_ce":
        return Objective()
    if side == "kdpipe_online":
        return Objective(loss_fn=distill_loss(dcfg, teacher, weights=weights))
    from kdpipe.distill.views import label_views

    wall0, cpu0 = time.perf_counter(), time.process_time()
    views = label_views(teacher, train.x, k=args.views, crop_padding=CROP_PADDING, flip=True, seed=0, rt=rt)
    facts.update(labelling_seconds=time.perf_counter() - wall0, views=args.views,
                 labelling_cpu_seconds=time.process_time() - cpu0, labelled_images=len(train) * args.views)
    loss_fn = distill_loss(dcfg, teacher, weights=weights, cached_logits=views.flat_logits())
    return Objective(loss_fn=loss_fn, augment=views.augment)


# ------------------------------------------------------------------------------- one side, in its own process


def time_steps(step: Callable, total: int) -> tuple[list[float], list[float]]:
    """Wall and process-CPU seconds of `total` calls of step(); .item() on the loss makes sure it finished."""
    walls, cpus = [], []
    for _ in range(total):
        wall0, cpu0 = time.perf_counter(), time.process_time()
        step().item()
        walls.append(time.perf_counter() - wall0)
        cpus.append(time.process_time() - cpu0)
    return walls, cpus


def run_side(args) -> dict:
    """Build args.side, time warmup + steps of it; the timed steps' walls and CPU times, and the facts."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # the DataLoader sides shuffle and augment from the global generator
    x, y = load_images(args.train_size)
    facts: dict = {}
    peers = {"torchdistill_online": torchdistill_online, "torchdistill_ce": torchdistill_ce,
             "seedloop_online": seedloop_online}
    step = peers[args.side](x, y, args) if args.side in peers else kdpipe_side(x, y, args, facts)
    walls, cpus = time_steps(step, args.warmup + args.steps)
    w = args.warmup
    return {"side": args.side, "wall": walls[w:], "cpu": cpus[w:], "warmup_wall": walls[:w],
            "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            **facts, **versions(),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB on Linux


def versions() -> dict:
    """Library versions; None for one not installed (torchdistill, when only kdpipe's sides run)."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {name: installed(name) for name in ("torch", "torchvision", "torchdistill")}


# ---------------------------------------------------------------------------------- the rounds, in the parent


def spawn(side: str, args) -> dict:
    """One side in a fresh process: its JSON, or {"error": [the last lines of its stderr]}."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{side}.json"
        flags = ["--side", side, "--steps", args.steps, "--warmup", args.warmup, "--views", args.views,
                 "--train-size", args.train_size, "--threads", args.threads, "--precision", args.precision,
                 "--json-out", out]
        env = {**profile_environ(args.cpu_profile), "KDPIPE_THREADS": str(args.threads),
               "OMP_NUM_THREADS": str(args.threads), "TORCHINDUCTOR_CACHE_DIR": os.environ.get("TORCHINDUCTOR_CACHE_DIR", str(INDUCTOR_CACHE))}
        proc = subprocess.run([sys.executable, __file__, *map(str, flags)], cwd=REPO, env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-5:]
            return {"side": side, "error": tail or [f"exit {proc.returncode}"]}
        return json.loads(out.read_text())


def profile_environ(profile: str) -> dict[str, str]:
    """This process's environment with CPU profile `profile`'s kernel caps in place of any it was given."""
    from kdpipe.run.kernels import KNOBS, profile_env

    return {**{k: v for k, v in os.environ.items() if k not in KNOBS}, **profile_env(profile)}


def run_rounds(args) -> list[dict]:
    """Every side once per round, one process at a time, the starting side rotated from round to round."""
    rounds = []
    for r in range(args.rounds):
        order = args.sides[r % len(args.sides) :] + args.sides[: r % len(args.sides)]
        runs = {}
        for side in order:
            print(f"[speed] round {r + 1}/{args.rounds}: {side}", file=sys.stderr, flush=True)
            runs[side] = spawn(side, args)
            if "error" in runs[side]:
                print(f"[speed] {side} failed:", *runs[side]["error"], sep="\n  ", file=sys.stderr)
            else:
                warn_if_starved(runs[side], args.min_cpu_share)
        rounds.append({"order": order, "runs": runs})
    return rounds


def throughput(run: dict, min_share: float) -> dict:
    """images/s over the kept steps of one run; a step with CPU < min_share × threads × wall is discarded.
    images_s_all counts every step, to show what the discarded ones would have changed."""
    kept = [w for w, c in zip(run["wall"], run["cpu"], strict=True) if c >= min_share * run["threads"] * w]
    return {"images_s": BATCH * len(kept) / sum(kept) if kept else None, "kept": len(kept),
            "discarded": len(run["wall"]) - len(kept),
            "images_s_all": BATCH * len(run["wall"]) / sum(run["wall"])}


def warn_if_starved(run: dict, min_share: float) -> None:
    """Say so at once when most of a run's steps were starved: the machine is not quiet enough to measure."""
    t = throughput(run, min_share)
    if t["discarded"] > t["kept"]:
        share = statistics.median(c / w for w, c in zip(run["wall"], run["cpu"], strict=True))
        share /= run["threads"]
        print(f"[speed] {run['side']}: {t['discarded']}/{len(run['wall'])} steps discarded (median CPU/wall "
              f"per thread {share:.2f} < {min_share}): another process is using the cores (see `uptime`)",
              file=sys.stderr, flush=True)


def spread(values: list[float | None]) -> dict | None:
    """{median, min, max, per_round} of the values that exist; None when none does."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "per_round": values}


def summarise_side(side: str, rounds: list[dict], min_share: float) -> dict:
    """A side over the rounds: images/s per round and their median, peak RSS, discarded steps, errors."""
    runs = [r["runs"][side] for r in rounds]
    ok = [run for run in runs if "error" not in run]
    rates = [throughput(run, min_share) for run in ok]
    summary = {
        "images_s": spread([t["images_s"] for t in rates]),
        "images_s_all_steps": spread([t["images_s_all"] for t in rates]),
        "peak_rss_mib": max((run["peak_rss_mib"] for run in ok), default=None),
        "discarded_steps": sum(t["discarded"] for t in rates),
        "discarded_per_round": [t["discarded"] for t in rates],
        "timed_steps": sum(len(run["wall"]) for run in ok),
        "cpu_per_wall": spread([sum(run["cpu"]) / sum(run["wall"]) for run in ok]),
        # the first step pays one-off costs: torch.compile's compilation (or its cache lookup), first touches
        "first_step_seconds": spread([run["warmup_wall"][0] for run in ok if run["warmup_wall"]]),
    }
    if side == "kdpipe_views" and ok:
        summary["views"] = ok[0]["views"]
        summary["labelling_seconds"] = spread([run["labelling_seconds"] for run in ok])
    errors = [run["error"] for run in runs if "error" in run]
    return {**summary, "errors": errors} if errors else summary


def ratio(rounds: list[dict], ours: str, peer: str, min_share: float) -> dict | None:
    """kdpipe side / peer side images/s within each round, as {median, min, max, per_round}."""
    per_round = []
    for r in rounds:
        a, b = r["runs"].get(ours), r["runs"].get(peer)
        if a is None or b is None or "error" in a or "error" in b:
            continue
        ta, tb = throughput(a, min_share)["images_s"], throughput(b, min_share)["images_s"]
        per_round.append(ta / tb if ta and tb else None)
    return spread(per_round)


def lever_summary(rounds: list[dict], side: str, args) -> dict:
    """A lever's side against the default kdpipe_online and against torchdistill, each within a round."""
    sides = set(args.sides)
    return {"what": LEVERS[side.partition("+")[2]],
            "vs_kdpipe_online": ratio(rounds, side, "kdpipe_online", args.min_cpu_share)
            if "kdpipe_online" in sides else None,
            "vs_torchdistill_online": ratio(rounds, side, "torchdistill_online", args.min_cpu_share)
            if "torchdistill_online" in sides else None}


def machine(rounds: list[dict], args) -> dict:
    """The CPU, its profile, threads and library versions, and what kdpipe's runtime chose (from the kdpipe runs)."""
    from projectcopy import cpu_name

    from kdpipe.run.kernels import profile_env

    runs = [run for r in rounds for run in r["runs"].values() if "error" not in run]
    kdpipe_run = next((run for run in runs if run["side"].startswith("kdpipe")), {})
    facts = {"cpu": cpu_name(),
             "cpu_count": os.cpu_count(), "threads": args.threads, "python": platform.python_version(),
             "cpu_profile": args.cpu_profile, "cpu_profile_env": profile_env(args.cpu_profile),
             "cpu_capability": runs[0]["cpu_capability"] if runs else None,  # ATen's, in the sides' processes
             "kdpipe_precision": kdpipe_run.get("precision"),
             "kdpipe_channels_last": kdpipe_run.get("channels_last"),
             "loadavg_at_end": [round(v, 2) for v in os.getloadavg()]}
    return {**facts, **({k: runs[0][k] for k in ("torch", "torchvision", "torchdistill")} if runs else {})}


def reproduce(args) -> str:
    """The command line that reruns this benchmark as it ran, every default spelled out."""
    flags = ["--rounds", args.rounds, "--steps", args.steps, "--warmup", args.warmup, "--views", args.views,
             "--train-size", args.train_size, "--threads", args.threads, "--precision", args.precision,
             "--cpu-profile", args.cpu_profile, "--min-cpu-share", args.min_cpu_share, "--sides", *args.sides,
             "--out", args.out]
    return shlex.join(["python", "bench/speed.py", *map(str, flags)])


def table(result: dict) -> str:
    """The README's markdown: one row per side, the precision note, then the ratios."""
    rows = ["| side | images/s (median) | min–max | peak RSS (MiB) | discarded steps |",
            "|---|---:|---:|---:|---:|"]
    for side, s in result["sides"].items():
        ips = s["images_s"]
        rate = f"{ips['median']:.0f} | {ips['min']:.0f}–{ips['max']:.0f}" if ips else "– | –"
        rss = f"{s['peak_rss_mib']:.0f}" if s["peak_rss_mib"] else "–"
        rows.append(f"| {side} | {rate} | {rss} | {s['discarded_steps']}/{s['timed_steps']} |")
    m = result["machine"]
    rows += ["", f"kdpipe: {m['kdpipe_precision']}, channels_last {m['kdpipe_channels_last']}; "
             f"torchdistill and the seed loop: fp32, contiguous. {m['threads']} threads, {m['cpu']}, CPU profile "
             f"{m['cpu_profile']} (ATen {m['cpu_capability']}).", ""]
    def fmt(r: dict | None) -> str:
        return f"{r['median']:.2f} (min {r['min']:.2f}, max {r['max']:.2f})" if r else "–"

    rows += [f"- {name}: {fmt(result[name])}" for name in RATIOS]
    rows += [f"- lever {lever}: {fmt(r['vs_kdpipe_online'])} x kdpipe_online, {fmt(r['vs_torchdistill_online'])} x "
             "torchdistill_online" for lever, r in result["levers"].items()]
    return "\n".join(rows)


def benchmark(args) -> dict:
    """Run the rounds and put the result together."""
    t0 = time.perf_counter()
    rounds = run_rounds(args)
    work = {**WORK, "train_images": args.train_size, "warmup_steps": args.warmup, "timed_steps": args.steps,
            "rounds": args.rounds, "threads": args.threads}
    method = {"images_s": "128 x kept steps / sum of kept step walls, per side per round",
              "discard": f"a step whose CPU time < {args.min_cpu_share} x threads x wall",
              "ratios": "kdpipe side / peer side within a round; median, min, max over rounds"}
    result = {"command": reproduce(args), "machine": machine(rounds, args), "work": work, "method": method,
              "sides": {side: summarise_side(side, rounds, args.min_cpu_share) for side in args.sides}}
    for name, (ours, peer) in RATIOS.items():
        both = {ours, peer} <= set(args.sides)
        result[name] = ratio(rounds, ours, peer, args.min_cpu_share) if both else None
    result["levers"] = {side.partition("+")[2]: lever_summary(rounds, side, args)
                        for side in args.sides if side in LEVER_SIDES}
    keep = ("wall", "cpu", "error")  # the raw per-step times, for a second look at the discarding
    result["rounds"] = [{"order": r["order"], "steps": {side: {k: run.get(k) for k in keep}
                                                        for side, run in r["runs"].items()}} for r in rounds]
    result["total_seconds"] = round(time.perf_counter() - t0, 1)
    return result


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--rounds", type=int, default=3, help="rounds, each running every side once (default 3)")
    add("--steps", type=int, default=40, help="timed steps per side per round (default 40)")
    add("--warmup", type=int, default=5, help="untimed steps before them (default 5)")
    add("--views", type=int, default=4, help="K views per image for kdpipe_views (default 4)")
    add("--train-size", type=int, default=10_240, help="the first N train images (default 10240)")
    add("--threads", type=int, default=2, help="torch threads on every side (default 2)")
    add("--precision", default="auto", choices=("auto", "fp32", "bf16"),
        help="kdpipe's runtime precision (default auto: bf16 on a CPU with native bf16, else fp32)")
    add("--cpu-profile", default="native", choices=("native", "avx2", "reproducible"),
        help="kernel caps for every side (kdpipe/run/kernels.py PROFILES; avx2: as a CPU without AVX-512)")
    add("--min-cpu-share", type=float, default=0.75,
        help="discard a step whose CPU time < this x threads x wall (default 0.75)")
    add("--sides", nargs="+", choices=SIDES + LEVER_SIDES, default=list(SIDES))
    add("--levers", nargs="*", choices=tuple(LEVERS), metavar="LEVER",
        help="instead of --sides: torchdistill_online, kdpipe_online and kdpipe_online+LEVER for each LEVER "
             f"(none named: all of {', '.join(LEVERS)})")
    add("--out", default="bench/results/throughput.json")
    add("--side", choices=SIDES + LEVER_SIDES, help=argparse.SUPPRESS)  # internal: run one side, in a child process
    add("--json-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.levers is not None:
        args.sides = ["torchdistill_online", "kdpipe_online", *(f"kdpipe_online+{v}" for v in args.levers or LEVERS)]
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1 or args.train_size < BATCH:
        parser.error(f"need --steps >= 1, --warmup >= 0, --rounds >= 1 and --train-size >= {BATCH}")
    return args


def with_profile(out: Path, profile: str, result: dict) -> dict:
    """The results file `out` with this run as its `profiles[profile]` block: each CPU profile's run is kept
    whole (both sides of every ratio measured under the same profile), the others' blocks as they were."""
    kept = json.loads(out.read_text()).get("profiles", {}) if out.is_file() else {}
    return {"profiles": {**kept, profile: result}}


def main() -> int:
    args = parse_args()
    if args.side:
        Path(args.json_out).write_text(json.dumps(run_side(args)))
        return 0
    result = benchmark(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(with_profile(out, args.cpu_profile, result), indent=2) + "\n")
    print(table(result))
    print(f"wrote {out}", file=sys.stderr)
    return 1 if any("errors" in s for s in result["sides"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
