"""The registry's promotion gate: which version holds the `candidate` and `champion` aliases, decided one
export at a time. With kdpipe/store.py, kdpipe/tracking.py, registry.py and registrations.py, the only code that
imports mlflow, inside functions.

The promotion rule (`champion_decision`), applied to every new version of a registered model. It reads the
VALIDATION accuracy (the `val_accuracy` version tag, onnxruntime on the validation split): the test split never
decides anything, so `test_accuracy` is a reported tag only.
  * `candidate` always moves to the new version: it is "the latest export that passed its checks";
  * `champion` moves to it when promotion is on (`promotion`: export.promote; off by default in a `dvc exp run`,
    so an exploratory run never changes what deployments serve), parity passed, it has a readable
    `val_accuracy`, it clears the minimum quality to be crowned, whatever the champion's dataset:
      - above chance (its `val_chance_accuracy` tag, the majority class's share of the validation split,
        + kdpipe.metrics.CHANCE_MARGIN: a model that learned nothing is never crowned), and
      - above the scratch baseline (its `baseline_val_accuracy` tag: the same-seed scratch student, scored the
        same way; a distilled model no better than no distillation is not worth serving),
    and
      - there is no champion yet, or
      - the champion was made on another dataset (its `dataset_digest` tag differs): the data changed, and an
        accuracy measured on other images is not comparable, so the newest model wins, or
      - its validation accuracy is >= the champion's (ties go to the newer model: same quality, newer code);
    a champion without a readable `val_accuracy` tag (registered by hand, or before validation decided) counts
    as beatable.
The decision's reason is written on the version (`promotion_reason`). Only what the rule reads is trusted: the
version tags above. Exports that race (two checkouts, one store) take turns at the gate (`gate_lock`), so the
rule applies as if they had not raced.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager

from kdpipe.ship.registry import RegistryError

CANDIDATE = "candidate"
CHAMPION = "champion"
REASON_TAG = "promotion_reason"  # on every gated version: why it took champion or not
EXPERIMENT_ENV = "DVC_EXP_NAME"  # set by DVC in every stage process of a `dvc exp run` (dvc/repo/experiments)


def promotion(setting: bool | str, environ=os.environ) -> tuple[bool, str]:
    """(may this export move champion?, why) for export.promote: true, false, or auto (yes, except inside a
    `dvc exp run`, which DVC announces to its stage processes with DVC_EXP_NAME and DVC_EXP_BASELINE_REV)."""
    if setting is True or setting is False:
        return setting, f"export.promote: {str(setting).lower()}"
    experiment = environ.get(EXPERIMENT_ENV)
    if experiment:
        return False, f"a DVC experiment ({EXPERIMENT_ENV}={experiment}) with export.promote: auto"
    return True, "export.promote: auto, not a DVC experiment"


def quality_floor(val_accuracy: float, chance: float | None, baseline: float | None) -> str | None:
    """Why a version with `val_accuracy` may not be crowned at all (None when it may): no readable accuracy, at
    chance level, or no better than the scratch baseline. Checked whatever the champion is."""
    if math.isnan(val_accuracy):
        return "no readable val_accuracy tag: it cannot be judged on validation"
    if chance is not None:
        from kdpipe.metrics import CHANCE_MARGIN, at_chance

        if at_chance(val_accuracy, chance):
            return (f"validation accuracy {val_accuracy:.4f} is at chance ({chance:.4f}, the majority class's share "
                    f"of validation, + {CHANCE_MARGIN:g})")
    if baseline is not None and not val_accuracy > baseline:
        return f"validation accuracy {val_accuracy:.4f} does not beat the scratch baseline's {baseline:.4f}"
    return None


def champion_decision(val_accuracy: float, dataset_digest: str, champion_tags: dict[str, str] | None,
                      *, parity_passed: bool = True, newer_champion: bool = False,
                      chance: float | None = None, baseline: float | None = None) -> tuple[bool, str]:
    """(take champion?, why) for a new version with `val_accuracy` (validation split) on `dataset_digest`, given
    the current champion's version tags (None when there is none). Pure: the rule of the module docstring.

    newer_champion: the champion is a later version than this one (two exports raced and the later version
    was gated first); "newer wins" then favours the champion, so only a strictly better model on the same
    data takes its place, which is what gating the two in version order would have given.
    chance, baseline: the new version's chance level on validation and its scratch baseline's validation
    accuracy (None: not known, not checked).
    """
    if not parity_passed:
        return False, "parity failed"
    floor = quality_floor(val_accuracy, chance, baseline)
    if floor:
        return False, floor
    if champion_tags is None:
        return True, "no champion yet"
    if champion_tags.get("dataset_digest") != dataset_digest:
        if newer_champion:
            return False, "the champion is a newer version made on other data"
        return True, "data changed: the champion was made on another dataset digest"
    try:
        best = float(champion_tags["val_accuracy"])
    except (KeyError, ValueError):
        return True, "the champion has no readable val_accuracy tag"
    if val_accuracy > best or (val_accuracy == best and not newer_champion):
        return True, f"validation accuracy {val_accuracy:.4f} >= champion's {best:.4f}"
    if val_accuracy == best:
        return False, f"validation accuracy {val_accuracy:.4f} = champion's, and the champion is newer"
    return False, f"validation accuracy {val_accuracy:.4f} < champion's {best:.4f}"


def current_champion(client, name: str, alias: str = CHAMPION):
    """The version holding `alias` (champion unless told), or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def apply_gate(client, name: str, version: str, *, parity_passed: bool = True,
               promote: tuple[bool, str] = (True, "")) -> dict:
    """Give `version` the candidate alias, and champion when promotion is on (`promote`: `promotion()`'s pair)
    and `champion_decision` says so; the reason becomes the version's `promotion_reason` tag.

    The new version's own tags are what gets compared. Gates of one model run one at a time, across processes
    and checkouts (`gate_lock`), so exports that race end as if they had been gated one after the other; an
    alias never moves back to an older version except a champion to a strictly better one on the same data.
    Returns {version, aliases, champion, previous_champion, reason}.
    """
    from kdpipe.store import retry_locked

    with gate_lock(client, name):
        return retry_locked(lambda: _gate(client, name, str(version), parity_passed, promote))


def _float_tag(tags: dict, key: str) -> float | None:
    """A numeric version tag, None when absent."""
    return float(tags[key]) if key in tags else None


def _gate(client, name: str, version: str, parity_passed: bool, promote: tuple[bool, str]) -> dict:
    """apply_gate's read, decide and set, while it holds the gate lock."""
    new = client.get_model_version(name, version)
    accuracy = float(new.tags.get("val_accuracy", "nan"))
    champion, candidate = current_champion(client, name), current_champion(client, name, CANDIDATE)
    take, reason = champion_decision(accuracy, new.tags.get("dataset_digest", ""),
                                     None if champion is None else dict(champion.tags), parity_passed=parity_passed,
                                     newer_champion=champion is not None and int(champion.version) > int(version),
                                     chance=_float_tag(new.tags, "val_chance_accuracy"),
                                     baseline=_float_tag(new.tags, "baseline_val_accuracy"))
    if not promote[0]:
        verdict = "yes" if take else "no"
        take, reason = False, f"not promoted ({promote[1]}); the rule would have said: {verdict}, {reason}"
    if candidate is None or int(candidate.version) < int(version):
        client.set_registered_model_alias(name, CANDIDATE, version)
    if take:
        client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, REASON_TAG, reason)
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
