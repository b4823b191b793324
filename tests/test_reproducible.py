"""runtime.reproducible (kdpipe/run/kernels.py): the digits pipeline, started as a fresh process with the
environment under test (the pins take effect at the first stage, before torch runs a kernel), writes the same
metrics and byte-identical data, checkpoints and curves whether or not AVX-512 is available, switched off by
environment with the avx2 CPU profile (what an AVX2-only x86-64 CPU runs). The default mode, in fp32 too,
writes a different teacher in those two environments: without the pins the comparison fails. The stages of one
pipeline run one after another in one process, each through its main() as `python -m` calls it, sparing four
interpreter start-ups of ~5 s a pipeline; each stage pins again (a no-op once pinned) and checks ATen took it.
"""

from __future__ import annotations

import csv
import json
import shutil
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import subprocess_env, tiny_params, write_params

from kdpipe.run import kernels

STAGES = ("prepare", "teacher", "scratch", "distill", "evaluate")
TIMED = ("seconds", "latency")  # keys holding timings, which differ between any two runs


def profile_env(profile: str) -> dict[str, str]:
    """A stage process's environment under CPU profile `profile`, whatever kernel caps this one was given."""
    env = {k: v for k, v in subprocess_env().items() if k not in kernels.KNOBS}
    return {**env, **kernels.profile_env(profile)}


# `stages` in order, each through its main() (argv: the params file, then the stage names), in one new process.
STAGES_IN_ONE_PROCESS = """
import importlib, sys
for stage in sys.argv[2:]:
    if importlib.import_module(f"kdpipe.stages.{stage}").main(["--params", sys.argv[1]]) != 0:
        sys.exit(f"{stage} failed")
"""


