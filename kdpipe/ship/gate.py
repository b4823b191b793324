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
      - not worse than the scratch baseline (the same-seed scratch student, scored the same way: its
        `baseline_val_accuracy` tag, and the paired comparison `baseline_val_difference`/`_ci_low`/`_ci_high`).
        Rule `evidence` (export.promote_rule, the default): refused only when worse beyond noise (the interval
        below 0): one validation image is not a defeat. Rule `point`: it must score strictly higher,
    and
      - there is no champion yet, or
      - the champion was made on another dataset (its `dataset_digest` tag differs): the data changed, and an
        accuracy measured on other images is not comparable, so the newest model wins, or
      - rule `evidence`: it is better than the champion beyond noise, on the same validation images (both models
        run there under the gate's lock; the paired bootstrap's lower bound above 0). A difference inside the
        noise keeps the champion: serving does not churn on noise. Rule `point`: its validation accuracy is >=
        the champion's (ties go to the newer model: same quality, newer code);
    a champion without a readable `val_accuracy` tag (registered by hand, or before validation decided) counts
    as beatable, and one that cannot be run on the validation split is judged by the point rule.
The decision's reason is written on the version (`promotion_reason`). Only what the rule reads is trusted: the
version tags above. Exports that race (two checkouts, one store) take turns at the gate (`gate_lock`), so the
rule applies as if they had not raced.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager

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


def quality_floor(val_accuracy: float, chance: float | None, baseline: float | None,
                  baseline_evidence: dict | None = None, rule: str = "point") -> str | None:
    """Why a version with `val_accuracy` may not be crowned at all (None when it may): no readable accuracy, at
    chance level, or losing to the scratch baseline. Checked whatever the champion is.

    rule "point": it must score strictly above `baseline`. rule "evidence" with `baseline_evidence` (the paired
    validation comparison with the baseline, kdpipe.evidence.paired_bootstrap's record): it is refused only
    when it is worse beyond noise (the interval's upper bound below 0); a difference inside the noise is not a
    defeat. Without that record the evidence rule falls back on the point rule.
    """
    if math.isnan(val_accuracy):
        return "no readable val_accuracy tag: it cannot be judged on validation"
    if chance is not None:
        from kdpipe.metrics import CHANCE_MARGIN, at_chance

        if at_chance(val_accuracy, chance):
            return (f"validation accuracy {val_accuracy:.4f} is at chance ({chance:.4f}, the majority class's share "
                    f"of validation, + {CHANCE_MARGIN:g})")
    if baseline is None:
        return None
    if rule == "evidence" and baseline_evidence is not None:
        from kdpipe.evidence import interval_text

        if baseline_evidence["high"] < 0:
            return (f"validation accuracy {val_accuracy:.4f} is below the scratch baseline's {baseline:.4f} beyond "
                    f"noise ({interval_text(baseline_evidence)})")
        return None
    if not val_accuracy > baseline:
        return f"validation accuracy {val_accuracy:.4f} does not beat the scratch baseline's {baseline:.4f}"
    return None


def champion_decision(val_accuracy: float, dataset_digest: str, champion_tags: dict[str, str] | None,
                      *, parity_passed: bool = True, newer_champion: bool = False,
                      chance: float | None = None, baseline: float | None = None, rule: str = "point",
                      baseline_evidence: dict | None = None, champion_evidence: dict | None = None) -> tuple[bool, str]:
    """(take champion?, why) for a new version with `val_accuracy` (validation split) on `dataset_digest`, given
    the current champion's version tags (None when there is none). Pure: the rule of the module docstring.

    newer_champion: the champion is a later version than this one (two exports raced and the later version
    was gated first); "newer wins" then favours the champion, so only a strictly better model on the same
    data takes its place, which is what gating the two in version order would have given.
    chance, baseline: the new version's chance level on validation and its scratch baseline's validation
    accuracy (None: not known, not checked).
    rule: "point" compares accuracies; "evidence" reads the paired validation comparisons instead:
    `baseline_evidence` (new version − scratch) and `champion_evidence` (new version − champion, same images).
    Under it the champion moves only to a version better beyond noise (the interval's lower bound above 0).
    """
    if not parity_passed:
        return False, "parity failed"
    floor = quality_floor(val_accuracy, chance, baseline, baseline_evidence, rule)
    if floor:
        return False, floor
    take, reason = _against_champion(val_accuracy, dataset_digest, champion_tags, newer_champion, rule,
                                     champion_evidence)
    if rule == "evidence" and baseline_evidence is not None:
        from kdpipe.evidence import direction, interval_text

        reading = {"helped": "better beyond noise", "hurt": "worse beyond noise"}.get(
            direction(baseline_evidence), "no difference beyond noise")
        reason += f"; against scratch on validation: {interval_text(baseline_evidence)}, {reading}"
    return take, reason


