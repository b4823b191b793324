"""Datasets larger than memory: Fashion-MNIST as an image folder of 70,000 PNGs, through prepare → teacher →
distill with `data.in_memory: false`, against the same on 10,000 of its images.

1. Writes the 70,000 Fashion-MNIST images (the Debian package's 60k train + 10k test) as
   bench/work/streaming/png70k/<class>/<n>.png, and the first 10,000 of them as png10k/.
2. Runs prepare → teacher → distill as stage processes (as DVC runs them) on each folder, streamed from disk.
   Peak memory of distill is sampled every 0.2 s as the summed PSS of the stage process and any DataLoader
   workers (psutil), and read as the main process's own maximum RSS (ru_maxrss).
3. Times distill's training on the 70k folder streamed (the default: no loader worker on a CPU), in memory, and
   streamed with one DataLoader worker, alternated, 2 rounds: images per second over the training epochs
   (metrics' train_seconds include each epoch's validation pass, alike for all).

Small models and one or two epochs: the memory figures are reached in the first steps and the throughput is a
ratio. Writes bench/results/streaming.json. Run from the repo root: `python bench/streaming.py`.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import yaml

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WORK = BENCH / "work" / "streaming"
RESULTS = BENCH / "results"
sys.path.insert(0, str(BENCH))
from projectcopy import stage_params  # noqa: E402

SIZES = (10_000, 70_000)
EPOCHS = 2


def write_folders() -> None:
    """png70k/ (every image) and png10k/ (the first 10,000), written once in parallel; kept between runs."""
    from kdpipe.data.datasets import (
        FASHION_MNIST_CLASSES,
        FASHION_MNIST_SYSTEM_DIR,
        _fashion_files,
        _read_idx_pair,
    )

    files = _fashion_files(FASHION_MNIST_SYSTEM_DIR)
    train = _read_idx_pair(files["train_images"], files["train_labels"])
    test = _read_idx_pair(files["test_images"], files["test_labels"])
    x = np.concatenate([train[0].numpy(), test[0].numpy()])[:, 0]  # (70000, 28, 28)
    y = np.concatenate([train[1].numpy(), test[1].numpy()])
    names = [c.replace("/", "-") for c in FASHION_MNIST_CLASSES]
    for n in SIZES:
        root = WORK / f"png{n // 1000}k"
        if (root / ".complete").is_file():
            continue
        t0 = time.perf_counter()
        tasks = [(root, names, x[i : i + 1000], y[i : i + 1000], i) for i in range(0, n, 1000)]
        with ProcessPoolExecutor() as pool:
            list(pool.map(_write_pngs, tasks))
        (root / ".complete").touch()
        print(f"[bench] wrote {n} PNGs in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)


def _write_pngs(task) -> None:
    from PIL import Image

    root, names, x, y, start = task
    for k, (image, label) in enumerate(zip(x, y, strict=True)):
        folder = root / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{start + k:05d}.png")


def params_for(n: int, in_memory: bool, workers: int | None = None) -> Path:
    name = f"params_{'memory' if in_memory else 'stream'}{'' if workers is None else workers}"
    return stage_params(WORK / f"run{n // 1000}k", name,
                        data={"dataset": "imagefolder", "folder": str(WORK / f"png{n // 1000}k"), "image_size": 28,
                              "in_memory": in_memory, "workers": workers},
                        teacher={"model": "small_cnn", "epochs": 1, "warmup_epochs": 0, "batch_size": 128},
                        student={"seeds": [0], "epochs": EPOCHS, "warmup_epochs": 0, "batch_size": 128,
                                 "patience": 0, "crop_padding": 2, "flip": True},
                        paths={"raw": str(WORK)})  # data.folder must lie under paths.raw (prepare's DVC dep)


def run_stage(stage: str, params: Path) -> dict:
    """One stage process; its wall time, peak summed RSS of its process tree and its own ru_maxrss (MiB)."""
    import psutil

    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", f"kdpipe.stages.{stage}", "--params", str(params)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, done = [0], threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:  # PSS: pages a forked worker shares with its parent are counted once, not twice
                tree = [root, *root.children(recursive=True)]
                peak[0] = max(peak[0], sum(p.memory_full_info().pss for p in tree))
            except psutil.Error:
                pass
            time.sleep(0.2)  # reading smaps costs CPU: sampled more often it slowed the stage measured

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    sampler.join()
    if status != 0:
        raise SystemExit(f"{stage} failed:\n{out[-3000:]}")
    return {"seconds": round(time.perf_counter() - t0, 1), "tree_peak_pss_mib": round(peak[0] / 2**20, 1),
            "process_peak_mib": round(usage.ru_maxrss / 1024, 1)}


def distill_rate(params: Path) -> float:
    """Training images per second of the last distill run (train split × epochs / train_seconds)."""
    cfg = yaml.safe_load(params.read_text())
    metrics = json.loads((Path(cfg["paths"]["metrics"]) / "distill.json").read_text())
    meta = json.loads((Path(cfg["paths"]["prepared"]) / "meta.json").read_text())
    seconds = metrics["per_seed"][0]["train_seconds"]
    return meta["sizes"]["train"] * metrics["per_seed"][0]["epochs_run"] / seconds


def main() -> None:
    sys.path.insert(0, str(REPO))
    write_folders()
    result: dict = {"epochs": EPOCHS, "runs": {}}
    for n in SIZES:
        params = params_for(n, in_memory=False)
        runs = {stage: run_stage(stage, params) for stage in ("prepare", "teacher", "distill")}
        print(f"[bench] {n}: {runs}", file=sys.stderr, flush=True)
        result["runs"][n] = runs
    variants = {"streamed": params_for(70_000, in_memory=False), "in_memory": params_for(70_000, in_memory=True),
                "streamed_1_worker": params_for(70_000, in_memory=False, workers=1)}
    rates: dict[str, list[float]] = {label: [] for label in variants}
    for _ in range(2):
        for label, params in variants.items():
            run_stage("distill", params)
            rates[label].append(round(distill_rate(params), 1))
            print(f"[bench] {label}: {rates[label][-1]} img/s", file=sys.stderr, flush=True)
    small, large = (result["runs"][n]["distill"] for n in SIZES)
    result.update(
        rates=rates,
        streamed_over_in_memory=round(statistics.median(rates["streamed"]) / statistics.median(rates["in_memory"]), 3),
        one_worker_over_in_memory=round(statistics.median(rates["streamed_1_worker"])
                                        / statistics.median(rates["in_memory"]), 3),
        tree_pss_peak_ratio_70k_over_10k=round(large["tree_peak_pss_mib"] / small["tree_peak_pss_mib"], 3),
        process_peak_ratio_70k_over_10k=round(large["process_peak_mib"] / small["process_peak_mib"], 3),
        machine={"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "streaming.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
