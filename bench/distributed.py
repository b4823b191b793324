"""Data-parallel training on this machine: the scratch stage in 1 and in 2 processes (runtime.processes), same
global batch, alternated over 2 rounds.

Fashion-MNIST (the Debian package), a 10,000-image training pool, a resnet20 student (enough compute per step
for the all-reduce to be a fair share of it), 2 epochs, fp32, stage processes as DVC runs them. Images per
second are the training split × epochs / the stage's train_seconds (which include each epoch's validation pass,
alike in both); per process is the total divided by the processes. On a 2-core CPU the two ranks share the cores
the single process used (one thread each), so this measures the cost of the machinery, not a speed-up: that
comes from more GPUs or hosts. Writes bench/results/distributed.json. Run from the repo root:
`python bench/distributed.py`.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WORK = BENCH / "work" / "distributed"
RESULTS = BENCH / "results"
ROUNDS = 2
sys.path.insert(0, str(BENCH))
from projectcopy import stage_params  # noqa: E402


def params_for(processes: int) -> Path:
    return stage_params(WORK, f"params_{processes}",
                        data={"dataset": "fashion_mnist", "train_subset": 10_000},
                        student={"model": "resnet20", "seeds": [0], "epochs": 2, "warmup_epochs": 0,
                                 "batch_size": 128, "patience": 0},
                        runtime={"precision": "fp32", "processes": processes})


def run_stage(stage: str, params: Path) -> None:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "KDPIPE_DEVICE": "cpu"}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run([sys.executable, "-m", f"kdpipe.stages.{stage}", "--params", str(params)], cwd=REPO,
                         env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{stage} failed:\n{out.stderr[-3000:]}")


def train_images() -> int:
    return json.loads((WORK / "data" / "prepared" / "meta.json").read_text())["sizes"]["train"]


def rate() -> float:
    seed = json.loads((WORK / "metrics" / "scratch.json").read_text())["per_seed"][0]
    return train_images() * seed["epochs_run"] / seed["train_seconds"]


def main() -> None:
    run_stage("prepare", params_for(1))
    rates: dict[int, list[float]] = {1: [], 2: []}
    accuracy: dict[int, float] = {}
    for _ in range(ROUNDS):
        for processes in (1, 2):
            run_stage("scratch", params_for(processes))
            rates[processes].append(round(rate(), 1))
            accuracy[processes] = json.loads((WORK / "metrics" / "scratch.json").read_text())["test_accuracy"]
            print(f"[bench] {processes} process(es): {rates[processes][-1]} img/s", file=sys.stderr, flush=True)
    total = {p: statistics.median(r) for p, r in rates.items()}
    result = {
        "student": "resnet20", "train_images": train_images(),
        "epochs": 2, "global_batch": 128, "rounds": rates,
        "images_per_s_total": total, "images_per_s_per_process": {p: round(total[p] / p, 1) for p in total},
        "two_over_one": round(total[2] / total[1], 3), "test_accuracy": accuracy,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distributed.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
