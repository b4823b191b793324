"""Seed, device, threads and precision: set once, at the top of a stage's main()."""

from __future__ import annotations

import os
import random
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from kdpipe.config import ConfigError


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # bf16 autocast on CUDA; None (fp32) on CPU

    @property
    def precision(self) -> str:
        return "bf16-mixed" if self.amp_dtype is not None else "fp32"

    def autocast(self):
        """Mixed precision where it pays (CUDA); a no-op context on CPU."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def generator(self, seed: int) -> torch.Generator:
        """A generator on the training device, so augmentation and shuffling stay on it."""
        return torch.Generator(device=self.device).manual_seed(seed)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup(seed: int, device: str | None = None) -> Runtime:
    """Pick the device (CUDA when present unless KDPIPE_DEVICE says otherwise), the CPU threads
    (KDPIPE_THREADS, default torch's), seed everything, and make CPU runs repeatable bit for bit.
    A device or thread count this machine cannot honour is a ConfigError naming the variable."""
    dev = pick_device(device)
    threads = os.environ.get("KDPIPE_THREADS")
    if threads:
        if not threads.isdigit() or int(threads) < 1:
            raise ConfigError(f"KDPIPE_THREADS={threads!r}: must be a whole number >= 1; fix or unset it")
        # Two jobs sharing few cores each with all threads thrash at every op barrier (10x slower measured).
        torch.set_num_threads(int(threads))
    seed_everything(seed)
    if dev.type == "cpu":
        # Deterministic kernels cost little on CPU and make a rerun give the same numbers. The kernel switch
        # alone: torch.use_deterministic_algorithms also imports torch._inductor (1.4 s a stage process,
        # measured) to set a flag only torch.compile reads, and kdpipe trains eagerly.
        torch._C._set_deterministic_algorithms(True, warn_only=True)
        return Runtime(dev, None)
    torch.backends.cudnn.benchmark = True
    bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()
    return Runtime(dev, torch.bfloat16 if bf16 else None)


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
    """What ran this: logged as MLflow tags so runs on different hardware can be told apart."""
    facts = {
        "torch_version": torch.__version__,
        "cuda_version": str(torch.version.cuda),
        "device": str(rt.device),
        "precision": rt.precision,
        "cpu_threads": str(torch.get_num_threads()),
        "gpu_count": str(torch.cuda.device_count() if torch.cuda.is_available() else 0),
        "gpu_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }
    return facts
