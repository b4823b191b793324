"""Quiet, offline-safe defaults for the tools kdpipe drives (MLflow, Prefect, DVC), in one place.

They are defaults only (an explicit setting in the environment wins) and must be in place before the tool is
first imported. Imports nothing heavy, so flows and the torch-free commands can use it.
"""

import os

QUIET_ENV = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",  # DO_NOT_TRACK=1 is not enough for MLflow; "true" is
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "DVC_NO_ANALYTICS": "1",
}


RANK_ERRORS_ENV = "KDPIPE_RANK_ERRORS"  # set by distributed.launch: where a failing rank leaves its error


def rank() -> int:
    """This process's global rank in a torch.distributed run (torchrun sets RANK); 0 outside one."""
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Rank 0, or the only process: the one that writes outputs and the resume state, logs and prints."""
    return rank() == 0


def under_torchrun() -> bool:
    """Started by torchrun (or distributed.launch), which sets RANK and the rendezvous address."""
    return "RANK" in os.environ and "MASTER_ADDR" in os.environ


def quiet_defaults() -> None:
    """Set every QUIET_ENV variable that the environment does not already set."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
