"""Teacher forward speed with and without its BatchNorms folded (kdpipe.train.distiller.fold_batchnorm): resnet56 at
3×32×32, batch 128, 2 threads, the default runtime (bf16 autocast + channels_last where the CPU has native bf16).
Prints images/s, median of 5 repeats of 15 batches each. Run from the repo root: `python bench/teacher_forward.py`.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def images_per_second(model, rt, batches: int = 15) -> float:
    x = rt.layout(torch.rand(128, 3, 32, 32))
    with torch.inference_mode(), rt.autocast():
        for _ in range(3):  # warm-up
            model(x)
        t0 = time.perf_counter()
        for _ in range(batches):
            model(x)
    return 128 * batches / (time.perf_counter() - t0)


def main() -> int:
    from kdpipe.models.zoo import build_model
    from kdpipe.run.runtime import make_runtime
    from kdpipe.train.distiller import fold_batchnorm, freeze

    torch.set_num_threads(2)
    rt = make_runtime("cpu")
    torch.manual_seed(0)
    teacher = freeze(build_model("resnet56", 3, 10))
    folded = rt.prepare(fold_batchnorm(teacher))
    plain = rt.prepare(teacher)
    runs = {"plain": [], "folded": []}
    for _ in range(5):  # alternated, so both see the same machine
        runs["plain"].append(images_per_second(plain, rt))
        runs["folded"].append(images_per_second(folded, rt))
    print(f"precision {rt.precision}, channels_last {rt.channels_last}")
    for name, values in runs.items():
        print(f"resnet56 forward, {name}: {statistics.median(values):.0f} img/s (median of 5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
