"""Registering the export stage's versions: teacher, student and int8 described and tagged from the typed export
results, logged with MLflow's ONNX flavour (image models) or as a pyfunc that takes raw strings (text models:
kdpipe/ship/text_pyfunc.py, with the ONNX file and tokenizer.json as its artifacts) and registered, each through
the candidate/champion gate of kdpipe/ship/gate.py.

The teacher's kdpipe checkpoint is logged beside its version (tag `checkpoint_artifact`), so a later run can
reuse it with teacher.source: registry. Each version's tags and description carry its lineage (git commit,
dvc.lock digest, the export run, the runs it was trained in); the registered models' own description and tags
(model_card.py) say what the model is and how to serve it. mlflow is imported inside functions, through
registry.mlflow_module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kdpipe.ship.gate import apply_gate
from kdpipe.ship.registry import mlflow_module

if TYPE_CHECKING:
    from kdpipe.config import Config
    from kdpipe.ship.feeds import ImageFeed, TextFeed
    from kdpipe.ship.shipping import Models, Shipment

@dataclass(frozen=True)
class Registration:
    """One ONNX model to register: the file, the registered-model name, version tags, a description."""

    name: str
    onnx_path: Path
    artifact_name: str  # the logged model's name inside the run, e.g. "student"
    test_accuracy: float
    dataset_digest: str
    tags: dict[str, str] = field(default_factory=dict)
    description: str = ""
    val_accuracy: float | None = None  # what the gate decides on; None: no tag, never crowned
    compare: Callable | None = None  # champion ModelVersion → paired validation comparison (gate.apply_gate)


def pip_requirements() -> list[str]:
    """Pinned onnx + onnxruntime, read from the installed packages: given explicitly, MLflow skips its ~10 s
    inference of requirements."""
    mlflow_module()
    import mlflow.onnx

    return mlflow.onnx.get_default_pip_requirements()


def register_onnx(entry: Registration, input_example, *, parity_passed: bool = True,
                  promote: tuple[bool, str] = (True, ""), rule: str = "point", tokenizer: Path | None = None) -> dict:
    """Log `entry.onnx_path` into the active run (the ONNX flavour; with a `tokenizer`, the text pyfunc), register
    it as a new version of `entry.name` with its tags and description, then apply the gate (`promote`:
    gate.promotion's pair). Returns apply_gate's dict.

    input_example: a few images, float32 [0, 1] (N, C, H, W), or a few strings for a text model; the signature
    is inferred from it and the model's output.
    """
    mlflow = mlflow_module()
    if tokenizer is not None:
        from kdpipe.ship.text_pyfunc import log_model

        info = log_model(entry, input_example, tokenizer, pip_requirements())
    else:
        info = log_onnx(entry, input_example)
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    tags = {**entry.tags, "test_accuracy": f"{entry.test_accuracy:.6f}", "dataset_digest": entry.dataset_digest}
    if entry.val_accuracy is not None:
        tags["val_accuracy"] = f"{entry.val_accuracy:.6f}"
    for key, value in tags.items():
        client.set_model_version_tag(entry.name, version, key, str(value))
    if entry.description:
        client.update_model_version(entry.name, version, description=entry.description)
    return apply_gate(client, entry.name, version, parity_passed=parity_passed, promote=promote, rule=rule,
                      compare=entry.compare)


def log_onnx(entry: Registration, input_example):
    """The ONNX flavour's logged and registered model. The file is loaded fresh: `mlflow.onnx.log_model` mutates
    the object it gets."""
    import onnx

    mlflow_module()
    import mlflow.onnx
    from mlflow.models import infer_signature

    logits = _run_onnx(entry.onnx_path, input_example)
    return mlflow.onnx.log_model(
        onnx.load(entry.onnx_path), name=entry.artifact_name, registered_model_name=entry.name,
        signature=infer_signature(input_example, {"logits": logits}), input_example=input_example,
        pip_requirements=pip_requirements(), onnx_execution_providers=["CPUExecutionProvider"],
        save_as_external_data=False,  # one self-contained model.onnx, as exported
    )


def _run_onnx(path: Path, images):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})[0]


def log_checkpoint(path: Path, artifact_path: str = "checkpoint") -> str:
    """Log a file into the active run; returns its runs:/ URI (what a version's checkpoint tag records)."""
    mlflow = mlflow_module()
    mlflow.log_artifact(str(path), artifact_path=artifact_path)
    return f"runs:/{mlflow.active_run().info.run_id}/{artifact_path}/{Path(path).name}"


@dataclass(frozen=True)
class Release:
    """What every version registered by one export shares: params, data, commit, models, measured files, the
    gate's inputs (chance level of the validation split, whether to promote) and the lineage."""

    cfg: Config
    dataset_digest: str
    git_commit: str
    models: Models
    shipment: Shipment
    chance_accuracy: float | None = None  # the majority class's share of the validation split: the chance level
    promote: tuple[bool, str] = (True, "")  # gate.promotion(export.promote)
    lineage: dict[str, str] = field(default_factory=dict)  # export_run, teacher/scratch/distill_run, dvc_lock_sha256
    feed: ImageFeed | TextFeed | None = None  # scores the validation split the gate runs a same-data champion on

    def entry(self, role: str, name: str, artifact: str, tags: dict, description: str) -> Registration:
        """The Registration of one shipped file: common tags, its own numbers, the lineage, then the role's `tags`;
        the description ends with the lineage in words."""
        cfg, result = self.cfg, self.shipment.shipped()[role]
        tags = {"git_commit": self.git_commit, "dataset": cfg.data.dataset, "opset": cfg.export.opset,
                "method": cfg.distill.method, "role": role, "params_hash": result.params_hash,
                "latency_ms_b1": f"{result.latency.b1:.4f}", "latency_ms_b64": f"{result.latency.b64:.4f}",
                **self.lineage, **tags}
        if self.chance_accuracy is not None:
            tags["val_chance_accuracy"] = f"{self.chance_accuracy:.6f}"
        return Registration(name=name, onnx_path=result.path, artifact_name=artifact,
                            test_accuracy=result.accuracy, dataset_digest=self.dataset_digest,
                            tags={k: str(v) for k, v in tags.items()}, val_accuracy=result.val_accuracy,
                            description=f"{description} {self.lineage_text()}",
                            compare=self.champion_comparison(result.val_correct))

    def champion_comparison(self, correct) -> Callable | None:
        """gate.apply_gate's `compare` for a version whose validation images score `correct` (0/1 each): the
        champion's ONNX downloaded and run on the same images, then the paired bootstrap (new − champion) with
        the evaluate section's settings. None (no comparison) without the validation split, or when the
        champion cannot be run on it; the gate then falls back on the point rule."""
        if self.feed is None or correct is None:
            return None
        opts = self.cfg.evaluate

        def compare(champion) -> dict | None:
            from kdpipe.evidence import paired_bootstrap

            theirs = champion_val_correct(champion, self.feed)
            if theirs is None or len(theirs) != len(correct):
                return None
            return paired_bootstrap(correct, theirs, samples=opts.bootstrap_samples, seed=opts.bootstrap_seed,
                                    confidence=opts.confidence)

        return compare

    def lineage_text(self) -> str:
        """The version's lineage as a sentence: commit, dvc.lock digest, the export run and the training runs."""
        lin = self.lineage
        return (f"Lineage: git commit {self.git_commit}, dvc.lock sha256 {lin.get('dvc_lock_sha256', 'unknown')}, "
                f"export run {lin.get('export_run', 'unknown')}, distill run {lin.get('distill_run', 'unknown')}, "
                f"scratch run {lin.get('scratch_run', 'unknown')}, teacher run {lin.get('teacher_run', 'unknown')}.")

    def register(self, entry: Registration, example) -> dict:
        """register_onnx with this export's promotion setting and rule (a text model: its tokenizer.json)."""
        tokenizer = self.feed.tokenizer if self.feed is not None and self.feed.modality == "text" else None
        return register_onnx(entry, example, promote=self.promote, rule=self.cfg.export.promote_rule,
                             tokenizer=tokenizer)


def champion_val_correct(champion, feed: ImageFeed | TextFeed):
    """(N,) 0/1 of a registered version's ONNX on the validation split, or None when it cannot be fetched or
    run (a version logged by hand, another input): the caller falls back on accuracies alone."""
    import shutil
    import tempfile

    from kdpipe.ship.registry import download_onnx

    folder = tempfile.mkdtemp(prefix="kdpipe-champion-")
    try:
        path = download_onnx(f"models:/{champion.name}/{champion.version}", mlflow_module().get_tracking_uri(), folder)
        return feed.correct(path, "val")
    except Exception:  # noqa: BLE001 - RegistryError, or onnxruntime's own types for a model that does not fit
        return None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def register(release: Release, teacher_checkpoint: Path, *, int8: bool) -> dict[str, dict]:
    """Teacher, student and (with `int8`: within export.int8_max_accuracy_drop of validation accuracy) int8 as
    new registry versions, each through the gate, and the registered models described (model_card.py). Returns
    role → registry.register_onnx's record (version, aliases, champion, ...)."""
    from kdpipe.ship.model_card import describe_models

    example = release.feed.example()  # a few test images (float32 [0, 1]) or texts
    checkpoint = log_checkpoint(teacher_checkpoint, artifact_path="teacher_checkpoint")
    registered = {"teacher": release.register(teacher_entry(release, checkpoint), example),
                  "student": release.register(student_entry(release), example)}
    if int8:
        registered["int8"] = release.register(int8_entry(release, registered["student"]["version"]), example)
    describe_models(release, registered)
    return registered


def teacher_entry(release: Release, checkpoint: str) -> Registration:
    """The teacher, with the runs:/ URI of its kdpipe checkpoint for reuse."""
    from kdpipe.ship.registry import CHECKPOINT_TAG

    cfg, models, source = release.cfg, release.models, release.models.teacher_source
    return release.entry(
        "teacher", cfg.export.teacher_registered_model, "teacher",
        {"model": models.teacher.name, "teacher_source": source, CHECKPOINT_TAG: checkpoint},
        f"kdpipe teacher {models.teacher.name} (teacher.source: {source}) on {cfg.data.dataset}; the teacher of "
        f"{cfg.distill.method} distillation into {models.student.name}. The kdpipe checkpoint for reuse "
        f"(teacher.source: registry) is {checkpoint}.")


def student_tags(release: Release, result) -> dict:
    """The tags of a student version (`result`: the fp32 or int8 OnnxResult), with the scratch baseline the gate
    weighs it against: its validation accuracy and the paired comparison on the same validation images."""
    tags = {"model": release.models.student.name, "student_seed": release.models.seed,
            "teacher_model": release.models.teacher.name}
    scratch = release.shipment.scratch
    if scratch.val_accuracy is None:
        return tags
    tags["baseline_val_accuracy"] = f"{scratch.val_accuracy:.6f}"
    if scratch.val_correct is not None and result.val_correct is not None:
        from kdpipe.evidence import paired_bootstrap

        opts = release.cfg.evaluate
        found = paired_bootstrap(result.val_correct, scratch.val_correct, samples=opts.bootstrap_samples,
                                 seed=opts.bootstrap_seed, confidence=opts.confidence)
        tags |= {"baseline_val_difference": f"{found['difference']:.6f}", "baseline_val_ci_low": f"{found['low']:.6f}",
                 "baseline_val_ci_high": f"{found['high']:.6f}", "evidence_confidence": f"{found['confidence']:g}"}
    return tags


def student_entry(release: Release) -> Registration:
    """The fp32 student, with the seed that shipped."""
    cfg, models = release.cfg, release.models
    return release.entry(
        "student", cfg.export.registered_model, "student", student_tags(release, release.shipment.student),
        f"kdpipe student {models.student.name} distilled from teacher {models.teacher.name} with method "
        f"{cfg.distill.method} on {cfg.data.dataset} (seed {models.seed}, chosen by validation accuracy).")


INT8_METHODS = {"image": "static int8 (QDQ, MinMax)", "text": "dynamic int8 (int8 weights, activations per batch)"}


def int8_entry(release: Release, fp32_version: str) -> Registration:
    """The int8 student, pointing at the fp32 version it was quantised from, with both batch-1 latencies.

    An int8 model slower than fp32 at batch 1 is still registered, tagged `int8_slower_than_fp32: true` with
    `latency_ms_b1` and `fp32_latency_ms_b1`, rather than left out: sub-millisecond latencies on a shared CPU
    flip with the machine's load, so a registration that depended on them would come and go from run to run,
    and int8 is ~35 % smaller, which is what counts where memory or download size is the limit. The tag and the
    description say it plainly; whoever deploys picks by the figures."""
    cfg, models, shipment = release.cfg, release.models, release.shipment
    slower, fp32_b1, int8_b1 = shipment.int8_slower, shipment.student.latency.b1, shipment.int8.latency.b1
    method = INT8_METHODS[release.feed.modality if release.feed is not None else "image"]
    tags = {**student_tags(release, shipment.int8), "quantization": method,
            "int8_accuracy_drop": f"{shipment.int8_drop:.6f}",
            "int8_val_accuracy_drop": f"{shipment.int8_val_drop:.6f}",
            "fp32_version": fp32_version, "int8_slower_than_fp32": str(slower).lower(),
            "fp32_latency_ms_b1": f"{fp32_b1:.4f}"}
    speed = (f"SLOWER than fp32 at batch 1 ({int8_b1:.3f} ms vs {fp32_b1:.3f} ms): smaller, not faster"
             if slower else f"{int8_b1:.3f} ms vs fp32 {fp32_b1:.3f} ms at batch 1")
    return release.entry(
        "int8", f"{cfg.export.registered_model}-int8", "student_int8", tags,
        f"{method} of kdpipe student {models.student.name} distilled from teacher {models.teacher.name} "
        f"with method {cfg.distill.method} on {cfg.data.dataset} (seed {models.seed}); fp32 version "
        f"{fp32_version}; {speed}.")


ORPHAN_TAG = "orphan"  # on a version whose export run never finished: why, and which run found it


def tag_orphans(dead_runs: list[str], by_run: str) -> list[str]:
    """Tag the registry versions that export runs killed mid-way registered (`dead_runs`: marked KILLED by
    tracking.reap_dead_runs), so that every version belongs to a finished run or says why not; "name vN" of each.
    They stay loadable (a version is registered only once its model is logged), and the gate keeps judging them."""
    mlflow = mlflow_module()
    client, tagged = mlflow.MlflowClient(), []
    for run_id in dead_runs:
        for version in client.search_model_versions(f"run_id = '{run_id}'"):
            client.set_model_version_tag(version.name, version.version, ORPHAN_TAG,
                                         f"registered by export run {run_id}, which was killed before it finished "
                                         f"(no metrics/export.json); export run {by_run} registered again")
            tagged.append(f"{version.name} v{version.version}")
    return tagged
