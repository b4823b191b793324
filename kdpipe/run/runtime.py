"""Seed, device, threads and precision: set once, at the top of a stage's main()."""

from __future__ import annotations

import dataclasses
import functools
import os
import random
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdpipe.config import ConfigError, RuntimeConfig
from kdpipe.env import under_torchrun


@dataclass(frozen=True)
class Runtime:
    """The device and how to compute on it; built once per stage process by setup() (or make_runtime())."""

    device: torch.device
    precision: str = "fp32"  # resolved: fp32 | bf16 | fp16 (autocast dtype of forward passes; losses stay fp32)
    channels_last: bool = False  # NHWC layout for 4-D weights and image batches
    compile: bool = False  # torch.compile each model prepare() is given
    sync_batchnorm: bool = False  # data-parallel runs: SyncBatchNorm in the trained model (runtime.sync_batchnorm)
    reproducible: bool = False  # runtime.reproducible: pinned AVX2 CPU kernels (kdpipe.run.kernels), fp32

    def exact(self) -> Runtime:
        """This runtime in fp32: for the scores a stage reports, so that they are the scores of the fp32 weights
        that are saved and shipped (ONNX), not of their bf16/fp16 forward."""
        return dataclasses.replace(self, precision="fp32")

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def autocast(self):
        """Forward passes in the low precision (a no-op context in fp32). Losses cast logits back to fp32."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """fp16 needs loss scaling (its small gradients underflow); bf16 has fp32's range and does not."""
        return torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None

    def prepare(self, model: nn.Module) -> nn.Module:
        """`model` on the device, in channels_last when asked (a no-op for models without 4-D weights), and
        compiled in place when asked (nn.Module.compile keeps state_dict keys, so checkpoints stay plain)."""
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        if self.compile:
            model.compile()
        return model

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """An image batch (N, C, H, W) in the models' memory layout."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def generator(self, seed: int) -> torch.Generator:
        """A generator on the training device, so augmentation and shuffling stay on it."""
        return torch.Generator(device=self.device).manual_seed(seed)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 in hardware (x86 AVX512-BF16 or AMX, Arm's BF16 extension), read from
    /proc/cpuinfo's flags. Elsewhere (or unreadable) False: emulated bf16 is slower than fp32. False too where the
    environment caps the kernels below it (the avx2 CPU profile, the reproducible pins: kdpipe.run.kernels)."""
    from kdpipe.run.kernels import capped_below_bf16

    if capped_below_bf16():
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_precision(choice: str, device: torch.device) -> str:
    """`runtime.precision` for this device: `auto` is bf16 on GPUs with native bf16 (compute capability ≥ 8.0)
    and on CPUs with native bf16, fp16 (with loss scaling) on older GPUs, fp32 elsewhere. An explicit choice
    the device cannot run is a ConfigError naming the param."""
    if choice == "fp32":
        return "fp32"
    if device.type == "cuda":
        # including_emulation=False: pre-Ampere GPUs report bf16 "supported" through slow emulation.
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        if choice == "auto":
            return "bf16" if native else "fp16"
        if choice == "bf16" and not native:
            raise ConfigError(f"runtime.precision=bf16: {torch.cuda.get_device_name(device)} has no native bf16 "
                              "(compute capability < 8.0); use auto (fp16 there) or fp32")
        return choice
    if choice == "fp16":
        raise ConfigError(f"runtime.precision=fp16: needs a CUDA GPU, this runs on {device.type}; "
                          "use auto, bf16 or fp32")
    if device.type == "cpu" and choice == "auto":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32" if choice == "auto" else choice


