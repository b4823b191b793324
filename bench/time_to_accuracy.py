"""Time to accuracy: wall time until validation accuracy is within 0.3 points of the run's best, torchdistill
1.1.5 against kdpipe's engine on the same recipe (issue 35 item 4).

The recipe, identical on both sides: a resnet20 teacher (trained here once by kdpipe's fit, natively, and kept
in bench/work/time_to_accuracy/; frozen, eval mode) → resnet8 student (built under torch.manual_seed(seed), the
same initial weights on both sides); the first `--train-size` (8,192) Fashion-MNIST train images, padded 28 → 32
and repeated to 3 channels (bench/speed.py's load_images), validated on the next `--val-size` (2,048) train
images (the test split is never read); random crop (padding 4) + flip; batches of 128 (64 a epoch, none
partial); 0.5·CE + 0.5·T²·KL, T = 4; SGD lr 0.1, momentum 0.9, weight decay 5e-4; cosine decay per step over
`--epochs` (5) epochs, no warm-up (kdpipe's lr_factor; torchdistill's LambdaLR stepped per step with the same
factor). Each side validates after every epoch the way it is used: torchdistill through a DataLoader over
ToTensor'd PIL images (its examples' evaluate loop), kdpipe through its fit() (score: the split as uint8 on the
device, batches of 512, in its runtime precision).

What is timed: from the first training step to the end of each epoch's validation, cumulative (data loading and
model building before it are not). Time to accuracy of a run: the cumulative wall at the first epoch whose
validation accuracy is within `--within` (0.3) points of that run's best. Each (side, seed) runs in its own
process, one at a time, the side order alternating with the seed. The last epoch's students are also scored in
fp32 on the validation images, image by image, for the paired interval kdpipe − torchdistill over images and
seeds (kdpipe/evidence.py).

    python bench/time_to_accuracy.py                    # native profile → bench/results/time_to_accuracy.json
    python bench/time_to_accuracy.py --cpu-profile avx2 # the AVX2 block of the same file
    python bench/time_to_accuracy.py --seeds 0 --epochs 1 --train-size 512 --val-size 256 --out /tmp/t.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import speed

REPO = speed.REPO
WORK = REPO / "bench" / "work" / "time_to_accuracy"
SIDES = ("torchdistill", "kdpipe")
TEACHER, STUDENT, TEACHER_EPOCHS = "resnet20", "resnet8", 8


def recipe(epochs: int, model: str = STUDENT):
    """The student's (and, with more epochs, the teacher's) kdpipe recipe: bench/speed.py's, cosine per step."""
    from kdpipe.config import StudentConfig

    return StudentConfig(model=model, epochs=epochs, batch_size=speed.BATCH, optimizer="sgd", lr=speed.LR,
                         momentum=speed.MOMENTUM, nesterov=False, weight_decay=speed.WEIGHT_DECAY, warmup_epochs=0,
                         schedule="cosine", crop_padding=speed.CROP_PADDING, flip=True, patience=0)


def split_data(args):
    """(train x, train y, val x, val y): uint8 images (N, 3, 32, 32), int64 labels."""
    x, y = speed.load_images(args.train_size + args.val_size)
    n = args.train_size
    return x[:n], y[:n], x[n:], y[n:]


def teacher_path(args) -> Path:
    return WORK / f"teacher-{TEACHER}-{args.train_size}-{TEACHER_EPOCHS}ep.pt"


