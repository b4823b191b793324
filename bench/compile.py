"""Does torch.compile pay for a default-length run? The default pipeline's training stages (teacher, scratch,
distill on digits, params.yaml as committed) run in-process with `runtime.compile` off and on, compile time
included, in bench/work/compile/. Writes bench/results/compile.json. Run from the repo root after `make run`
(it reuses data/prepared): `python bench/compile.py`.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WORK = BENCH / "work" / "compile"
sys.path.insert(0, str(REPO))


def config(compile_: bool):
    from kdpipe.config import from_dict

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    out = WORK / ("on" if compile_ else "off")
    raw["paths"] = {**raw["paths"], **{k: str(out / k) for k in ("models", "metrics", "plots", "reports")},
                    "prepared": str(REPO / "data" / "prepared")}
    raw["runtime"]["compile"] = compile_
    raw["tracking"].update(uri=f"sqlite:///{WORK / 'mlflow.db'}", experiment="kdpipe-bench-compile")
    return from_dict(raw)


def main() -> int:
    from kdpipe.stages import distill, scratch, teacher

    if not (REPO / "data" / "prepared" / "dataset.pt").is_file():
        sys.exit("bench: run `make run` first (this reuses its data/prepared)")
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    result = {"command": "python bench/compile.py", "seconds": {}, "test_accuracy": {}}
    for compile_ in (False, True):
        cfg, label = config(compile_), "on" if compile_ else "off"
        for name, stage in (("teacher", teacher), ("scratch", scratch), ("distill", distill)):
            t0 = time.perf_counter()
            metrics = stage.run(cfg)
            result["seconds"][f"{name}_{label}"] = round(time.perf_counter() - t0, 1)
            result["test_accuracy"][f"{name}_{label}"] = metrics["test_accuracy"]
            print(f"[compile] {name} compile={compile_}: {result['seconds'][f'{name}_{label}']} s", file=sys.stderr)
    total = {label: sum(v for k, v in result["seconds"].items() if k.endswith(label)) for label in ("off", "on")}
    result["total_seconds"] = total
    result["pays"] = total["on"] < total["off"]
    (BENCH / "results" / "compile.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
