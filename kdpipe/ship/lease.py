"""The registry lease: mutual exclusion of one registered model's gate through the MLflow API alone, for a tracking
server where the exporting processes share no file system (gate.gate_lock uses the store's file lock for sqlite).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager

from kdpipe.ship.registry import RegistryError

LEASE_SUFFIX = ".gate-lease"  # the registered model whose existence is the registry lease of a model's gate
LEASE_STALE_S = 60.0  # a gate takes well under a second: a lease seen unchanged this long lost its holder
LEASE_WAIT_S = 300.0


@contextmanager
def registry_lease(client, name: str) -> Iterator[None]:
    """Mutual exclusion through the MLflow API alone. Creating a registered model is atomic on every backend (a
    second creator gets RESOURCE_ALREADY_EXISTS), so whoever creates `<name>.gate-lease` holds the lease until
    it deletes it. A lease seen unchanged for LEASE_STALE_S was left by a crashed holder and is deleted."""
    from mlflow.exceptions import MlflowException

    lease, seen, start = f"{name}{LEASE_SUFFIX}", {}, time.monotonic()
    while True:
        try:
            client.create_registered_model(lease, description=f"kdpipe: an export is gating {name}")
            break
        except MlflowException as e:
            # ALREADY_EXISTS: someone holds it. DOES_NOT_EXIST: the sqlalchemy store lost the insert race and,
            # looking the winner up to say so, found the lease already released (seen under load): try again.
            if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        _wait_for_lease(client, lease, seen, start)
    try:
        yield
    finally:
        client.delete_registered_model(lease)


def _wait_for_lease(client, lease: str, seen: dict, start: float) -> None:
    """Pause before the next try at `lease`, or delete it when the same lease (creation time) has been held for
    LEASE_STALE_S since we first saw it; RegistryError after LEASE_WAIT_S."""
    now, stamp = time.monotonic(), _lease_stamp(client, lease)
    if stamp is not None and now - seen.setdefault(stamp, now) > LEASE_STALE_S:
        if _lease_stamp(client, lease) == stamp:  # still that one: another waiter may have broken it already
            client.delete_registered_model(lease)
        return
    if now - start > LEASE_WAIT_S:
        raise RegistryError(f"registered model {lease!r} (an export's gate lease) held for {now - start:.0f} s; "
                            f"if no export is running, delete it: MlflowClient().delete_registered_model({lease!r})")
    time.sleep(random.uniform(0.05, 0.25))


def _lease_stamp(client, lease: str) -> int | None:
    """When the lease now held was taken (server time, ms), or None when nobody holds it."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(lease).creation_timestamp
    except MlflowException:
        return None