def train_teacher(args) -> dict:
    """kdpipe's fit on the train images (CE, the recipe over TEACHER_EPOCHS epochs, seed 0), saved once."""
    import torch

    from kdpipe.data.batches import Split
    from kdpipe.models.zoo import build_model
    from kdpipe.run.runtime import make_runtime
    from kdpipe.train.engine import fit

    tx, ty, vx, vy = split_data(args)
    rt = make_runtime("cpu")
    torch.manual_seed(0)
    teacher = rt.prepare(build_model(TEACHER, 3, 10))
    t0 = time.perf_counter()
    result = fit(teacher, Split(tx, ty), Split(vx, vy), recipe(TEACHER_EPOCHS, TEACHER), rt, seed=0, desc="teacher")
    facts = {"model": TEACHER, "epochs": TEACHER_EPOCHS, "val_accuracy": result.best_val_accuracy,
             "seconds": round(time.perf_counter() - t0, 1), "precision": rt.precision}
    WORK.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in teacher.state_dict().items()}
    torch.save({"state_dict": state, "facts": facts}, teacher_path(args))
    return facts


def load_teacher(args):
    """The frozen teacher and its facts."""
    import torch

    from kdpipe.models.zoo import build_model
    from kdpipe.train.distiller import freeze

    saved = torch.load(teacher_path(args), weights_only=True)
    teacher = build_model(TEACHER, 3, 10)
    teacher.load_state_dict(saved["state_dict"])
    return freeze(teacher), saved["facts"]


def build_student(seed: int):
    import torch

    from kdpipe.models.zoo import build_model

    torch.manual_seed(seed)
    return build_model(STUDENT, 3, 10)


# ----------------------------------------------------------------------------------------------- the sides
# Each returns ([{epoch, val_accuracy, seconds (cumulative)}], the last epoch's student).


def run_torchdistill(args, seed: int, teacher, data):
    import torch
    from torch.optim.lr_scheduler import LambdaLR
    from torchdistill.core.distillation import DistillationBox

    from kdpipe.train.engine import lr_factor

    tx, ty, vx, vy = data
    student, cfg = build_student(seed), recipe(args.epochs)
    n_batches = args.train_size // speed.BATCH
    # the schedule per step, kdpipe's factor at the same fractional epoch (LambdaLR's step count = steps done)
    scheduler = {"key": LambdaLR.__name__, "scheduling_step": 1,
                 "kwargs": {"lr_lambda": lambda step: lr_factor(step / n_batches, cfg)}}
    config = speed.torchdistill_kd_config(num_epochs=args.epochs, scheduler=scheduler)
    box = DistillationBox(teacher, student, {"train": speed.PilImages(tx, ty)}, config, torch.device("cpu"),
                          None, False, 1)
    val_loader = torch.utils.data.DataLoader(speed.PilImages(vx, vy, augment=False), batch_size=512)
    history, t0 = [], time.perf_counter()
    for epoch in range(args.epochs):
        box.pre_epoch_process(epoch=epoch)
        for sample_batch, targets, supp_dict in box.train_data_loader:
            box.pre_forward_process(sample_batch=sample_batch, targets=targets, supp_dict=supp_dict)
            box.post_forward_process(loss=box.forward_process(sample_batch, targets, supp_dict))
        history.append({"epoch": epoch + 1, "val_accuracy": evaluate_loader(student, val_loader),
                        "seconds": time.perf_counter() - t0})
    return history, student


def evaluate_loader(model, loader) -> float:
    """torchdistill's examples' evaluate: eval mode, no_grad, top-1 over the loader; the model back in train."""
    import torch

    model.eval()
    correct = seen = 0
    with torch.no_grad():
        for images, labels in loader:
            correct += (model(images).argmax(1) == labels).sum().item()
            seen += len(labels)
    model.train()
    return correct / seen


