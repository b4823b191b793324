"""What every stage shares: the thin main() (params path, user errors as one line + exit code 2, SIGINT and
SIGTERM as one line + 130/143), the start of its work (runtime, paths, prepared data) and its MLflow tags."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import NoReturn

from kdpipe.config import DEFAULT_PARAMS, Config, load
from kdpipe.env import RANK_ERRORS_ENV, rank, under_torchrun
from kdpipe.errors import EXIT_SIGNAL_BASE, EXIT_USER_ERROR, Interrupted, UserError
from kdpipe.paths import Paths
from kdpipe.run import signals


def report_error(stage: str, message: str) -> None:
    """A user error as one line on stderr; in a rank that distributed.launch started, a file the launcher reads
    (it prints the first failing rank's line once, naming the rank)."""
    folder = os.environ.get(RANK_ERRORS_ENV)
    if folder:
        Path(folder, f"rank{rank()}.txt").write_text(message)
    else:
        print(f"kdpipe {stage}: error: {message}", file=sys.stderr)


DATA_PARALLEL = ("teacher", "scratch", "distill")  # the stages runtime.processes > 1 runs under torch.distributed


def run_stage(stage: str, work: Callable[[Config], object], argv: list[str] | None = None) -> int:
    """Parse `--params`, validate them before anything is touched, then run `work(cfg)`: in this process, or,
    for a training stage with runtime.processes > 1, in that many ranks launched as torchrun does. With
    runtime.reproducible the CPU kernel paths are pinned first, for this process and the ranks it starts."""
    parser = argparse.ArgumentParser(prog=f"python -m kdpipe.stages.{stage}")
    parser.add_argument("--params", default=os.environ.get("KDPIPE_PARAMS", DEFAULT_PARAMS))
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    with signals.interrupts():  # SIGINT/SIGTERM: errors.Interrupted, reported below as one line
        try:
            cfg = load(args.params)
            if cfg.runtime.reproducible:  # before torch runs its first kernel (validation imports, never runs it)
                from kdpipe.run.kernels import pin_reproducible

                pin_reproducible(stage)
            if cfg.runtime.processes > 1 and stage in DATA_PARALLEL and not under_torchrun():
                from kdpipe.run import distributed

                preflight(cfg)  # an unreachable MLflow server fails here, once, not in every rank
                return distributed.launch(stage, args.params, cfg.runtime.processes)
            work(cfg)
        except UserError as e:
            report_error(stage, str(e))
            return EXIT_USER_ERROR
        except Interrupted as e:
            report_interrupt(stage, e)
            return EXIT_SIGNAL_BASE + e.args[0]
    _record_timing(stage, time.perf_counter() - t0)
    return 0


def report_interrupt(stage: str, e: Interrupted) -> None:
    """One line: where the run stopped (the training loop's "seed S, epoch E"), the signal, what to do."""
    import signal

    where = f" at {e.at}" if getattr(e, "at", None) else ""
    todo = "rerun to resume" if stage in DATA_PARALLEL else "rerun it"
    print(f"kdpipe {stage}: interrupted{where} ({signal.Signals(e.args[0]).name}); {todo}", file=sys.stderr)


def exit_now(code: int) -> NoReturn:
    """End a stage process with `code`, skipping the interpreter's teardown of modules and objects: with torch
    and mlflow loaded that teardown alone took ~1 s a stage process (measured here: 6 s of a 52 s `make run`),
    and nothing in it matters to a finished stage. The atexit handlers (MLflow's, logging's) still run, and
    stdout/stderr are flushed; every file a stage writes is closed by then (artifacts are written atomically)."""
    import atexit

    atexit._run_exitfuncs()  # the only way to run them before os._exit, which skips them
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing left to save
            pass
    os._exit(code)


def _record_timing(stage: str, work_seconds: float) -> None:
    """With KDPIPE_TIMING=<file>, append one JSON line: the stage, seconds in its work (params on), and the
    process's age when the work began (interpreter start and imports before it). bench/overhead.py reads it."""
    target = os.environ.get("KDPIPE_TIMING")
    if not target:
        return
    import json

    now, age = time.time(), process_age()
    row = {"stage": stage, "work_s": round(work_seconds, 3), "before_work_s": round(age - work_seconds, 3),
           "work_end_unix": round(now, 3)}
    with open(target, "a") as f:
        f.write(json.dumps(row) + "\n")


def process_age() -> float:
    """Seconds since this process started. On Linux from /proc/self/stat's start tick against the boot clock:
    psutil's create_time adds a boot time read in whole seconds, which made every process look up to 1 s older
    (0.63 s on the machine measured). Elsewhere psutil's figure."""
    try:
        fields = open("/proc/self/stat").read().rsplit(")", 1)[1].split()  # from field 3 (state) on
        return time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, AttributeError, ValueError, IndexError):
        import psutil

        return time.time() - psutil.Process().create_time()


