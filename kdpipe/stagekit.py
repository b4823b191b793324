"""What every stage's thin main() shares: params path, user errors as one line + exit code 2, data placement."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from kdpipe.artifacts import CheckpointError
from kdpipe.config import DEFAULT_PARAMS, Config, ConfigError, load
from kdpipe.data import DataError

# Errors caused by the user's input (params, data, checkpoints): reported as one line, exit code 2.
USER_ERRORS = (ConfigError, DataError, CheckpointError)
EXIT_USER_ERROR = 2


def run_stage(stage: str, work: Callable[[Config], object], argv: list[str] | None = None) -> int:
    """Parse `--params`, validate them before anything is touched, then run `work(cfg)`."""
    parser = argparse.ArgumentParser(prog=f"python -m kdpipe.stages.{stage}")
    parser.add_argument("--params", default=os.environ.get("KDPIPE_PARAMS", DEFAULT_PARAMS))
    args = parser.parse_args(argv)
    try:
        cfg = load(args.params)
        work(cfg)
    except USER_ERRORS as e:
        print(f"kdpipe {stage}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


def place_splits(prepared: dict, rt, *, stream: bool):
    """Splits as engine.Split: on the training device, or left on the host and streamed batch by batch
    (pinned for fast copies) when the dataset may not fit device memory (imagefolder)."""
    from kdpipe.engine import Split

    def split(name: str) -> Split:
        x, y = prepared[f"{name}_x"], prepared[f"{name}_y"]
        if stream:
            if rt.device.type == "cuda":
                x, y = x.pin_memory(), y.pin_memory()
            return Split(x, y)
        return Split(x.to(rt.device), y.to(rt.device))

    return split("train"), split("val"), split("test")