def _against_champion(val_accuracy: float, dataset_digest: str, champion_tags: dict[str, str] | None,
                      newer_champion: bool, rule: str, champion_evidence: dict | None) -> tuple[bool, str]:
    """champion_decision past the quality floor: the new version against the champion."""
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
    if rule == "evidence" and champion_evidence is not None:
        return evidence_decision(champion_evidence)
    return point_decision(val_accuracy, best, newer_champion)


def evidence_decision(champion_evidence: dict) -> tuple[bool, str]:
    """The evidence rule against a champion on the same validation images: take it only beyond noise."""
    from kdpipe.evidence import interval_text

    text = f"{interval_text(champion_evidence)} against the champion on the same validation images"
    if champion_evidence["low"] > 0:
        return True, f"better than the champion beyond noise: {text}"
    return False, f"not better than the champion beyond noise: {text} (export.promote_rule: evidence)"


def point_decision(val_accuracy: float, best: float, newer_champion: bool) -> tuple[bool, str]:
    """The point rule: the higher validation accuracy wins; ties go to the newer version."""
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
               promote: tuple[bool, str] = (True, ""), rule: str = "point", compare=None) -> dict:
    """Give `version` the candidate alias, and champion when promotion is on (`promote`: `promotion()`'s pair)
    and `champion_decision` says so; the reason becomes the version's `promotion_reason` tag.

    The new version's own tags are what gets compared. Gates of one model run one at a time, across processes
    and checkouts (`gate_lock`), so exports that race end as if they had been gated one after the other; an
    alias never moves back to an older version except a champion to a strictly better one on the same data.
    rule: export.promote_rule. compare: called with the champion's ModelVersion when it was made on the same
    dataset digest, under the gate's lock; returns the paired validation comparison (new − champion,
    kdpipe.evidence.paired_bootstrap's record) or None when it cannot be made. Its figures become the version's
    tags (`champion_val_*`) and a sentence of its description.
    Returns {version, aliases, champion, previous_champion, reason, champion_evidence}.
    """
    from kdpipe.store import retry_locked

    with gate_lock(client, name):
        return retry_locked(lambda: _gate(client, name, str(version), parity_passed, promote, rule, compare))


def _float_tag(tags: dict, key: str) -> float | None:
    """A numeric version tag, None when absent."""
    return float(tags[key]) if key in tags else None


def baseline_evidence(tags: dict) -> dict | None:
    """The paired comparison with the scratch baseline that the export stage wrote on the version, or None."""
    try:
        return {"difference": float(tags["baseline_val_difference"]), "low": float(tags["baseline_val_ci_low"]),
                "high": float(tags["baseline_val_ci_high"]), "confidence": float(tags["evidence_confidence"])}
    except (KeyError, ValueError):
        return None


def record_champion_evidence(client, name: str, version: str, champion, found: dict) -> None:
    """The paired comparison with the champion as version tags and a sentence of the version's description."""
    from kdpipe.evidence import interval_text

    tags = {"compared_with_champion": champion.version, "champion_val_difference": f"{found['difference']:.6f}",
            "champion_val_ci_low": f"{found['low']:.6f}", "champion_val_ci_high": f"{found['high']:.6f}"}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))
    description = client.get_model_version(name, version).description or ""
    sentence = (f"Against champion v{champion.version} on the same validation split ({found['images']} images): "
                f"{interval_text(found)}.")
    client.update_model_version(name, version, description=f"{description} {sentence}".strip())


def _gate(client, name: str, version: str, parity_passed: bool, promote: tuple[bool, str], rule: str,
          compare) -> dict:
    """apply_gate's read, decide and set, while it holds the gate lock."""
    new = client.get_model_version(name, version)
    accuracy, digest = float(new.tags.get("val_accuracy", "nan")), new.tags.get("dataset_digest", "")
    champion, candidate = current_champion(client, name), current_champion(client, name, CANDIDATE)
    found = None
    if compare is not None and champion is not None and champion.tags.get("dataset_digest") == digest:
        found = compare(champion)
        if found is not None:
            record_champion_evidence(client, name, version, champion, found)
    take, reason = champion_decision(accuracy, digest,
                                     None if champion is None else dict(champion.tags), parity_passed=parity_passed,
                                     newer_champion=champion is not None and int(champion.version) > int(version),
                                     chance=_float_tag(new.tags, "val_chance_accuracy"),
                                     baseline=_float_tag(new.tags, "baseline_val_accuracy"), rule=rule,
                                     baseline_evidence=baseline_evidence(new.tags), champion_evidence=found)
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
            "previous_champion": None if champion is None else str(champion.version), "reason": reason,
            "champion_evidence": found}


@contextmanager
def gate_lock(client, name: str) -> Iterator[None]:
    """Hold the gate of registered model `name` alone: the store's file lock for a sqlite store (kdpipe.tracking
    .store_lock), else a lease kept in the registry itself (registry_lease), for a server where processes share
    no file system."""
    from kdpipe.ship import lease
    from kdpipe.store import sqlite_path, store_lock

    uri = client._registry_uri  # the store this client registers in (MlflowClient keeps no public accessor)
    with store_lock(uri) if sqlite_path(uri) else lease.registry_lease(client, name):
        yield