@dataclass(frozen=True)
class StageContext:
    """What a training or evaluating stage starts from: params, runtime, file names, the prepared data."""

    cfg: Config
    rt: object  # runtime.Runtime (not imported here: it pulls in torch)
    paths: Paths
    prepared: dict

    @property
    def digest(self) -> str:
        return self.prepared["digest"]

    @cached_property
    def in_memory(self) -> bool:
        """data.in_memory, with auto resolved: the images fit a share of the device's memory (data.fits_in_memory)."""
        from kdpipe.data.batches import fits_in_memory

        if self.cfg.data.in_memory != "auto":
            return self.cfg.data.in_memory
        images = (self.prepared[f"{split}_x"] for split in ("train", "val", "test"))
        return fits_in_memory(sum(x.nbytes for x in images), self.rt.device)  # tensors and OnDiskArray alike

    @cached_property
    def splits(self):
        """(train, val, test) as data.Split, placed once for training: on the device, or streamed from disk."""
        from kdpipe.data.batches import place_splits
        from kdpipe.data.ondisk import default_workers

        workers = default_workers(self.rt.device) if self.cfg.data.workers is None else self.cfg.data.workers
        if not self.in_memory:
            print(f"data: streamed from disk ({self.cfg.data.dataset}, {workers} loader workers)", file=sys.stderr)
        return place_splits(self.prepared, self.rt.device, in_memory=self.in_memory, workers=workers)

    def tags(self, **extra) -> dict[str, str]:
        """MLflow tags every stage run carries: dataset, digest, device facts, plus the stage's own."""
        from kdpipe.run.runtime import device_facts

        return {"dataset": self.cfg.data.dataset, "dataset_digest": self.digest, **device_facts(self.rt),
                **{k: str(v) for k, v in extra.items()}}


def preflight(cfg: Config, outputs: tuple[str, ...] = ()) -> None:
    """What a stage's environment can get wrong, checked before any work: the MLflow server answers, a local store
    is not damaged, and the output folders (`outputs`: keys of params' paths section) can be written."""
    from kdpipe import store
    from kdpipe.files import require_writable

    store.check_reachable(cfg.tracking)
    store.check_local(cfg.tracking)
    require_writable({f"paths.{key}": getattr(cfg.paths, key) for key in outputs})


def start(cfg: Config, outputs: tuple[str, ...] = (), *, exact: bool = False) -> StageContext:
    """The environment checked (preflight), seed, device and threads set once (runtime.setup), then the prepared
    data loaded and checked. `exact`: compute in fp32 whatever runtime.precision says (stages that only score
    the saved weights)."""
    from kdpipe.data.prepared import load_prepared
    from kdpipe.run import runtime

    preflight(cfg, outputs)
    paths = Paths(cfg.paths)
    rt = runtime.setup(cfg.seed, cfg=cfg.runtime)
    rt = rt.exact() if exact else rt
    # Training stages leave the images on disk until StageContext.splits knows whether they fit in memory.
    return StageContext(cfg, rt, paths, load_prepared(paths.dataset, lazy=not exact))

