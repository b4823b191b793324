"""Where one kdpipe distill step spends its time: torch.profiler over bench/speed.py's `kdpipe_online` step.

The work is bench/speed.py's (resnet56 → resnet20, Fashion-MNIST 32×32×3, batch 128, crop + flip, 0.5·CE + 0.5·KD,
SGD momentum, 2 threads, kdpipe's defaults: BatchNorm-folded teacher, channels_last, `precision: auto`). The step
is the engine's own `_Trainer.step`; only labels are added around its parts (torch.profiler.record_function):
the batch gather, uint8 → float, the crop + flip, the channels_last layout copy, the teacher's forward, the
student's forward, and the loss. What torch labels itself is taken as it comes: `Optimizer.zero_grad#SGD`,
`Optimizer.step#SGD` and the autograd engine's `evaluate_function: ...` events (the backward). Each event's
self time goes to the innermost part that contains it; what none contains is `other`. Times are the main
thread's (intra-op threads work inside its ops), summed over the profiled steps and given per step.

Each CPU profile runs in its own process (the kernel caps are read at torch's first kernel):

    python bench/step_profile.py                       # native and avx2 → bench/results/step_profile.json
    python bench/step_profile.py --profiles avx2 --steps 3 --out /tmp/p.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import speed

REPO = speed.REPO
PARTS = ("batch gather", "to float", "augment", "layout copy", "teacher forward", "student forward", "loss",
         "backward", "zero_grad", "optimizer step", "other")  # fmt: skip
TORCH_LABELS = {"Optimizer.zero_grad": "zero_grad", "Optimizer.step": "optimizer step",
                "autograd::engine::evaluate_function": "backward"}  # fmt: skip


def labelled(fn, name: str):
    """fn, its calls profiled under `name`."""
    from torch.profiler import record_function

    def wrapper(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)

    return wrapper


class Labelled:
    """A module's calls profiled under `name` (attributes reach the module: the engine reads none)."""

    def __init__(self, module, name: str):
        self.module, self.name = module, name

    def __call__(self, *args, **kwargs):
        return labelled(self.module, self.name)(*args, **kwargs)


def profiled_step(args):
    """speed.py's kdpipe_online step, its parts labelled; -> (step, facts)."""
    from kdpipe.data import batches as batches_mod
    from kdpipe.distill import composite
    from kdpipe.train import engine

    facts: dict = {}
    x, y = speed.load_images(args.train_size)
    engine.to_float = labelled(batches_mod.to_float, "to float")  # the engine's own name for it
    composite.composite_loss = labelled(composite.composite_loss, "loss")
    args.side = "kdpipe_online"
    original_objective = speed.kdpipe_objective

    def objective(args_, teacher, train, rt, facts_):  # the teacher as the loss sees it, labelled
        return original_objective(args_, Labelled(teacher, "teacher forward"), train, rt, facts_)

    speed.kdpipe_objective = objective
    step = speed.kdpipe_side(x, y, args, facts, hook=label_trainer)
    return step, facts


def label_trainer(trainer, gather):
    """Labels on the trainer's student call, augmentation and layout copy; the batch gather, labelled."""
    import dataclasses

    trainer.net = Labelled(trainer.net, "student forward")
    trainer.augment = labelled(trainer.augment, "augment")
    rt = trainer.rt

    class LabelledRuntime(type(rt)):
        def layout(self, x):
            return labelled(super().layout, "layout copy")(x)

    trainer.rt = LabelledRuntime(**{f.name: getattr(rt, f.name) for f in dataclasses.fields(rt)})
    return labelled(gather, "batch gather")


def part_of(event, own: set[str]) -> str:
    """The innermost labelled part containing `event` (itself included)."""
    while event is not None:
        if event.name in own:
            return event.name
        for prefix, part in TORCH_LABELS.items():
            if event.name.startswith(prefix):
                return part
        event = event.cpu_parent
    return "other"


def profile_here(args) -> dict:
    """In this process: warm up, then profile args.steps steps; milliseconds per step by part."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    step, facts = profiled_step(args)
    for _ in range(args.warmup):
        step().item()
    t0 = time.perf_counter()
    for _ in range(args.steps):  # unprofiled: the wall a step takes without the profiler's overhead
        step().item()
    plain_ms = (time.perf_counter() - t0) / args.steps * 1e3
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step().item()
        profiled_ms = (time.perf_counter() - t0) / args.steps * 1e3
    own = set(PARTS)
    ms = dict.fromkeys(PARTS, 0.0)
    for event in prof.events():
        ms[part_of(event, own)] += event.self_cpu_time_total / 1e3 / args.steps  # µs → ms per step
    top = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    return {"ms_per_step": {k: round(v, 2) for k, v in ms.items()}, "profiled_step_ms": round(profiled_ms, 1),
            "unprofiled_step_ms": round(plain_ms, 1), "images_s_unprofiled": round(speed.BATCH / plain_ms * 1e3),
            "share": {k: round(v / sum(ms.values()), 3) for k, v in ms.items()},
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            **facts, "top_ops": top.splitlines()}


def spawn(profile: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "p.json"
        flags = ["--child", out, "--steps", args.steps, "--warmup", args.warmup, "--threads", args.threads,
                 "--train-size", args.train_size, "--precision", args.precision]
        env = {**speed.profile_environ(profile), "OMP_NUM_THREADS": str(args.threads)}
        subprocess.run([sys.executable, __file__, *map(str, flags)], cwd=REPO, env=env, check=True)
        return json.loads(out.read_text())


def table(results: dict) -> str:
    """Markdown: ms per step and share by part, one column pair per profile."""
    names = list(results)
    rows = ["| part | " + " | ".join(f"{p}: ms/step | share" for p in names) + " |",
            "|---|" + "---:|---:|" * len(names)]
    for part in PARTS:
        cells = [f"{results[p]['ms_per_step'][part]:.1f} | {100 * results[p]['share'][part]:.0f} %" for p in names]
        rows.append(f"| {part} | " + " | ".join(cells) + " |")
    rows.append("| step, profiled (unprofiled) | " + " | ".join(
        f"{results[p]['profiled_step_ms']:.0f} ({results[p]['unprofiled_step_ms']:.0f}) | " for p in names) + " |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--profiles", nargs="+", default=["native", "avx2"], choices=("native", "avx2", "reproducible"))
    add("--steps", type=int, default=10, help="profiled steps (the same number unprofiled before them)")
    add("--warmup", type=int, default=5)
    add("--threads", type=int, default=2)
    add("--train-size", type=int, default=2_560)
    add("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    add("--views", type=int, default=4, help=argparse.SUPPRESS)  # speed.kdpipe_side reads it
    add("--out", default="bench/results/step_profile.json")
    add("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        Path(args.child).write_text(json.dumps(profile_here(args)))
        return 0
    results = {p: spawn(p, args) for p in args.profiles}
    from projectcopy import cpu_name

    command = ["python", "bench/step_profile.py", "--profiles", *args.profiles, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--train-size", str(args.train_size), "--out", args.out]
    out = {"command": " ".join(command), "cpu": cpu_name(), "work": speed.WORK, "parts": list(PARTS),
           "profiles": results}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
