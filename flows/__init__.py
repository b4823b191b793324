"""Prefect orchestration of the DVC pipeline: `kd-pipeline` (flows/pipeline.py) and `kd-sweep` with its
points on workers, `kd-sweep-point` (flows/sweep.py); flows/source.py tells `prefect deploy` what workers clone.

Flows only orchestrate: every stage runs as its own process through DVC, so DVC decides what is up to date
and `dvc.lock` records what ran. The defaults below keep Prefect, DVC and MLflow quiet and offline-safe in
every process that loads the flows (CLI, worker, `serve`, tests); they are defaults only, so an explicit
setting in the environment wins. They must be set before `prefect` is first imported to take effect.
"""

from kdpipe.env import QUIET_ENV, quiet_defaults

__all__ = ["QUIET_ENV"]
quiet_defaults()
