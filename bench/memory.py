"""Peak memory of the distill stage on the full Fashion-MNIST training set (60,000 images).

Runs prepare → teacher → distill as stage processes (as DVC runs them) on a copy of the project in
bench/work/memory/, with the whole 60k training pool, a resnet20 teacher and a tiny_cnn student trained for one
epoch each (peak memory is reached in the first epoch: the data, the models and the optimizer are all there by
then), once with a live teacher and once with cached views. Each distill process runs under /usr/bin/time,
whose maximum resident set size is the figure. Writes bench/results/memory.json. Run from the repo root:
`python bench/memory.py`.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WORK = BENCH / "work" / "memory"
RESULTS = BENCH / "results"
sys.path.insert(0, str(BENCH))
from projectcopy import copy_project  # noqa: E402

LIMIT_GIB = 1.5  # the bound for the Fashion-MNIST distill stage


def params_for(root: Path, teacher_views: int) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(dataset="fashion_mnist", train_subset=None)
    params["teacher"].update(epochs=1, warmup_epochs=0, batch_size=128)
    params["student"].update(seeds=[0], epochs=1, warmup_epochs=0, batch_size=128, crop_padding=2, flip=True)
    params["distill"]["teacher_views"] = teacher_views
    params["tracking"].update(uri=f"sqlite:///{root / 'mlflow.db'}", system_metrics=False)
    return params


def run_stage(root: Path, stage: str, params: Path) -> float:
    """Run one stage process; return its peak RSS in MiB (GNU time's %M is KiB)."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = ["/usr/bin/time", "-f", "peak_rss_kib=%M", sys.executable, "-m", f"kdpipe.stages.{stage}",
           "--params", str(params)]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench: {stage} failed:\n{proc.stderr[-3000:]}")
    line = [x for x in proc.stderr.splitlines() if x.startswith("peak_rss_kib=")][-1]
    return int(line.split("=")[1]) / 1024


def main() -> int:
    shutil.rmtree(WORK, ignore_errors=True)
    root = copy_project(WORK)
    result = {"dataset": "fashion_mnist", "train_images": None, "limit_gib": LIMIT_GIB, "peak_rss_mib": {},
              "command": "python bench/memory.py"}
    for label, views in (("live", 0), ("views4", 4)):
        params = root / f"params_{label}.yaml"
        params.write_text(yaml.safe_dump(params_for(root, views), sort_keys=False))
        if label == "live":
            for stage in ("prepare", "teacher"):
                result["peak_rss_mib"][stage] = round(run_stage(root, stage, params), 1)
        result["peak_rss_mib"][f"distill_{label}"] = round(run_stage(root, "distill", params), 1)
        print(f"[memory] distill ({label}): {result['peak_rss_mib'][f'distill_{label}']:.0f} MiB", file=sys.stderr)
    meta = json.loads((root / "data/prepared/meta.json").read_text())
    result["train_images"] = meta["sizes"]["train"]
    worst = max(v for k, v in result["peak_rss_mib"].items() if k.startswith("distill"))
    result["distill_within_limit"] = worst / 1024 <= LIMIT_GIB
    result["machine"] = {"python": platform.python_version(), "cpu": platform.processor() or platform.machine()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memory.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
