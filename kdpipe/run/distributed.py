"""Data-parallel training through torch.distributed: `runtime.processes: N`, or `torchrun` run by hand.

A stage whose params ask for N processes relaunches itself with torchrun's own launcher (torch.distributed's
elastic agent: the same code path as `torchrun --standalone --nproc_per_node N -m kdpipe.stages.<stage>`), so
the DVC command stays `python -m kdpipe.stages.<stage>`. Under torchrun (RANK in the environment) each process
joins the process group (gloo on CPU, NCCL on CUDA, one GPU per local rank). Every rank reads the same global
batch and draws the same augmentation (the generators are seeded alike), then trains on its share of the batch
(positions rank, rank + N, ...): the same global batch, learning rate and random stream as one process. DDP
averages the student's gradients (gradients of modules trained alongside it are averaged with all_reduce), and
rank 0 alone writes outputs, logs to MLflow and prints progress: the other ranks' output goes to torchrun's
log files, and a failing rank ends every rank, its error shown as one line.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from kdpipe.env import rank


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def init(device: torch.device) -> torch.device:
    """Join the process group torchrun set up; the device this rank trains on (cuda:LOCAL_RANK on GPUs)."""
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not active():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def shard(x: torch.Tensor) -> torch.Tensor:
    """This rank's share of a global batch: rows rank, rank + N, ... (all of it in one process)."""
    return x[rank() :: world_size()] if active() else x


def wrap(model: nn.Module, device: torch.device, sync_batchnorm: bool) -> nn.Module:
    """The student as DDP sees it (gradients averaged across ranks during backward), or itself in one process.
    find_unused_parameters: FitNets' hint phase trains only part of the network."""
    if not active():
        return model

    if sync_batchnorm:
        if device.type != "cuda":
            from kdpipe.config import ConfigError

            raise ConfigError("runtime.sync_batchnorm: torch's SyncBatchNorm runs on CUDA devices only; set it to "
                              "false on a CPU")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return _Wrapped(_Dispatch(model), device_ids=ids, find_unused_parameters=True)


def average_gradients(modules: list[nn.Module]) -> None:
    """Average the gradients of modules trained alongside the student (not under DDP) across ranks."""
    if not active():
        return
    for module in modules:
        for p in module.parameters():
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.AVG)


def sync_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank: each rank updated its own during its last
    forward, so without this their validation scores, and early-stopping decisions, could differ."""
    if active():
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)


def average(t: torch.Tensor) -> torch.Tensor:
    """The mean of `t` over ranks (itself in one process)."""
    if active():
        t = t.clone()
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.AVG)
    return t


class _Dispatch(nn.Module):
    """One forward for both of a model's: DDP syncs gradients only of what runs through its own forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, features: bool = False):
        return self.model.forward_features(x) if features else self.model(x)


class _Wrapped(torch.nn.parallel.DistributedDataParallel):
    """DDP that also syncs the feature-returning forward the distillation losses call."""

    def forward_features(self, x: torch.Tensor):
        return self(x, features=True)


# ------------------------------------------------------------------------------------------ launching

def launch(stage: str, params: str, processes: int) -> int:
    """Run `python -m kdpipe.stages.<stage> --params <params>` as `processes` ranks under torch.distributed's
    elastic launcher (what torchrun runs): rank 0's output shown, the others' kept in torchrun's log folder, the
    collective traffic on loopback. Returns the exit code; a failed rank's error is printed as one line naming
    the rank."""
    import logging

    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from kdpipe.env import RANK_ERRORS_ENV

    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)  # its SIGTERM notices: not ours
    work = Path(tempfile.mkdtemp(prefix=f"kdpipe-{stage}-ranks-"))
    (work / "errors").mkdir()
    os.environ[RANK_ERRORS_ENV] = str(work / "errors")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one host: gloo's connections stay on loopback
    quiet = {r: Std.ALL for r in range(1, processes)}  # rank 0 prints; the others write their log files
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id=f"kdpipe-{stage}",
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.1,
                          start_method="spawn", logs_specs=DefaultLogsSpecs(log_dir=str(work), redirects=quiet))
    try:
        elastic_launch(config, sys.executable)("-m", f"kdpipe.stages.{stage}", "--params", params)
    except ChildFailedError as e:
        failed, failure = e.get_first_failure()
        errors = sorted((work / "errors").glob("rank*.txt"))  # the rank that raised, not one killed after it
        if errors:
            failed, line = int(errors[0].stem.removeprefix("rank")), errors[0].read_text().strip()
        else:
            line = f"exited with code {failure.exitcode}; its output is in {work}"
        print(f"kdpipe {stage}: error: rank {failed}: {line}", file=sys.stderr)
        if errors:  # a user error, said in full above: the ranks' logs hold nothing more
            shutil.rmtree(work, ignore_errors=True)
        return 2 if errors else 1
    finally:
        os.environ.pop(RANK_ERRORS_ENV, None)
    shutil.rmtree(work, ignore_errors=True)  # kept only when a rank crashed: its traceback is there
    return 0
