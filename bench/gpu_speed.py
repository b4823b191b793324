"""Images/s and peak GPU memory of kdpipe's training paths at 32×32 on one GPU, through kdpipe's own API.

Four workloads on synthetic uint8 data held on the device (`--n-images` random 3×32×32 images, 10 classes):
  ce           resnet20 student step, cross-entropy (kdpipe.train.engine._Trainer.step, crop+flip on the device)
  teacher_fwd  resnet56 teacher forward (kdpipe.train.inference.predict: logits to the host once per batch)
  kd_online    resnet20 student step with a live resnet56 teacher forward on every batch (Hinton KD)
  kd_views     the same student step replaying cached teacher views (kdpipe.distill.views.label_views, VIEWS views an
               image, held on the device as the distill stage does); building them is timed apart
               (views_build_s, the teacher's compilation included in the compile configs)
each under the configurations in CONFIGS (fp32 contiguous / bf16 autocast + channels_last, torch.compile off
and on). Per measurement, on fresh models: one pass over the data (first_epoch_s: compilation and cuDNN
autotuning included; startup_s: that less the same steps at the measured speed, i.e. the compile time in the
compile configs), `--warmup` untimed steps, then `--steps` timed ones (torch.cuda.synchronize around them):
images/s and ms/step. peak_mib: torch.cuda.max_memory_allocated (data and models included); base_mib: what
was allocated before the first step. Results go to `--out` after every measurement, so a run cut short still
leaves what it measured; configs not started within `--budget-s` are listed as skipped.

    python bench/gpu_speed.py --out bench/results/gpu_speed.json      # on a GPU (bench/gpu_check.sh)
    python bench/gpu_speed.py --device cpu --steps 2 --warmup 1 --n-images 256 --batch 64 --out /tmp/g.json

Without CUDA (and without `--device cpu`) it exits with code 2 and one line. On the CPU compile stays off
unless `--compile` is given.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

EXIT_NO_GPU = 2
WORKLOADS = ("ce", "teacher_fwd", "kd_online", "kd_views")
# name -> make_runtime arguments; compiled ones last: they are the slow ones to measure
CONFIGS = {
    "fp32": {"precision": "fp32", "channels_last": False, "compile": False},
    "bf16_cl": {"precision": "bf16", "channels_last": True, "compile": False},
    "bf16_cl_compile": {"precision": "bf16", "channels_last": True, "compile": True},
    "fp32_compile": {"precision": "fp32", "channels_last": False, "compile": True},
}
STUDENT, TEACHER, CLASSES, VIEWS = "resnet20", "resnet56", 10, 4
KD_WEIGHTS = {"ce": 0.5, "kd": 0.5}


def synthetic_data(n: int, device, seed: int = 0):
    """Random uint8 images (N, 3, 32, 32) and int64 labels (N,), made on the host (same on every device)."""
    import torch

    from kdpipe.data.batches import Split

    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, CLASSES, (n,), generator=gen)
    return Split(x.to(device), y.to(device))


def index_batches(n: int, batch: int, count: int, seed: int = 0) -> list:
    """`count` batches of train positions (host int64), cycling through shuffled passes over n images."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    passes = math.ceil(count * batch / n) + 1
    order = torch.cat([torch.randperm(n, generator=gen) for _ in range(passes)])
    return [order[i * batch : (i + 1) * batch] for i in range(count)]


def recipe(batch: int):
    from kdpipe.config import DistillConfig, StudentConfig

    cfg = StudentConfig(model=STUDENT, epochs=1, batch_size=batch, optimizer="sgd", lr=0.1, momentum=0.9,
                        nesterov=False, weight_decay=5e-4, warmup_epochs=0, schedule="constant",
                        crop_padding=4, flip=True, patience=0)
    return cfg, DistillConfig(method="kd", weights=KD_WEIGHTS, temperature=4.0)


def build_step(workload: str, rt, data, batch: int, extra: dict) -> Callable[[object], None]:
    """One step of `workload` on the batch at positions idx (no host sync, bar predict's copy to the host)."""
    from kdpipe.models.zoo import build_model
    from kdpipe.train.distiller import freeze
    from kdpipe.train.engine import _Trainer
    from kdpipe.train.inference import predict
    from kdpipe.train.objective import Objective

    cfg, dcfg = recipe(batch)
    if workload == "ce":
        objective = Objective()
    else:
        teacher = freeze(rt.prepare(build_model(TEACHER, 3, CLASSES)))
        if workload == "teacher_fwd":
            return lambda idx: predict(teacher, data.x[idx.to(data.x.device)], rt, batch_size=batch)
        objective = online_or_views(workload, dcfg, teacher, rt, data, extra)
    student = rt.prepare(build_model(STUDENT, 3, CLASSES))
    trainer = _Trainer.build(student, cfg, rt, seed=0, objective=objective)
    trainer.modules[0].train()
    return lambda idx: trainer.step(idx, data.x[idx.to(data.x.device)], data.y[idx.to(data.x.device)], lr=cfg.lr)


def online_or_views(workload: str, dcfg, teacher, rt, data, extra: dict):
    """kd_online: a live teacher on every batch; kd_views: the teacher's cached views, built (timed) here."""
    from kdpipe.train.distiller import distill_loss
    from kdpipe.train.objective import Objective

    if workload == "kd_online":
        return Objective(loss_fn=distill_loss(dcfg, teacher, weights=KD_WEIGHTS))
    from kdpipe.distill.views import label_views

    t0 = sync_clock(rt)
    views = label_views(teacher, data.x, k=VIEWS, crop_padding=4, flip=True, seed=0, rt=rt).to(rt.device)
    extra["views_build_s"] = round(sync_clock(rt) - t0, 3)
    extra["views"] = VIEWS
    loss_fn = distill_loss(dcfg, teacher, weights=KD_WEIGHTS, cached_logits=views.flat_logits())
    return Objective(loss_fn=loss_fn, augment=views.augment)