def run_kdpipe(args, seed: int, teacher, data):
    from kdpipe.config import DistillConfig
    from kdpipe.data.batches import Split
    from kdpipe.run.runtime import make_runtime
    from kdpipe.train.distiller import distill_loss, fold_batchnorm
    from kdpipe.train.engine import fit
    from kdpipe.train.objective import Objective

    tx, ty, vx, vy = data
    rt = make_runtime("cpu")  # the defaults: precision auto, channels_last
    teacher = rt.prepare(fold_batchnorm(teacher))  # as the distill stage prepares a logits-only teacher
    weights = {"ce": speed.ALPHA, "kd": 1 - speed.ALPHA}
    loss_fn = distill_loss(DistillConfig(method="kd", weights=weights, temperature=speed.TEMPERATURE), teacher,
                           weights=weights)
    student, history = rt.prepare(build_student(seed)), []
    t0 = time.perf_counter()

    def on_epoch(row: dict) -> None:
        history.append({"epoch": row["epoch"], "val_accuracy": row["val_accuracy"],
                        "seconds": time.perf_counter() - t0})

    fit(student, Split(tx, ty), Split(vx, vy), recipe(args.epochs), rt, seed=seed, objective=Objective(loss_fn),
        on_epoch=on_epoch, desc=f"kdpipe seed {seed}", restore_best=False)
    return history, student


def run_child(args) -> dict:
    """One (side, seed) in this process: its validation curve, time to accuracy, last epoch's correctness."""
    import torch

    from kdpipe.run.runtime import make_runtime
    from kdpipe.train.inference import predict

    torch.set_num_threads(args.threads)
    data = split_data(args)
    teacher, _ = load_teacher(args)
    torch.manual_seed(args.seed)  # torchdistill's sampler and transforms draw from the global generator
    side = {"torchdistill": run_torchdistill, "kdpipe": run_kdpipe}[args.side]
    history, student = side(args, args.seed, teacher, data)
    exact = make_runtime("cpu", "fp32", channels_last=False)
    correct = (predict(student, data[2], exact).argmax(1) == data[3]).tolist()
    return {"side": args.side, "seed": args.seed, "history": history, **time_to(history, args.within),
            "final_val_correct": correct, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "precision": make_runtime("cpu").precision if args.side == "kdpipe" else "fp32"}


def time_to(history: list[dict], within: float) -> dict:
    """The first epoch within `within` points of the best validation accuracy, and the wall until it."""
    best = max(row["val_accuracy"] for row in history)
    first = next(row for row in history if row["val_accuracy"] >= best - within / 100)
    return {"best_val_accuracy": best, "epoch_reached": first["epoch"], "seconds_to_accuracy": first["seconds"],
            "total_seconds": history[-1]["seconds"]}


# ---------------------------------------------------------------------------------- the runs, in the parent


