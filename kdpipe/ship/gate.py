"""The registry's promotion gate: which version holds the `candidate` and `champion` aliases, decided one
export at a time. With kdpipe/store.py, kdpipe/tracking.py, registry.py and registrations.py, the only code that
imports mlflow, inside functions.

The promotion rule (`champion_decision`), applied to every new version of a registered model:
  * `candidate` always moves to the new version: it is "the latest export that passed its checks";
  * `champion` moves to it when parity passed, its test accuracy is above chance level (its `chance_accuracy`
    tag, the majority class's share of the test split, + kdpipe.metrics.CHANCE_MARGIN: a model that learned
    nothing is never crowned, whatever the champion's dataset), and
      - there is no champion yet, or
      - the champion was made on another dataset (its `dataset_digest` tag differs): the data changed, and an
        accuracy measured on other test images is not comparable, so the newest model wins, or
      - its test accuracy is ≥ the champion's (ties go to the newer model: same quality, newer code);
    a champion without a readable `test_accuracy` tag (registered by hand) counts as beatable.
Only what the rule reads is trusted: the `test_accuracy`, `dataset_digest` and `chance_accuracy` version tags. Exports that race
(two checkouts, one store) take turns at the gate (`gate_lock`), so the rule applies as if they had not raced.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager

from kdpipe.ship.registry import RegistryError

CANDIDATE = "candidate"
CHAMPION = "champion"




def champion_decision(test_accuracy: float, dataset_digest: str, champion_tags: dict[str, str] | None,
                      *, parity_passed: bool = True, newer_champion: bool = False,
                      chance: float | None = None) -> tuple[bool, str]:
    """(take champion?, why) for a new version with `test_accuracy` on `dataset_digest`, given the current
    champion's version tags (None when there is none). Pure: the rule of the module docstring.

    newer_champion: the champion is a later version than this one (two exports raced and the later version
    was gated first); "newer wins" then favours the champion, so only a strictly better model on the same
    data takes its place, which is what gating the two in version order would have given.
    chance: the new version's chance level on its test split (None: not known, not checked).
    """
    if not parity_passed:
        return False, "parity failed"
    if chance is not None:
        from kdpipe.metrics import CHANCE_MARGIN, at_chance

        if at_chance(test_accuracy, chance):
            return False, (f"test accuracy {test_accuracy:.4f} is at chance ({chance:.4f}, the majority class's share "
                           f"of test, + {CHANCE_MARGIN:g})")
    if champion_tags is None:
        return True, "no champion yet"
    if champion_tags.get("dataset_digest") != dataset_digest:
        if newer_champion:
            return False, "the champion is a newer version made on other data"
        return True, "data changed: the champion was made on another dataset digest"
    try:
        best = float(champion_tags["test_accuracy"])
    except (KeyError, ValueError):
        return True, "the champion has no readable test_accuracy tag"
    if test_accuracy > best or (test_accuracy == best and not newer_champion):
        return True, f"test accuracy {test_accuracy:.4f} >= champion's {best:.4f}"
    if test_accuracy == best:
        return False, f"test accuracy {test_accuracy:.4f} = champion's, and the champion is newer"
    return False, f"test accuracy {test_accuracy:.4f} < champion's {best:.4f}"


def current_champion(client, name: str, alias: str = CHAMPION):
    """The version holding `alias` (champion unless told), or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def apply_gate(client, name: str, version: str, *, parity_passed: bool = True) -> dict:
    """Give `version` the candidate alias, and champion when `champion_decision` says so.

    The new version's own `test_accuracy` and `dataset_digest` tags are what gets compared. Gates of one model
    run one at a time, across processes and checkouts (`gate_lock`), so exports that race end as if they had
    been gated one after the other; an alias never moves back to an older version except a champion to a
    strictly better one on the same data. Returns {version, aliases, champion, previous_champion, reason}.
    """
    from kdpipe.store import retry_locked

    with gate_lock(client, name):
        return retry_locked(lambda: _gate(client, name, str(version), parity_passed))


def _gate(client, name: str, version: str, parity_passed: bool) -> dict:
    """apply_gate's read, decide and set, while it holds the gate lock."""
    new = client.get_model_version(name, version)
    accuracy = float(new.tags.get("test_accuracy", "nan"))
    chance = float(new.tags["chance_accuracy"]) if "chance_accuracy" in new.tags else None
    champion, candidate = current_champion(client, name), current_champion(client, name, CANDIDATE)
    take, reason = champion_decision(accuracy, new.tags.get("dataset_digest", ""),
                                     None if champion is None else dict(champion.tags), parity_passed=parity_passed,
                                     newer_champion=champion is not None and int(champion.version) > int(version),
                                     chance=chance)
    if candidate is None or int(candidate.version) < int(version):
        client.set_registered_model_alias(name, CANDIDATE, version)
    if take:
        client.set_registered_model_alias(name, CHAMPION, version)
    aliases = sorted(a for a, v in client.get_registered_model(name).aliases.items() if str(v) == version)
    return {"version": version, "aliases": aliases, "champion": take,
            "previous_champion": None if champion is None else str(champion.version), "reason": reason}


LEASE_SUFFIX = ".gate-lease"  # the registered model whose existence is the registry lease of a model's gate
LEASE_STALE_S = 60.0  # a gate takes well under a second: a lease seen unchanged this long lost its holder
LEASE_WAIT_S = 300.0


@contextmanager
def gate_lock(client, name: str) -> Iterator[None]:
    """Hold the gate of registered model `name` alone: the store's file lock for a sqlite store (kdpipe.tracking
    .store_lock), else a lease kept in the registry itself (registry_lease), for a server where processes share
    no file system."""
    from kdpipe.store import sqlite_path, store_lock

    uri = client._registry_uri  # the store this client registers in (MlflowClient keeps no public accessor)
    with store_lock(uri) if sqlite_path(uri) else registry_lease(client, name):
        yield


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