def pipeline(root: Path, profile: str, stages=STAGES, **overrides) -> Path:
    """`stages` of a tiny digits pipeline in `root`, in one new process under CPU profile `profile`."""
    params = tiny_params(root, **overrides)
    params["teacher"].update(batch_size=32)  # ~40 steps an epoch: models well above chance
    params["student"].update(model="tiny_cnn", seeds=[0], batch_size=32)
    params["tracking"]["system_metrics"] = False
    root.mkdir(parents=True, exist_ok=True)
    path = write_params(root / "params.yaml", params)
    out = subprocess.run([sys.executable, "-c", STAGES_IN_ONE_PROCESS, str(path), *stages], cwd=root,
                         env=profile_env(profile), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{stages} ({profile}) failed:\n{out.stderr[-3000:]}"
    return root


def untimed(value):
    """A metrics JSON or curves row without its timings."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if not any(t in k for t in TIMED)}
    if isinstance(value, list):
        return [untimed(v) for v in value]
    return value


def outputs(root: Path) -> dict[str, object]:
    """Every file the stages wrote that carries numbers: bytes of the data and models, metrics and curves
    without timings. Reports (text and PNG renderings of the same metrics, with latencies) are left out."""
    found = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = str(path.relative_to(root))
        if rel.startswith(("data/", "models/")):
            found[rel] = path.read_bytes()
        elif rel.startswith("metrics/"):
            found[rel] = untimed(json.loads(path.read_text()))
        elif rel.startswith("plots/"):
            found[rel] = untimed(list(csv.DictReader(path.open())))
    return found


def run_tags(root: Path, key: str) -> list[str]:
    """Tag `key` of every run in the workspace's MLflow store (read with sqlite3: importing mlflow costs ~1.5 s)."""
    with sqlite3.connect(root / "mlflow.db") as db:
        return [value for (value,) in db.execute("SELECT value FROM tags WHERE key = ?", (key,))]


def has_avx512() -> bool:
    """ATen's choice in a fresh process with no caps: AVX512 when this CPU has it."""
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    out = subprocess.run([sys.executable, "-c", code], env=profile_env("native"), capture_output=True, text=True)
    return out.stdout.strip() == "AVX512"


@pytest.mark.e2e
@pytest.mark.slow
def test_reproducible_mode_is_the_same_with_and_without_avx512(tmp_path):
    if not has_avx512():
        pytest.skip("needs a CPU with AVX-512: the comparison switches it off")
    with ThreadPoolExecutor(2) as pool:  # two environments side by side, one thread each (KDPIPE_THREADS=1)
        native, avx2 = pool.map(lambda p: pipeline(tmp_path / f"mode_{p}", p, runtime__reproducible=True),
                                ("native", "avx2"))
    mine, theirs = outputs(native), outputs(avx2)
    assert mine.keys() == theirs.keys() and any(k.startswith("models/distill") for k in mine)
    assert [k for k in mine if mine[k] != theirs[k]] == []
    assert mine["metrics/teacher.json"]["reproducible"] is True
    assert mine["metrics/teacher.json"]["precision"] == "fp32"
    assert run_tags(native, "reproducible") == ["True"] * len(STAGES)  # one MLflow run per stage, tagged
    for profile in ("native", "avx2"):  # the default mode's teacher, fp32, on the same prepared data
        shutil.copytree(tmp_path / f"mode_{profile}/data", tmp_path / f"default_{profile}/data")
    with ThreadPoolExecutor(2) as pool:
        native, avx2 = pool.map(lambda p: pipeline(tmp_path / f"default_{p}", p, ("teacher",), runtime__precision="fp32"),
                                ("native", "avx2"))
    mine, theirs = outputs(native), outputs(avx2)
    assert mine["metrics/teacher.json"]["reproducible"] is False
    assert mine["models/teacher.pt"] != theirs["models/teacher.pt"]


def test_the_pins_replace_lower_caps_and_say_so():
    """With ATen and oneDNN capped below AVX2 by the caller, the mode still runs the AVX2 kernels, in one line."""
    code = ("from kdpipe.run.kernels import pin_reproducible; pin_reproducible('probe'); import torch; "
            "print(torch.backends.cpu.get_cpu_capability())")
    env = {**profile_env("native"), "ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "AVX2", out.stderr
    assert out.stderr.strip() == ("kdpipe probe: runtime.reproducible pins ATEN_CPU_CAPABILITY=avx2 "
                                  "ONEDNN_MAX_CPU_ISA=AVX2 MKL_CBWR=COMPATIBLE (replacing "
                                  "ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41)")


def test_a_process_that_ran_torch_unpinned_is_refused(monkeypatch):
    """In-process (torch has run kernels here, unpinned): the mode cannot take effect, and says so in one line."""
    from kdpipe.config import ConfigError, from_dict
    from kdpipe.run import runtime

    torch.ones(2).sum()
    for key in kernels.KNOBS:
        monkeypatch.delenv(key, raising=False)
    cfg = from_dict({"runtime": {"reproducible": True}})
    with pytest.raises(ConfigError, match=r"^runtime.reproducible: ATEN_CPU_CAPABILITY=avx2 .* is not set"):
        runtime.setup(0, "cpu", cfg.runtime)
    for key, value in kernels.REPRODUCIBLE_ENV.items():
        monkeypatch.setenv(key, value)
    if torch.backends.cpu.get_cpu_capability() != "AVX2":  # ATen chose before the variables were set
        with pytest.raises(ConfigError, match=r"^runtime.reproducible: torch runs its \w+ kernels here, not AVX2"):
            runtime.setup(0, "cpu", cfg.runtime)


def test_the_mode_computes_in_fp32_eagerly_and_is_checked_with_the_params():
    from kdpipe.config import ConfigError, from_dict

    for runtime_params, key in (({"precision": "bf16"}, "precision"), ({"compile": True}, "compile")):
        with pytest.raises(ConfigError, match=rf"^runtime.{key}: reproducible runs eager fp32"):
            from_dict({"runtime": {"reproducible": True, **runtime_params}})
    assert from_dict({"runtime": {"reproducible": True, "precision": "auto"}}).runtime.reproducible


def test_caps_below_bf16_make_auto_choose_fp32(monkeypatch):
    """Under the avx2 profile a CPU with AVX512-BF16 runs as one without: `precision: auto` is fp32 there."""
    from kdpipe.run import runtime

    for key, value in kernels.profile_env("avx2").items():
        monkeypatch.setenv(key, value)
    runtime.cpu_has_native_bf16.cache_clear()
    try:
        assert not runtime.cpu_has_native_bf16()
        assert runtime.resolve_precision("auto", torch.device("cpu")) == "fp32"
    finally:
        runtime.cpu_has_native_bf16.cache_clear()
