"""The registered models' own description and tags, set by every export: what the model is, on which data and
classes, what input it takes, how to serve it and where its evaluation report is. A person browsing the
registry's *Models* page reads this before any version; each version's own lineage is in registrations.py.

The facts come from the shipped ONNX file's metadata (written by shipping.provenance: classes, input size and
preprocessing), so the card says what the served file really expects. mlflow through registry.mlflow_module.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from kdpipe.paths import Paths
from kdpipe.ship.registry import mlflow_module

if TYPE_CHECKING:
    from kdpipe.ship.registrations import Release

SERVE = "mlflow models serve -m models:/{name}@champion --env-manager local --host 127.0.0.1 --port 5001"
CURL = ("curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' "
        "-d '{{\"inputs\": <float32 array (N, {shape}) in [0, 1]>}}'")
TEXT_CURL = ("curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' "
             "-d '{\"inputs\": [\"some text\", \"another text\"]}'")
REPORT = "evaluate.md"  # the evaluate stage's report, in paths.reports/evaluate/ (kdpipe/stages/evaluate.py)


def card(release: Release, role: str, name: str) -> tuple[str, dict[str, str]]:
    """(description, tags) of registered model `name`, which holds the `role` files of every export."""
    from kdpipe.ship.onnx_export import read_metadata

    cfg, models = release.cfg, release.models
    meta = read_metadata(release.shipment.shipped()[role].path)
    text = meta.get("modality") == "text"
    classes = json.loads(meta.get("classes", "[]"))
    what = {"teacher": f"the teacher ({models.teacher.name}) that kdpipe distils from",
            "student": f"a {models.student.name} student distilled from teacher {models.teacher.name} "
                       f"with method {cfg.distill.method}",
            "int8": f"the {'dynamic' if text else 'static'} int8 quantisation of the {models.student.name} student"}[role]
    report = str(Paths(cfg.paths).reports("evaluate") / REPORT)
    tags = {"role": role, "dataset": cfg.data.dataset, "classes": json.dumps(classes), "num_classes": str(len(classes)),
            "preprocess": meta.get("preprocess", "unknown"), "serve": SERVE.format(name=name),
            "evaluation_report": report}
    listed = f"{len(classes)} classes: {', '.join(classes[:20])}{', ...' if len(classes) > 20 else ''}"
    tail = (f"Promotion: the `champion` alias moves on validation accuracy only (`promotion_reason` on each "
            f"version); `candidate` is the latest export. Evaluation report: {report} at the version's git_commit, "
            f"and `report/` in its export run.")
    if text:
        return text_card(what, meta, tags, listed, tail)
    tags |= {"task": "image classification", "framework": "onnx (MLflow onnx flavour)",
             "input_size": meta.get("input_size", "unknown"), "input_format": meta.get("input_format", "unknown")}
    description = (
        f"kdpipe: {what}, an image classifier trained on the {cfg.data.dataset} dataset ({listed}). Input `images`: "
        f"{tags['input_format']}, size {tags['input_size']} (C x H x W); preprocessing of an image file: "
        f"{tags['preprocess']}. Output `logits` (N, {len(classes)}). Serve the champion: `{tags['serve']}`, then "
        f"`{CURL.format(shape=tags['input_size'].replace('x', ', '))}`. {tail}")
    return description, tags


def describe_models(release: Release, registered: dict[str, dict]) -> None:
    """Set the description and tags of every registered model this export added a version to."""
    mlflow = mlflow_module()
    client = mlflow.MlflowClient()
    names = {"teacher": release.cfg.export.teacher_registered_model, "student": release.cfg.export.registered_model,
             "int8": f"{release.cfg.export.registered_model}-int8"}
    for role in registered:
        description, tags = card(release, role, names[role])
        client.update_registered_model(names[role], description=description)
        for key, value in tags.items():
            client.set_registered_model_tag(names[role], key, value)


def text_card(what: str, meta: dict[str, str], tags: dict[str, str], listed: str, tail: str,
              ) -> tuple[str, dict[str, str]]:
    """(description, tags) of a registered text model: a pyfunc taking raw strings (kdpipe/ship/text_pyfunc.py)."""
    tags = {**tags, "task": "text classification", "framework": "pyfunc (onnx + tokenizer.json, kdpipe text_pyfunc)",
            "input_format": "strings: a list, or a DataFrame column text", "max_length": meta.get("max_length", "")}
    description = (
        f"kdpipe: {what}, a text classifier trained on the {tags['dataset']} dataset ({listed}). Input: raw strings "
        f"(a list, or a DataFrame column `text`), tokenized with the logged tokenizer.json ({tags['preprocess']}). "
        f"Output per text: `label`, `label_index` and `probabilities` in the order of the `classes` tag. Serve the "
        f"champion: `{tags['serve']}`, then `{TEXT_CURL}`. {tail}")
    return description, tags
