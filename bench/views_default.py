"""Cached teacher views (`distill.teacher_views: K`) against a live teacher on the default pipeline, bf16 and fp32:
would the fast path keep the default pipeline's accuracy if it were the default?

For each precision (runtime.precision bf16, then fp32): params.yaml as it is in this checkout with that
precision (tracking.system_metrics off, which changes no number), in a temp copy of the project; prepare →
teacher → scratch once, each as its own process as DVC runs them, then distill on the same teacher with
`teacher_views: 0` (live: the teacher labels every batch the student sees) and with each K of `--views`
(the default student augments, crop_padding 1, and kd reads only logits, so views apply). Writes
bench/results/views_default.json: per precision and side, the distilled students' test accuracy per seed,
mean ± std, the distill stage's wall seconds, what the teacher side was (`teacher_outputs`), and, for each views
side, the paired difference from live on the same test images with its two-level 95 % interval (each side is
evaluated by the real evaluate stage, whose predictions.npz holds the logits).

    python bench/views_default.py            # ~4 min on 2 cores; bench/results/views_default.json
    python bench/views_default.py --small --views 2 --out /tmp/v.json        # a smoke run (tiny training)
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from projectcopy import copy_project, cpu_name, run_timed, shrink  # noqa: E402
from quality import paired_against  # noqa: E402
from reproducible import git_facts, stage_env  # noqa: E402

PRECISIONS = ("bf16", "fp32")


def sides(views: list[int]) -> dict[str, int]:
    """Side name → distill.teacher_views: live first, then views<K>."""
    return {"live": 0, **{f"views{k}": k for k in views}}


def write_params(root: Path, precision: str, views, small: bool) -> None:
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params = shrink(params) if small else params
    params["runtime"]["precision"] = precision
    params["distill"]["teacher_views"] = views
    params["tracking"]["system_metrics"] = False
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def stage(root: Path, name: str, env: dict[str, str]) -> float:
    print(f"[views_default] {name}", file=sys.stderr, flush=True)
    return round(run_timed([sys.executable, "-m", f"kdpipe.stages.{name}", "--params", "params.yaml"], root, env)[0], 1)


def side_result(root: Path, seconds: float) -> dict:
    m = json.loads((root / "metrics" / "distill.json").read_text())
    return {"test_accuracy_mean": m["test_accuracy"], "test_accuracy_std": m["test_accuracy_std"],
            "per_seed": {str(r["seed"]): r["test_accuracy"] for r in m["per_seed"]},
            "teacher_outputs": m["teacher_outputs"], "precision": m["precision"], "distill_seconds": seconds}


def predictions(root: Path) -> dict:
    """The side's models/predictions.npz (the evaluate stage's), read into memory before the next side."""
    from kdpipe.report.findings import load_predictions

    return load_predictions(root / "models" / "predictions.npz")


def precision_result(precision: str, args, env: dict[str, str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="kdpipe-views-") as tmp:
        root = copy_project(Path(tmp) / "repo")
        write_params(root, precision, 0, args.small)
        for name in ("prepare", "teacher", "scratch"):
            stage(root, name, env)
        teacher = json.loads((root / "metrics" / "teacher.json").read_text())
        scratch = json.loads((root / "metrics" / "scratch.json").read_text())
        out = {"teacher_test_accuracy": teacher["test_accuracy"],
               "scratch": {"test_accuracy_mean": scratch["test_accuracy"],
                           "test_accuracy_std": scratch["test_accuracy_std"]}}
        live = None
        for side, views in sides(args.views).items():
            write_params(root, precision, views, args.small)
            out[side] = side_result(root, stage(root, "distill", env))
            stage(root, "evaluate", env)  # the side's predictions.npz: paired comparisons with live
            if live is None:
                live = predictions(root)
            else:
                out[side]["minus_live_points"] = paired_against(predictions(root), live)
    return out


def machine(env: dict[str, str], profile: str) -> dict:
    """The CPU, its profile and ATen's capability as a stage process sees it, threads, torch."""
    import subprocess

    code = "import torch; print(torch.backends.cpu.get_cpu_capability(), torch.__version__)"
    capability, torch_version = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                               text=True, check=True).stdout.split()
    return {"cpu": cpu_name(), "cpu_profile": profile, "cpu_capability": capability,
            "threads": int(env["KDPIPE_THREADS"]), "torch": torch_version}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cpu-profile", default="native", help="kdpipe/run/kernels.py PROFILES")
    parser.add_argument("--small", action="store_true", help="tiny training: a smoke run")
    parser.add_argument("--views", type=int, nargs="+", default=[4, 8], help="the Ks of the cached sides")
    parser.add_argument("--out", default="bench/results/views_default.json")
    args = parser.parse_args()
    env = stage_env(args.cpu_profile, args.threads)
    t0 = time.perf_counter()
    result = {"command": "python bench/views_default.py " + shlex.join(sys.argv[1:]), **git_facts(),
              "machine": machine(env, args.cpu_profile), "small": args.small,
              "sides": {side: f"distill.teacher_views: {k}" for side, k in sides(args.views).items()},
              **{p: precision_result(p, args, env) for p in PRECISIONS}}
    result["total_seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for p in PRECISIONS:
        for side in sides(args.views):
            r = result[p][side]
            vs = r.get("minus_live_points")
            paired = f"  vs live {vs['difference']:+.2f} ({vs['low']:+.2f} to {vs['high']:+.2f})" if vs else ""
            print(f"{p} {side:<5} {r['teacher_outputs']:<7} {100 * r['test_accuracy_mean']:.2f} ± "
                  f"{100 * r['test_accuracy_std']:.2f} %  ({r['distill_seconds']} s){paired}")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