def make_runtime(device: str | None = None, precision: str = "auto", channels_last: bool = True,
                 compile: bool = False) -> Runtime:
    """A Runtime without the seeding and thread setup of setup(): for benchmarks and tools."""
    dev = pick_device(device)
    return Runtime(dev, resolve_precision(precision, dev), channels_last, compile)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup(seed: int, device: str | None = None, cfg: RuntimeConfig | None = None) -> Runtime:
    """Pick the device (CUDA when present unless KDPIPE_DEVICE says otherwise), the CPU threads
    (KDPIPE_THREADS, default torch's), the precision and layout (`cfg`: params' runtime section), seed
    everything, and make CPU runs repeatable bit for bit. A device, thread count or precision this machine
    cannot honour is a ConfigError naming the variable or param."""
    cfg = cfg or RuntimeConfig()
    dev = pick_device(device)
    if under_torchrun():  # a torchrun rank: join the group, take its GPU
        from kdpipe.run import distributed

        dev = distributed.init(dev)
    if cfg.reproducible:
        require_reproducible(dev)
    precision = resolve_precision("fp32" if cfg.reproducible else cfg.precision, dev)
    rt = Runtime(dev, precision, cfg.channels_last, cfg.compile, cfg.sync_batchnorm, cfg.reproducible)
    threads = os.environ.get("KDPIPE_THREADS")
    if threads:
        if not threads.isdigit() or int(threads) < 1:
            raise ConfigError(f"KDPIPE_THREADS={threads!r}: must be a whole number >= 1; fix or unset it")
        # Two jobs sharing few cores each with all threads thrash at every op barrier (10x slower measured).
        torch.set_num_threads(int(threads))
    elif dev.type == "cpu" and "LOCAL_WORLD_SIZE" in os.environ:
        # Ranks sharing a host's cores: each with every core oversubscribes (half the speed, measured on 2 cores).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
    seed_everything(seed)
    if dev.type == "cpu":
        # Deterministic kernels cost little on CPU and make a rerun give the same numbers. The kernel switch
        # alone: torch.use_deterministic_algorithms also imports torch._inductor (1.4 s a stage process,
        # measured) to set a flag only torch.compile reads, and kdpipe trains eagerly.
        torch._C._set_deterministic_algorithms(True, warn_only=True)
    elif dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return rt


def require_reproducible(dev: torch.device) -> None:
    """runtime.reproducible: the stage runs on the CPU with its kernels pinned (kdpipe.run.kernels); a
    ConfigError otherwise. GPU kernels are not pinned: their numbers differ by GPU type."""
    from kdpipe.run.kernels import require_pinned

    if dev.type != "cpu":
        raise ConfigError(f"runtime.reproducible: pins CPU kernels, this stage runs on {dev}; set KDPIPE_DEVICE=cpu "
                          "or runtime.reproducible: false")
    require_pinned()


def pick_device(device: str | None = None) -> torch.device:
    """`device`, else KDPIPE_DEVICE, else CUDA when present, else the CPU; checked by placing an empty tensor
    there, so a missing GPU fails now, in one line, rather than mid-training."""
    source = "device" if device else "KDPIPE_DEVICE"
    name = device or os.environ.get("KDPIPE_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{source}={name!r}: not a device name; use cpu, cuda or cuda:<index>") from None
    try:
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError) as e:  # no driver, no GPU, a CPU-only build, a bad index
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{source}={name}: not usable on this machine ({reason}); "
                          f"set {source}=cpu, or unset it (CUDA is then used only when present)") from None
    return dev


def device_facts(rt: Runtime) -> dict[str, str]:
    """What ran this: logged as MLflow tags so runs on different hardware can be told apart. On CUDA, the GPU
    the stage actually ran on (its index, not device 0's): name, memory, compute capability, driver."""
    facts = {
        "torch_version": torch.__version__,
        "cuda_version": str(torch.version.cuda),
        "device": str(rt.device),
        "precision": rt.precision,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # ATen's vector kernels: AVX512, AVX2, ...
        "channels_last": str(rt.channels_last),
        "compile": str(rt.compile),
        "cpu_threads": str(torch.get_num_threads()),
        "gpu_count": str(torch.cuda.device_count() if torch.cuda.is_available() else 0),
        "gpu_name": "none",
    }
    if rt.device.type == "cuda":
        index = rt.device.index if rt.device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        facts.update(gpu_index=str(index), gpu_name=props.name, gpu_memory_gib=f"{props.total_memory / 2**30:.1f}",
                     gpu_compute_capability=f"{props.major}.{props.minor}", gpu_driver=nvidia_driver_version())
    return facts


def nvidia_driver_version() -> str:
    """The NVIDIA driver's version through NVML (nvidia-ml-py, which MLflow's GPU monitor needs too);
    "unknown" where NVML cannot be read (a container without the driver library, say)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # ImportError, pynvml.NVMLError_*: telemetry must never stop a stage
        return "unknown"
    return version.decode() if isinstance(version, bytes) else str(version)
