"""The reproducible mode (runtime.reproducible: true) on the default pipeline, and what the mode costs in speed.

Default: params.yaml as it is in this checkout with `runtime.reproducible: true` (and tracking.system_metrics
off, which changes no number), in a temp copy of the project, the stages prepare → teacher → scratch → distill
→ evaluate each run as its own process (as DVC runs them) with KDPIPE_THREADS=--threads (the numbers hold for
one thread count). Writes bench/results/reproducible.json: the param, the pins, the CPU and its profile, and
the test accuracy of the teacher and of every scratch and distilled seed. Rerun on another x86-64 CPU with AVX2
(or here with `--cpu-profile avx2`, AVX-512 switched off) and the accuracies must be the same to the last digit.

`--speed`: bench/speed.py's kdpipe_online and kdpipe_ce steps in fp32 under the native, avx2 and reproducible
CPU profiles, alternating within each round; images/s per profile and the reproducible/native ratio per round.

    python bench/reproducible.py                       # ~5 min on 2 cores; bench/results/reproducible.json
    python bench/reproducible.py --cpu-profile avx2 --out /tmp/r.json --compare bench/results/reproducible.json
    python bench/reproducible.py --small --out /tmp/r.json                                  # a smoke run
    python bench/reproducible.py --speed               # bench/results/reproducible_speed.json; quiet machine only
    python bench/reproducible.py --speed --rounds 1 --steps 2 --warmup 1 --out /tmp/s.json   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from projectcopy import copy_project, cpu_name, run_timed, shrink  # noqa: E402

STAGES = ("prepare", "teacher", "scratch", "distill", "evaluate")
PARAM = {"runtime": {"reproducible": True}}  # what turns the mode on; nothing else in params.yaml changes


def mode_params(root: Path, small: bool = False) -> Path:
    """The checkout's params.yaml with the mode on (and system-metrics sampling off), written into `root`;
    `small`: projectcopy.shrink's tiny training, for a smoke run."""
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params = shrink(params) if small else params
    params["runtime"].update(PARAM["runtime"])
    params["tracking"]["system_metrics"] = False
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def stage_env(profile: str, threads: int) -> dict[str, str]:
    """A stage process's environment: the venv on PATH, quiet tools, CPU, `threads` threads, the profile's caps
    in place of any this process was given."""
    from kdpipe.env import QUIET_ENV
    from kdpipe.run.kernels import KNOBS, profile_env

    env = {k: v for k, v in os.environ.items() if k not in KNOBS and k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **QUIET_ENV, **profile_env(profile), "KDPIPE_DEVICE": "cpu",
            "KDPIPE_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}


def run_pipeline(root: Path, env: dict[str, str]) -> dict[str, float]:
    """Every stage once, in order, in the project copy `root` (its own kdpipe first on sys.path); wall seconds."""
    seconds = {}
    for stage in STAGES:
        print(f"[reproducible] {stage}", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", f"kdpipe.stages.{stage}", "--params", "params.yaml"]
        seconds[stage] = round(run_timed(cmd, root, env)[0], 1)
    return seconds


def accuracies(root: Path) -> dict:
    """Test accuracy of the teacher and of each scratch and distilled seed, from the stages' metrics JSON."""
    def read(stage: str) -> dict:
        return json.loads((root / "metrics" / f"{stage}.json").read_text())

    teacher, evaluate = read("teacher"), read("evaluate")
    out = {"teacher": {"model": teacher["model"], "test_accuracy": teacher["test_accuracy"]}}
    for stage in ("scratch", "distill"):
        m = read(stage)
        out[stage] = {"model": m["model"], "test_accuracy_mean": m["test_accuracy"],
                      "test_accuracy_std": m["test_accuracy_std"],
                      "per_seed": {str(r["seed"]): r["test_accuracy"] for r in m["per_seed"]}}
    out["gap_recovered"] = evaluate["gap_recovered"]
    out["reproducible_in_metrics"] = all(read(s)["reproducible"] for s in ("teacher", "scratch", "distill"))
    return out


def machine(env: dict[str, str], profile: str) -> dict:
    """The CPU, the profile and ATen's capability as a stage process sees it, threads, versions."""
    from kdpipe.run.kernels import REPRODUCIBLE_ENV, profile_env

    code = "import torch; print(torch.backends.cpu.get_cpu_capability(), torch.__version__)"
    probe = {**env, **REPRODUCIBLE_ENV}
    capability, torch_version = subprocess.run([sys.executable, "-c", code], env=probe, capture_output=True,
                                               text=True, check=True).stdout.split()
    return {"cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "cpu_profile": profile, "cpu_profile_env": profile_env(profile), "cpu_capability_pinned": capability,
            "threads": int(env["KDPIPE_THREADS"]), "torch": torch_version, "python": platform.python_version()}


def pipeline_result(args) -> dict:
    from kdpipe.run.kernels import REPRODUCIBLE_ENV

    env = stage_env(args.cpu_profile, args.threads)
    with tempfile.TemporaryDirectory(prefix="kdpipe-reproducible-") as tmp:
        root = copy_project(Path(tmp) / "repo")
        mode_params(root, args.small)
        t0 = time.perf_counter()
        seconds = run_pipeline(root, env)
        result = {"param": "runtime.reproducible: true", "params_changed": PARAM, "small": args.small,
                  "code_sha256": code_digest(root), "pins": REPRODUCIBLE_ENV,
                  "machine": machine(env, args.cpu_profile), **accuracies(root),
                  "stage_seconds": seconds, "total_seconds": round(time.perf_counter() - t0, 1)}
    return {"command": reproduce(args), **git_facts(), **result}


def code_digest(root: Path) -> str:
    """sha256 over the copied kdpipe/ sources (path and bytes): which code gave these numbers, dirty tree or not."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted((root / "kdpipe").rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


COMPARED = ("teacher", "scratch", "distill", "gap_recovered")


def compare(result: dict, reference: Path) -> list[str]:
    """The accuracies that differ from those in `reference` (a reproducible.json), one line each."""
    ref = json.loads(reference.read_text())
    return [f"{key}: {result[key]} here, {ref[key]} in {reference}" for key in COMPARED if result[key] != ref[key]]


# ---------------------------------------------------------------------------------------- --speed: the cost


def speed_result(args) -> dict:
    """kdpipe_online and kdpipe_ce at fp32 under each profile, alternating within a round (bench/speed.py)."""
    import speed

    profiles, sides = ("native", "avx2", "reproducible"), ("kdpipe_online", "kdpipe_ce")
    rates: dict[str, dict[str, list]] = {side: {p: [] for p in profiles} for side in sides}
    for r in range(args.rounds):
        order = profiles[r % 3:] + profiles[: r % 3]
        for side in sides:
            for profile in order:
                print(f"[reproducible --speed] round {r + 1}: {side}, {profile}", file=sys.stderr, flush=True)
                side_args = argparse.Namespace(steps=args.steps, warmup=args.warmup, views=2, train_size=args.train_size,
                                               threads=args.threads, precision="fp32", cpu_profile=profile)
                run = speed.spawn(side, side_args)
                ok = "error" not in run
                if not ok:
                    print(f"[reproducible --speed] {side}, {profile} failed:", *run["error"], sep="\n  ",
                          file=sys.stderr)
                rates[side][profile].append(speed.throughput(run, args.min_cpu_share)["images_s"] if ok else None)
    summary = {side: {p: speed.spread(v) for p, v in by.items()} for side, by in rates.items()}
    for side, by in rates.items():
        pairs = zip(by["reproducible"], by["native"], strict=True)
        summary[side]["ratio_reproducible_native"] = speed.spread([a / b if a and b else None for a, b in pairs])
    return {"command": reproduce(args), **git_facts(), "work": "bench/speed.py's work, fp32",
            "steps": args.steps, "rounds": args.rounds, "threads": args.threads, "images_s": summary,
            "loadavg_at_end": [round(v, 2) for v in os.getloadavg()]}


def git_facts() -> dict[str, object]:
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return {"git_commit": git("rev-parse", "HEAD") or "unknown",
            "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no", "kdpipe"))}


def reproduce(args) -> str:
    flags = ["--cpu-profile", args.cpu_profile, "--threads", args.threads, *(["--small"] if args.small else []),
             "--out", args.out]
    if args.speed:
        flags = ["--speed", "--rounds", args.rounds, "--steps", args.steps, "--warmup", args.warmup,
                 "--train-size", args.train_size, "--min-cpu-share", args.min_cpu_share, *flags]
    return shlex.join(["python", "bench/reproducible.py", *map(str, flags)])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--cpu-profile", default="native", choices=("native", "avx2"), help="kernel caps the stages start with")
    add("--threads", type=int, default=2, help="torch threads in every stage (default 2)")
    add("--small", action="store_true", help="tiny training (bench/projectcopy.py shrink): a smoke run")
    add("--speed", action="store_true", help="measure the mode's speed cost instead (bench/speed.py's steps)")
    add("--rounds", type=int, default=3)
    add("--steps", type=int, default=40)
    add("--warmup", type=int, default=5)
    add("--train-size", type=int, default=10_240)
    add("--min-cpu-share", type=float, default=0.75)
    add("--compare", type=Path, help="exit 1 unless the accuracies equal this reproducible.json's")
    add("--out", default=None, help="default bench/results/reproducible.json (--speed: reproducible_speed.json)")
    args = parser.parse_args()
    args.out = args.out or f"bench/results/reproducible{'_speed' if args.speed else ''}.json"
    return args


def main() -> int:
    args = parse_args()
    result = speed_result(args) if args.speed else pipeline_result(args)
    out = REPO / args.out if not Path(args.out).is_absolute() else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("command",)}, indent=1)[:3000])
    print(f"wrote {out}", file=sys.stderr)
    if args.compare and not args.speed:
        differ = compare(result, args.compare)
        print(*differ or [f"same accuracies as {args.compare}"], sep="\n", file=sys.stderr)
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