def spawn(side: str, seed: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        flags = ["--side", side, "--seed", seed, "--json-out", out, "--epochs", args.epochs, "--within", args.within,
                 "--train-size", args.train_size, "--val-size", args.val_size, "--threads", args.threads]
        env = {**speed.profile_environ(args.cpu_profile), "OMP_NUM_THREADS": str(args.threads)}
        subprocess.run([sys.executable, __file__, *map(str, flags)], cwd=REPO, env=env, check=True)
        return json.loads(out.read_text())


def ensure_teacher(args) -> dict:
    """The teacher's facts, training it first (in a native-profile process) when it is not there yet."""
    if not teacher_path(args).is_file():
        flags = ["--train-teacher", "--train-size", args.train_size, "--val-size", args.val_size,
                 "--threads", args.threads]
        subprocess.run([sys.executable, __file__, *map(str, flags)], cwd=REPO, check=True,
                       env={**speed.profile_environ("native"), "OMP_NUM_THREADS": str(args.threads)})
    import torch

    return torch.load(teacher_path(args), weights_only=True)["facts"]


def summarise(runs: list[dict], args) -> dict:
    """Per side: seconds to accuracy per seed and their median, best accuracies; the paired comparisons."""
    import numpy as np

    from kdpipe.evidence import paired_bootstrap

    by_side = {side: sorted((r for r in runs if r["side"] == side), key=lambda r: r["seed"]) for side in SIDES}
    out = {}
    for side, rs in by_side.items():
        best = [100 * r["best_val_accuracy"] for r in rs]
        out[side] = {"seconds_to_accuracy": [round(r["seconds_to_accuracy"], 1) for r in rs],
                     "seconds_to_accuracy_median": round(statistics.median(r["seconds_to_accuracy"] for r in rs), 1),
                     "epoch_reached": [r["epoch_reached"] for r in rs],
                     "total_seconds": [round(r["total_seconds"], 1) for r in rs],
                     "best_val_accuracy_pct": [round(b, 2) for b in best],
                     "best_val_accuracy_mean_std": mean_std(best),
                     "final_val_accuracy_pct": [round(100 * float(np.mean(r["final_val_correct"])), 2) for r in rs],
                     "precision": rs[0]["precision"], "cpu_capability": rs[0]["cpu_capability"],
                     "curves": {r["seed"]: r["history"] for r in rs}}
    td, kd = by_side["torchdistill"], by_side["kdpipe"]
    speedups = [a["seconds_to_accuracy"] / b["seconds_to_accuracy"] for a, b in zip(td, kd, strict=True)]
    diff = paired_bootstrap(np.array([r["final_val_correct"] for r in kd], dtype=float),
                            np.array([r["final_val_correct"] for r in td], dtype=float))
    return {"sides": out, "speedup_to_accuracy": {"per_seed": [round(s, 2) for s in speedups],
                                                   "median": round(statistics.median(speedups), 2)},
            "final_val_kdpipe_minus_torchdistill_points": {k: round(100 * v, 2) if k in ("difference", "low", "high")
                                                           else v for k, v in diff.items()}}


def mean_std(values: list[float]) -> list[float]:
    return [round(statistics.mean(values), 2), round(statistics.stdev(values), 2) if len(values) > 1 else math.nan]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--seeds", type=int, nargs="+", default=[0, 1, 2])
    add("--epochs", type=int, default=5)
    add("--within", type=float, default=0.3, help="points below the run's best that count as reached")
    add("--train-size", type=int, default=8_192)
    add("--val-size", type=int, default=2_048)
    add("--threads", type=int, default=2)
    add("--cpu-profile", default="native", choices=("native", "avx2"))
    add("--out", default="bench/results/time_to_accuracy.json")
    add("--side", choices=SIDES, help=argparse.SUPPRESS)  # internal: one run, in a child process
    add("--seed", type=int, help=argparse.SUPPRESS)
    add("--json-out", help=argparse.SUPPRESS)
    add("--train-teacher", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train_teacher:
        print(json.dumps(train_teacher(args)))
        return 0
    if args.side:
        Path(args.json_out).write_text(json.dumps(run_child(args)))
        return 0
    t0 = time.perf_counter()
    teacher = ensure_teacher(args)
    runs = []
    for i, seed in enumerate(args.seeds):
        for side in (SIDES if i % 2 == 0 else SIDES[::-1]):
            print(f"[tta] seed {seed}: {side}", file=sys.stderr, flush=True)
            runs.append(spawn(side, seed, args))
    from projectcopy import cpu_name

    command = ["python", "bench/time_to_accuracy.py", "--cpu-profile", args.cpu_profile, "--seeds",
               *map(str, args.seeds), "--epochs", str(args.epochs), "--train-size", str(args.train_size),
               "--val-size", str(args.val_size), "--within", str(args.within), "--out", args.out]
    result = {"command": " ".join(command), "cpu": cpu_name(), "threads": args.threads, "teacher": teacher,
              "student": STUDENT, **summarise(runs, args), "wall_seconds": round(time.perf_counter() - t0, 1)}
    out = Path(args.out)
    kept = json.loads(out.read_text()).get("profiles", {}) if out.is_file() else {}
    out.write_text(json.dumps({"profiles": {**kept, args.cpu_profile: result}}, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "sides"}, indent=2))
    for side, s in result["sides"].items():
        print(side, s["seconds_to_accuracy"], s["best_val_accuracy_pct"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
