"""A copy of the project as a fresh clone has it (for DVC, Prefect and benchmark runs in a temp dir), the
tiny-training version of its params, and a timed command runner for the benchmarks.

Used by bench/flow_overhead.py, bench/streaming.py, bench/distributed.py and by the tests (tests/conftest.py puts bench/ on sys.path). It lives here, not
in tests/, because a benchmark must not import the test suite; and not in kdpipe/, because it is a developer's
tool that the package does not ship.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("kdpipe", "flows", "dvc.yaml", "params.yaml", "prefect.yaml", "pyproject.toml", "data/raw/README.md",
                 ".dvc/config", ".dvc/.gitignore", ".dvc/offline_plots", ".dvcignore", ".gitignore")


def cpu_name() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (else what platform knows): what each result names."""
    import platform

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def stage_params(root: Path, name: str, **sections: dict) -> Path:
    """The repo's params.yaml with each given section updated, every path and a sqlite MLflow store under `root`
    (system metrics off): written to root/<name>.yaml for `python -m kdpipe.stages.<stage> --params`."""
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    params["paths"] = {k: str(root / v) for k, v in params["paths"].items()}
    params["tracking"].update(uri=f"sqlite:///{root / 'mlflow.db'}", system_metrics=False)
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def copy_project(dest: Path) -> Path:
    """The tracked project files (no outputs, no dvc.lock) copied into `dest`."""
    for rel in PROJECT_FILES:
        src, dst = REPO / rel, dest / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    return dest


def shrink(params: dict) -> dict:
    """Tiny training everywhere: small_cnn teacher, one epoch, one seed. Batches of 32: an epoch of ~37 steps on
    digits learns something (teacher val 0.82, student 0.51 here), where 10 steps of 128 left the teacher at chance
    (val 0.100), which the stages' chance guard (teacher/student.chance_guard) refuses."""
    params["teacher"]["model"] = "small_cnn"
    for section in params.values():
        if isinstance(section, dict) and "epochs" in section:
            section.update(epochs=1, batch_size=32, patience=0, warmup_epochs=0)
        if isinstance(section, dict) and "seeds" in section:
            section["seeds"] = [0]
    return params


def run_timed(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 3600) -> tuple[float, str]:
    """Wall seconds and output of one command; it fails loudly, and a timeout takes its process group down."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-3000:]}")
    return time.perf_counter() - t0, out
