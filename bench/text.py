"""Text benchmark: on WordNet 3.0 noun glosses (bench/text_corpus.py, Debian's wordnet-base), does distilling a
small transformer teacher into a 1-D CNN beat the same CNN trained from scratch, over 3 seeds?

Runs the six stage workers (prepare → teacher → scratch → distill → evaluate → export) in-process on
bench/recipes/text.yaml, everything under bench/work/text/ (its own MLflow store), and writes
bench/results/text.json: teacher, scratch and distilled test accuracy (mean ± std, per seed), the paired
interval of distilled − scratch and the evaluate stage's evidence (kdpipe.evidence via kdpipe/report/findings.py),
the export's parity and latency per length, wall seconds per stage, and the CPU. Run from the repo root under
the exclusive CPU lock for figures to report:

    flock -x /tmp/kdpipe-cpu.lock .venv/bin/python bench/text.py
    .venv/bin/python bench/text.py --quick      # a smoke run: 100 glosses a class, 2 epochs, one seed

Nothing is downloaded: without /usr/share/wordnet/data.noun it stops with the apt-get line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import text_corpus  # noqa: E402
from quality import evidence_summary, stats  # noqa: E402 - bench/ scripts share their helpers

RECIPE = BENCH / "recipes" / "text.yaml"
PER_CLASS, CLASSES = 2000, 10  # 20,000 glosses: 1 text of the test split = 0.025 points
QUICK = {"teacher": {"epochs": 2, "warmup_epochs": 0}, "student": {"epochs": 2, "seeds": [0], "warmup_epochs": 0},
         "export": {"latency_repeats": 3}}
STAGES = ("prepare", "teacher", "scratch", "distill", "evaluate", "export")


def bench_config(work: Path, quick: bool):
    """bench/recipes/text.yaml with every path (and the MLflow store) under `work`."""
    from kdpipe.config import from_dict

    raw = yaml.safe_load(RECIPE.read_text())
    raw["paths"] = {k: str(work / k) for k in ("raw", "downloads", "prepared", "models", "metrics", "plots",
                                                "reports")}
    raw["data"]["text"]["file"] = str(work / "raw" / "wordnet.jsonl")
    raw["tracking"] = {"uri": f"sqlite:///{work / 'mlflow.db'}", "system_metrics": False}
    for section, values in (QUICK if quick else {}).items():
        raw[section] = {**raw.get(section, {}), **values}
    return from_dict(raw)


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it, with its flags that change float kernels (AVX-512, BF16)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    extras = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({', '.join(extras)})"


def run_stages(cfg) -> dict[str, float]:
    """The six stage workers in order; wall seconds of each."""
    import importlib

    seconds = {}
    for name in STAGES:
        t0 = time.perf_counter()
        importlib.import_module(f"kdpipe.stages.{name}").run(cfg)
        seconds[name] = round(time.perf_counter() - t0, 1)
        print(f"[bench] {name}: {seconds[name]:.0f} s", file=sys.stderr, flush=True)
    return seconds


def export_summary(m: dict) -> dict:
    return {k: m[k] for k in ("parity_max_abs_diff", "teacher_parity_max_abs_diff", "student_onnx_accuracy",
                              "int8_accuracy", "int8_val_accuracy_drop", "int8_registrable", "onnx_bytes",
                              "teacher_latency_ms_by_length", "student_latency_ms_by_length",
                              "int8_latency_ms_by_length", "latency_threads") if k in m}


def text_bench(work: Path, quick: bool) -> dict:
    import torch

    if not text_corpus.DATA_NOUN.is_file():
        sys.exit(f"bench: {text_corpus.DATA_NOUN}: {text_corpus.MISSING}")
    per_class = 100 if quick else PER_CLASS
    records = text_corpus.corpus(classes=CLASSES, per_class=per_class, seed=0)
    text_corpus.write_jsonl(records, work / "raw" / "wordnet.jsonl")
    cfg = bench_config(work, quick)
    seconds = run_stages(cfg)
    metrics = {name: json.loads((work / "metrics" / f"{name}.json").read_text())
               for name in ("teacher", "scratch", "distill", "evaluate", "export")}
    return {
        "corpus": {"source": "WordNet 3.0 noun glosses (Debian wordnet-base, /usr/share/wordnet/data.noun)",
                   "licence": "WordNet 3.0 licence (Princeton University; permissive, BSD-style)",
                   "classes": sorted({r["label"] for r in records}), "glosses": len(records),
                   "per_class": per_class, "lemmas_removed": True},
        "seeds": list(cfg.student.seeds), "teacher_model": cfg.teacher.model, "student_model": cfg.student.model,
        "method": cfg.distill.method, "precision": metrics["distill"].get("precision"),
        "teacher": stats(metrics["teacher"]), "scratch": stats(metrics["scratch"]),
        "distilled": stats(metrics["distill"]), "gap_recovered": metrics["evaluate"]["gap_recovered"],
        "evidence": evidence_summary(metrics["evaluate"]["evidence"]), "export": export_summary(metrics["export"]),
        "seconds": seconds, "total_seconds": round(sum(seconds.values()), 1),
        "machine": {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)),
                    "torch": torch.__version__},
        "params": cfg.model_dump(mode="json", exclude={"paths", "tracking"}),
        "command": "flock -x /tmp/kdpipe-cpu.lock .venv/bin/python bench/text.py" + (" --quick" if quick else ""),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run into bench/work/text_quick/, results untouched")
    args = parser.parse_args(argv)
    work = BENCH / "work" / ("text_quick" if args.quick else "text")
    result = text_bench(work, args.quick)
    out = work / "text.json" if args.quick else BENCH / "results" / "text.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    e = result["evidence"]["distilled_vs_scratch"]
    print(f"[bench] teacher {result['teacher']['mean']:.4f}, scratch {result['scratch']['mean']:.4f}, distilled "
          f"{result['distilled']['mean']:.4f}; distilled − scratch {e['difference']:+.2f} points (CI {e['low']:+.2f} "
          f"to {e['high']:+.2f}); {result['total_seconds']:.0f} s -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