def sync_clock(rt) -> float:
    """time.perf_counter() once the device has finished what was queued."""
    import torch

    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)
    return time.perf_counter()


def memory_mib(rt, peak: bool) -> float | None:
    import torch

    if rt.device.type != "cuda":
        return None
    value = torch.cuda.max_memory_allocated(rt.device) if peak else torch.cuda.memory_allocated(rt.device)
    return round(value / 2**20, 1)


def measure(step: Callable, rt, batches: list, epoch_steps: int, warmup: int, steps: int, batch: int) -> dict:
    """First epoch from a fresh model (compile included), then `warmup` untimed and `steps` timed steps."""
    import torch

    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    base = memory_mib(rt, peak=False)
    t0 = sync_clock(rt)
    step(batches[0])
    first_step = sync_clock(rt) - t0
    for idx in batches[1:epoch_steps]:
        step(idx)
    first_epoch = sync_clock(rt) - t0
    for idx in batches[epoch_steps : epoch_steps + warmup]:
        step(idx)
    t1 = sync_clock(rt)
    for idx in batches[epoch_steps + warmup : epoch_steps + warmup + steps]:
        step(idx)
    timed = sync_clock(rt) - t1
    per_step = timed / steps
    return {"images_per_s": round(steps * batch / timed, 1), "ms_per_step": round(1000 * per_step, 3),
            "first_step_s": round(first_step, 3), "first_epoch_s": round(first_epoch, 3),
            "startup_s": round(first_epoch - epoch_steps * per_step, 3),
            "base_mib": base, "peak_mib": memory_mib(rt, peak=True)}


def run_one(workload: str, config: str, args) -> dict:
    """One (workload, config) measurement on fresh models; an error is recorded, not raised."""
    from kdpipe.run.runtime import make_runtime

    row: dict = {"workload": workload, "config": config, **CONFIGS[config]}
    try:
        rt = make_runtime(device=args.device, **CONFIGS[config])
        row["precision_used"] = rt.precision
        data = synthetic_data(args.n_images, rt.device)
        epoch_steps = math.ceil(args.n_images / args.batch)
        batches = index_batches(args.n_images, args.batch, epoch_steps + args.warmup + args.steps)
        step = build_step(workload, rt, data, args.batch, row)
        row |= measure(step, rt, batches, epoch_steps, args.warmup, args.steps, args.batch)
    except Exception as e:  # one failed configuration must not cost the others their measurement
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    finally:
        release(args.device)
    return row


def release(device: str) -> None:
    """Drop compiled graphs and cached blocks so the next measurement starts clean."""
    import gc

    import torch

    gc.collect()
    if dynamo := sys.modules.get("torch._dynamo"):  # loaded only once something was compiled
        dynamo.reset()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def plan(args) -> list[tuple[str, str]]:
    configs = [c for c in args.configs if args.compile or not CONFIGS[c]["compile"] or args.device != "cpu"]
    return [(c, w) for c in configs for w in args.workloads]


def machine(device: str) -> dict:
    import torch

    facts = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
             "cpu": platform.processor() or platform.machine(), "device": device}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        facts |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                  "cudnn": torch.backends.cudnn.version(), "capability": f"{props.major}.{props.minor}"}
    return facts


def table(rows: list[dict]) -> str:
    lines = ["| workload | config | precision | images/s | ms/step | first epoch s | startup s | peak MiB |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r or "skipped" in r:
            lines.append(f"| {r['workload']} | {r['config']} | {r.get('error') or r['skipped']} | | | | | |")
            continue
        lines.append(f"| {r['workload']} | {r['config']} | {r['precision_used']} | {r['images_per_s']:,.0f} "
                     f"| "
                     f"{r['ms_per_step']:.2f} | {r['first_epoch_s']:.2f} | {r['startup_s']:.2f} | "
                     f"{r['peak_mib'] if r['peak_mib'] is not None else '-'} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/gpu_speed.json")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a logic smoke test)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--n-images", type=int, default=8192, help="synthetic images on the device")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps after the first epoch")
    parser.add_argument("--steps", type=int, default=50, help="timed steps")
    parser.add_argument("--workloads", type=lambda s: s.split(","), default=list(WORKLOADS))
    parser.add_argument("--configs", type=lambda s: s.split(","), default=list(CONFIGS))
    parser.add_argument("--compile", action="store_true", help="on the CPU too (compile configs run on CUDA)")
    parser.add_argument("--budget-s", type=float, default=330, help="start no measurement after this long")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.workloads) - set(WORKLOADS)) + sorted(set(args.configs) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown workload/config {unknown}; workloads {WORKLOADS}, configs {tuple(CONFIGS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_speed: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine "
              "(bench/gpu_check.sh), or pass --device cpu for a logic smoke test", file=sys.stderr)
        return EXIT_NO_GPU
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True  # as runtime.setup() sets it for the stages on CUDA
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    result = {"settings": settings, "machine": machine(args.device), "results": [],
              "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for config, workload in plan(args):
        if time.perf_counter() - t0 > args.budget_s:
            row = {"workload": workload, "config": config, "skipped": f"time budget ({args.budget_s:.0f} s)"}
        else:
            row = run_one(workload, config, args)
        result["results"].append(row)
        result["elapsed_s"] = round(time.perf_counter() - t0, 1)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(json.dumps(row, default=str), file=sys.stderr, flush=True)
    print(table(result["results"]))
    print(f"wrote {args.out} ({result['elapsed_s']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
