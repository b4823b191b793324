"""Which instruction set torch's CPU kernels use, pinned by the environment variables its libraries read the
first time they run a kernel: the reproducible mode (runtime.reproducible) and the CPU profiles that benchmarks
and the test suite run under (`avx2`: what an AVX2-only x86-64 CPU runs, measured on an AVX-512 machine).

What each knob did, checked with torch 2.14.1+cu130 (BLAS: MKL 2024.2, oneDNN 3.12, both inside libtorch_cpu)
on an AMD EPYC with AVX512-BF16; each is read at first use, so setting it after `import torch` but before the
first kernel still counts (and after the first kernel, not at all):
  ATEN_CPU_CAPABILITY=avx2  torch.backends.cpu.get_cpu_capability() says AVX2 (else AVX512); log_softmax's
                            bits change. `default` (no vector kernels) changes even torch.randn's output.
  ONEDNN_MAX_CPU_ISA=AVX2   ONEDNN_VERBOSE=1 prints `isa:Intel AVX2` and convolutions run `jit:avx2`; a
                            contiguous conv's bits change.
  MKL_CBWR=COMPATIBLE       MKL_VERBOSE=1 prints `CNR:COMPATIBLE`; sgemm's bits change, at ~2.2x its time.
                            MKL_CBWR=AVX2 is not honoured on this AMD CPU (MKL_VERBOSE: `CNR:AUTO`), nor is
                            MKL_ENABLE_INSTRUCTIONS (same bits, same speed): COMPATIBLE is MKL's one branch
                            documented to give the same results on every x86-64 CPU, Intel or not.
Imports nothing heavy: kdpipe.run.stage pins before the stage's work touches torch.
"""

from __future__ import annotations

import os
import sys

from kdpipe.config import ConfigError

BASELINE = "AVX2"  # what get_cpu_capability() reports when the pins took effect
REPRODUCIBLE_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "COMPATIBLE"}
# MKL_ENABLE_INSTRUCTIONS caps MKL on Intel CPUs; MKL ignores it on AMD, where its default path is AVX2-class.
PROFILES = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "reproducible": REPRODUCIBLE_ENV,  # the mode's pins alone (benchmarks pair it with fp32)
}
KNOBS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS")


def profile_env(name: str) -> dict[str, str]:
    """The variables of CPU profile `name` (a key of PROFILES); ValueError naming the known ones otherwise."""
    if name not in PROFILES:
        raise ValueError(f"unknown CPU profile {name!r}; known: {', '.join(PROFILES)}")
    return dict(PROFILES[name])


def env_line(env: dict[str, str] = REPRODUCIBLE_ENV) -> str:
    return " ".join(f"{k}={v}" for k, v in env.items())


def pin_reproducible(stage: str) -> None:
    """runtime.reproducible: set the pins in this process's environment (ranks and children inherit them),
    saying in one line which values of the caller's they replace, then check ATen took them."""
    replaced = {k: os.environ[k] for k, v in REPRODUCIBLE_ENV.items() if os.environ.get(k, v) != v}
    if replaced:
        print(f"kdpipe {stage}: runtime.reproducible pins {env_line()} (replacing {env_line(replaced)})",
              file=sys.stderr)
    os.environ.update(REPRODUCIBLE_ENV)
    require_pinned()


def require_pinned() -> None:
    """ConfigError unless this process runs the pinned kernels: the variables set, and ATen on AVX2. ATen fixes
    its choice the first time it dispatches a kernel, so a process that ran torch before the pins were set
    (a test calling a stage's run() in-process) keeps its own; a CPU without AVX2 cannot take them either."""
    unset = {k: v for k, v in REPRODUCIBLE_ENV.items() if os.environ.get(k) != v}
    if unset:
        raise ConfigError(f"runtime.reproducible: {env_line(unset)} is not set in this process; run the stage as "
                          f"its own process (python -m kdpipe.stages.<name>) or start Python with {env_line()}")
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    if capability != BASELINE:
        raise ConfigError(f"runtime.reproducible: torch runs its {capability} kernels here, not {BASELINE}: the CPU "
                          f"has no AVX2, or torch ran kernels in this process before {env_line()} was set; run "
                          "the stage as its own process (python -m kdpipe.stages.<name>)")


# oneDNN ISA caps below native bf16 (AVX512_CORE_BF16 and up compute bf16 in hardware).
NO_BF16_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


def capped_below_bf16() -> bool:
    """The environment caps ATen below AVX-512 or oneDNN below native bf16 (a CPU profile, or the reproducible
    pins): kernels then run as on a CPU without native bf16, so `precision: auto` must choose fp32 there too."""
    aten = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
    return aten in ("default", "avx2") or os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in NO_BF16_ISAS

