"""What `make run` costs beyond the stages' own work: wall time vs seconds inside the stages' work functions,
the no-op rerun, and the import/start-up cost of each stage process.

In a fresh clone of the project (temp dir, the committed params.yaml: the default digits pipeline, its own
MLflow store) it runs what `make run` runs, `kdpipe check-params` then `dvc --wait-for-lock repro`, once from
cold (all six stages) with KDPIPE_TIMING set, so each stage process appends {stage, work_s, before_work_s}
(kdpipe/run/stage.py); then the same with nothing changed (`--noop-runs` times, median); then standalone import
timings. Acceptance (the issue): cold wall <= 1.2 x the sum of work_s; no-op `make run` <= 3 s.

    python bench/overhead.py                    # writes bench/results/overhead.json, prints markdown tables
    python bench/overhead.py --out /tmp/o.json  # anywhere else

Stage modules import torch and MLflow inside their work function (cheap `import kdpipe.stages.x`), so work_s
holds those imports too; the standalone figures say how many seconds of each stage's work_s they are.

Measured 2026-11-30, 2-core x86_64 CPU, quiet (load ~1): cold `make run` 52.2 s wall vs Σ work_s 39.6 s, ratio
1.32 (over the 1.2 limit): check-params 1.4 s, stage start-up 1.6 s (export 1.1 s of it), DVC and the rest
9.6 s; about 16 s of Σ work_s are torch/MLflow imports. No-op `make run` 2.23 s, median of 3 (check-params
1.5 s of it: its validation imports torch).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402
from projectcopy import copy_project, run_timed  # noqa: E402  (bench/projectcopy.py: this script's own folder)

from kdpipe.env import QUIET_ENV  # noqa: E402

BIN = Path(sys.executable).parent  # the venv's bin: its python, dvc and kdpipe come first on PATH
CHECK = [str(BIN / "kdpipe"), "check-params"]
REPRO = [str(BIN / "dvc"), "--wait-for-lock", "repro"]
LIMITS = {"wall_over_work": 1.2, "noop_s": 3.0}  # the acceptance
# Standalone imports, each `python -c <code>` in the clone (warm file cache): what a stage process pays.
IMPORTS = {
    "python_startup": "pass",
    "torch": "import torch",
    "mlflow": "import mlflow",
    "training_stage": "from kdpipe.stages import teacher; import torch, mlflow",
    "export_stage": "from kdpipe.stages import export; import torch, mlflow, onnx, onnxruntime",
}
NOTES = ("work_s: seconds inside a stage's work function, its torch/MLflow imports included (stage modules "
         "import them lazily); before_work_s: the process's age when the work began (interpreter start, "
         "kdpipe.config, argument parsing; kdpipe.run.stage.process_age). "
         "dvc_and_rest_s: dvc repro's wall less Σ before_work_s and Σ work_s, so DVC's own time plus each stage "
         "process's exit after its work. imports: `python -c <code>` in the clone, median, warm file cache; "
         "work_split: Σ work_s less one `training_stage` import (less start-up) a process.")


def clone(dest: Path) -> Path:
    """The project files in a fresh git repo, as a clone has them (DVC wants git; .dvc/ is copied)."""
    copy_project(dest)
    commit = ["-c", "user.name=bench", "-c", "user.email=b@b", "commit", "-qm", "init"]
    for cmd in (["init", "-q"], ["add", "-A"], commit):
        subprocess.run(["git", *cmd], cwd=dest, check=True)
    return dest


def environment(**extra: str) -> dict[str, str]:
    """As the Makefile exports it: telemetry off, the venv's bin first; no outside MLflow store or params."""
    env = {**os.environ, **QUIET_ENV, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for key in ("MLFLOW_TRACKING_URI", "KDPIPE_PARAMS", "KDPIPE_PARENT_RUN_ID", "KDPIPE_TIMING"):
        env.pop(key, None)  # the clone's own sqlite store (tracking.uri: null), its own params.yaml
    return env | extra


def make_run(root: Path, env: dict[str, str]) -> dict:
    """`make run`'s two commands, each timed."""
    check_s, _ = run_timed(CHECK, root, env)
    repro_s, out = run_timed(REPRO, root, env)
    return {"check_params_s": check_s, "dvc_repro_s": repro_s, "wall_s": check_s + repro_s, "output": out}


def read_timing(path: Path) -> list[dict]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.strip()]


def cold_case(root: Path, timing: Path) -> dict:
    """The first `make run` in the clone: every stage runs; each stage process reports its own seconds."""
    run = make_run(root, environment(KDPIPE_TIMING=str(timing)))
    stages = read_timing(timing)
    expected = list(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])
    work = sum(s["work_s"] for s in stages)
    before = sum(s["before_work_s"] for s in stages)
    return {
        "wall_s": round(run["wall_s"], 2),
        "check_params_s": round(run["check_params_s"], 2),
        "dvc_repro_s": round(run["dvc_repro_s"], 2),
        "stages": stages,
        "sum_work_s": round(work, 2),
        "sum_before_work_s": round(before, 2),
        # DVC's own time (its start, hashing, lock files, spawning) plus each stage's exit after its work
        "dvc_and_rest_s": round(run["dvc_repro_s"] - work - before, 2),
        "wall_over_work": round(run["wall_s"] / work, 3) if work else None,
        "stages_missing": [name for name in expected if name not in {s["stage"] for s in stages}],
        "load_avg_1_5_15_after": [round(x, 2) for x in os.getloadavg()],  # others' jobs slow it down too
    }


