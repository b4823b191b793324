"""What the kd-pipeline flow costs on top of plain `dvc repro`, in seconds of wall time.

Two cases, each timed side by side (interleaved, median of `--runs`) in a fresh clone of the project:
  up to date  every stage already done (default params: the clone is built once first, that build timed too):
              `dvc repro` vs the flow in-process against a running Prefect API, vs `python -m flows.pipeline`
              against a running API and with no API configured (Prefect then starts a temporary server)
  full run    every stage rerun: `dvc repro --force` vs the flow with force=True, in-process. On tiny params
              by default: the flow's overhead is per run and per stage, not per epoch, and a forced default
              run takes minutes, so `--full-params default` is there for when time allows.

    python bench/flow_overhead.py                      # writes bench/results/flow_overhead.json, prints a table
    python bench/flow_overhead.py --params tiny --runs 3   # quick: up-to-date case on tiny params too

Measured 2026-11-28, 2-core x86_64 CPU box shared with other jobs (load 1-4), 6 stages, medians of 5:
up to date, default params: dvc repro 0.95 s; flow in-process (running API) 1.68 s, +0.73 s; CLI with a
running API 8.0 s, +7.1 s; CLI with a temporary server 14.2 s, +13.2 s. Full run, tiny params, medians of 3:
dvc repro --force 68 s, the flow 62 s: the flow's cost is below the run-to-run noise (56-70 s).
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
from projectcopy import copy_project, run_timed, shrink  # noqa: E402  (bench/projectcopy.py: this script's own folder)

from flows import _dvc  # noqa: E402


def clone(dest: Path, params: str) -> Path:
    """The project files in a fresh git repo (as a clone has them), with `default` or `tiny` params."""
    copy_project(dest)
    if params == "tiny":
        (dest / "params.yaml").write_text(yaml.safe_dump(shrink(yaml.safe_load((dest / "params.yaml").read_text())),
                                                         sort_keys=False))
    for cmd in (["init", "-q"], ["add", "-A"], ["-c", "user.name=bench", "-c", "user.email=b@b", "commit", "-qm", "init"]):
        subprocess.run(["git", *cmd], cwd=dest, check=True)
    return dest


def timed(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 3600) -> float:
    """Wall seconds of one command (projectcopy.run_timed without its output)."""
    return run_timed(cmd, cwd, env, timeout)[0]


def timed_flow(**kwargs) -> float:
    from flows.pipeline import kd_pipeline

    t0 = time.perf_counter()
    state = kd_pipeline(**kwargs, return_state=True)
    if not state.is_completed():
        raise RuntimeError(f"kd-pipeline {state.name}: {state.message}")
    return time.perf_counter() - t0


def summary(samples: list[float]) -> dict:
    return {"median": round(statistics.median(samples), 2), "min": round(min(samples), 2),
            "runs": [round(s, 2) for s in samples]}


def up_to_date_case(root: Path, runs: int, api_url: str, home: Path) -> dict:
    dvc, cli = [_dvc.dvc(), "repro"], [sys.executable, "-m", "flows.pipeline", "--repo", str(root)]
    env = _dvc.environment(KDPIPE_DEVICE=os.environ.get("KDPIPE_DEVICE", "cpu"))
    env_api = {**env, "PREFECT_API_URL": api_url}
    env_temp = {k: v for k, v in env.items() if k != "PREFECT_API_URL"} | {"PREFECT_HOME": str(home)}
    timed(cli, REPO, env_temp)  # warm-up: a fresh PREFECT_HOME's first temporary server also migrates its db
    times: dict[str, list[float]] = {k: [] for k in ("dvc_repro", "flow_in_process", "cli_running_api",
                                                     "cli_temporary_server")}
    for _ in range(runs):
        times["dvc_repro"].append(timed(dvc, root, env))
        times["flow_in_process"].append(timed_flow(repo=str(root)))
        times["cli_running_api"].append(timed(cli, REPO, env_api))
        times["cli_temporary_server"].append(timed(cli, REPO, env_temp))
    return {k: summary(v) for k, v in times.items()}


def full_run_case(root: Path, runs: int) -> dict:
    env = _dvc.environment(KDPIPE_DEVICE=os.environ.get("KDPIPE_DEVICE", "cpu"))
    timed([_dvc.dvc(), "repro"], root, env)  # first build (also creates the MLflow store once)
    times: dict[str, list[float]] = {"dvc_repro_force": [], "flow_force_in_process": []}
    for _ in range(runs):
        times["dvc_repro_force"].append(timed([_dvc.dvc(), "repro", "--force"], root, env))
        times["flow_force_in_process"].append(timed_flow(repo=str(root), force=True))
    return {k: summary(v) for k, v in times.items()}


def versions() -> dict:
    from importlib.metadata import version

    return {"python": platform.python_version(), "prefect": version("prefect"), "dvc": version("dvc"),
            "mlflow": version("mlflow"), "cpus": os.cpu_count(), "machine": platform.machine()}


def table(result: dict) -> str:
    rows = [("case", "what", "median s", "min s", "overhead s (median)")]
    up, full = result["up_to_date"], result["full_run"]
    base = up["dvc_repro"]["median"]
    for key, label in (("dvc_repro", "dvc repro"), ("flow_in_process", "kd_pipeline() in-process, running API"),
                       ("cli_running_api", "python -m flows.pipeline, running API"),
                       ("cli_temporary_server", "python -m flows.pipeline, temporary server")):
        rows.append((f"up to date ({result['params']})", label, up[key]["median"], up[key]["min"],
                     "" if key == "dvc_repro" else round(up[key]["median"] - base, 2)))
    base = full["dvc_repro_force"]["median"]
    for key, label in (("dvc_repro_force", "dvc repro --force"),
                       ("flow_force_in_process", "kd_pipeline(force=True) in-process")):
        rows.append((f"full run ({result['full_params']})", label, full[key]["median"], full[key]["min"],
                     "" if key == "dvc_repro_force" else round(full[key]["median"] - base, 2)))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", choices=["default", "tiny"], default="default", help="up-to-date case params")
    parser.add_argument("--full-params", choices=["default", "tiny"], default="tiny", help="full-run case params")
    parser.add_argument("--runs", type=int, default=5, help="repetitions of the up-to-date case")
    parser.add_argument("--full-runs", type=int, default=3, help="repetitions of the full-run case")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/flow_overhead.json")
    args = parser.parse_args()

    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import no_heartbeat

    os.environ.pop("MLFLOW_TRACKING_URI", None)  # each clone logs into its own store
    with tempfile.TemporaryDirectory(prefix="kdpipe-bench-") as tmp, prefect_test_harness(), no_heartbeat():
        tmp = Path(tmp)
        up_root = clone(tmp / "up", args.params)
        env = _dvc.environment(KDPIPE_DEVICE=os.environ.get("KDPIPE_DEVICE", "cpu"))
        stages, _ = _dvc.stage_graph(up_root, env)
        print(f"building the {args.params}-params clone ({', '.join(stages)}) ...", flush=True)
        build_s = timed([_dvc.dvc(), "repro"], up_root, env)
        print(f"built in {build_s:.0f} s; timing the up-to-date case ({args.runs} runs) ...", flush=True)
        up = up_to_date_case(up_root, args.runs, PREFECT_API_URL.value(), tmp / "prefect-home")
        print(f"timing the full-run case ({args.full_runs} runs, {args.full_params} params) ...", flush=True)
        full = full_run_case(clone(tmp / "full", args.full_params), args.full_runs)
    result = {"params": args.params, "full_params": args.full_params, "stages": stages,
              "first_build_dvc_repro_s": round(build_s, 1), "up_to_date": up, "full_run": full,
              "overhead_up_to_date_s": round(up["flow_in_process"]["median"] - up["dvc_repro"]["median"], 2),
              "overhead_full_run_s": round(full["flow_force_in_process"]["median"]
                                           - full["dvc_repro_force"]["median"], 2),
              "versions": versions(), "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