def noop_case(root: Path, timing: Path, runs: int) -> dict:
    """`make run` again with nothing changed: DVC only checks that every stage is up to date (`timing` stays
    empty unless a stage process ran)."""
    samples = []
    for _ in range(runs):
        run = make_run(root, environment(KDPIPE_TIMING=str(timing)))
        samples.append({k: round(run[k], 2) for k in ("wall_s", "check_params_s", "dvc_repro_s")})
    walls = [s["wall_s"] for s in samples]
    return {"median_wall_s": round(statistics.median(walls), 2), "min_wall_s": min(walls), "runs": samples,
            "stage_processes_started": len(read_timing(timing))}


def import_times(root: Path, repeats: int) -> dict:
    """Median wall seconds of `python -c <code>` for each IMPORTS entry, run in the clone."""
    env = environment()
    result = {}
    for name, code in IMPORTS.items():
        samples = [run_timed([sys.executable, "-c", code], root, env, timeout=300)[0] for _ in range(repeats)]
        result[name] = {"code": code, "median_s": round(statistics.median(samples), 2),
                        "runs": [round(s, 2) for s in samples]}
    return result


def machine() -> dict:
    from importlib.metadata import version

    return {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
            "torch": version("torch"), "dvc": version("dvc"), "mlflow": version("mlflow"),
            **{key: os.environ.get(key) for key in ("KDPIPE_THREADS", "KDPIPE_DEVICE")}}


def imports_in_work(cold: dict, imports: dict) -> dict:
    """Rough split of Σ work_s: the torch + MLflow imports each stage process does inside its work (the
    standalone `training_stage` figure less interpreter start-up, once per process) vs the rest."""
    per_process = imports["training_stage"]["median_s"] - imports["python_startup"]["median_s"]
    estimate = per_process * len(cold["stages"])
    compute = cold["sum_work_s"] - estimate
    return {"imports_per_process_s": round(per_process, 2), "imports_total_s": round(estimate, 2),
            "work_less_imports_s": round(compute, 2),
            "wall_over_work_less_imports": round(cold["wall_s"] / compute, 3) if compute > 0 else None}


def acceptance(cold: dict, noop: dict) -> dict:
    ratio, noop_s = cold["wall_over_work"], noop["median_wall_s"]
    return {"wall_over_work": {"value": ratio, "limit": LIMITS["wall_over_work"],
                               "ok": ratio is not None and ratio <= LIMITS["wall_over_work"]},
            "noop_s": {"value": noop_s, "limit": LIMITS["noop_s"], "ok": noop_s <= LIMITS["noop_s"]}}


def table(result: dict) -> str:
    cold, noop, imp = result["cold"], result["noop"], result["imports"]
    rows = ["| stage process | start + imports before work (s) | work (s) |", "|---|---:|---:|"]
    rows += [f"| {s['stage']} | {s['before_work_s']:.2f} | {s['work_s']:.2f} |" for s in cold["stages"]]
    total = f"| **all {len(cold['stages'])}** | {cold['sum_before_work_s']:.2f} | {cold['sum_work_s']:.2f} |"
    rows += [total, "", "| `make run` | seconds |", "|---|---:|",
             f"| cold, all stages: wall (check-params {cold['check_params_s']:.2f} + dvc repro "
             f"{cold['dvc_repro_s']:.2f}) | {cold['wall_s']:.2f} |",
             f"| Σ in-stage work (work_s) | {cold['sum_work_s']:.2f} |",
             f"| DVC and the rest (dvc repro − Σ start − Σ work) | {cold['dvc_and_rest_s']:.2f} |",
             f"| **wall / work** (limit {LIMITS['wall_over_work']}) | **{cold['wall_over_work']:.2f}** |",
             f"| no-op, median of {len(noop['runs'])} (limit {LIMITS['noop_s']:.0f} s) | "
             f"**{noop['median_wall_s']:.2f}** |", "",
             "| standalone `python -c` (median) | seconds |", "|---|---:|"]
    rows += [f"| `{v['code']}` | {v['median_s']:.2f} |" for v in imp.values()]
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/overhead.json")
    parser.add_argument("--noop-runs", type=int, default=3, help="repetitions of the no-op `make run`")
    parser.add_argument("--import-runs", type=int, default=3, help="repetitions of each standalone import")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="kdpipe-overhead-") as tmp:
        root = clone(Path(tmp) / "repo")
        load = os.getloadavg()
        print(f"cold `make run` in {root} (all six stages) ...", file=sys.stderr, flush=True)
        cold = cold_case(root, Path(tmp) / "timing-cold.jsonl")
        if cold["stages_missing"]:  # kept in the result: the sums then undercount the work
            print(f"warning: no timing line from {cold['stages_missing']}", file=sys.stderr)
        print(f"cold: {cold['wall_s']:.1f} s; no-op `make run` x{args.noop_runs} ...", file=sys.stderr,
              flush=True)
        noop = noop_case(root, Path(tmp) / "timing-noop.jsonl", args.noop_runs)
        print("standalone import timings ...", file=sys.stderr, flush=True)
        imports = import_times(root, args.import_runs)
    result = {
        "what": "`make run` (kdpipe check-params; dvc --wait-for-lock repro), fresh clone, default params",
        "cold": cold, "noop": noop, "imports": imports, "work_split": imports_in_work(cold, imports),
        "acceptance": acceptance(cold, noop),
        "notes": NOTES,
        "machine": machine() | {"load_avg_at_start": [round(x, 2) for x in load]},
        "command": "python bench/overhead.py (or make bench-speed)",
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
