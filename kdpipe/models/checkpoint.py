"""Checkpoints that carry their params: saving, loading (weights_only), rebuilding the model, the same-data check
every consumer makes, and the members of a teacher ensemble."""

from __future__ import annotations

from pathlib import Path

import torch

from kdpipe.errors import UserError
from kdpipe.files import load_torch, save_torch
from kdpipe.models.zoo import bare_state

CHECKPOINT_KEYS = ("state_dict", "model", "in_channels", "num_classes", "mean", "std", "classes")


class CheckpointError(UserError):
    """A checkpoint that cannot be used: the message names the file and what is wrong."""


def save_checkpoint(path: str | Path, model, *, classes: list[str], params: dict, extra: dict | None = None) -> Path:
    """Weights plus everything needed to rebuild and audit them; loadable with weights_only=True. A text model
    carries its constructor arguments (`text_args`, or a transformers model's config as `hf_config`) instead of
    image channels and normalisation."""
    if getattr(model, "modality", "image") == "text":
        return save_torch(path, {**text_entries(model), "classes": list(classes), "params": params, **(extra or {})})
    ckpt = {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model": model.name,
        "in_channels": model.in_channels,
        "num_classes": model.num_classes,
        "mean": [float(v) for v in model.mean.flatten()],
        "std": [float(v) for v in model.std.flatten()],
        "input_size": model.input_size,
        "classes": list(classes),
        "params": params,
        **(extra or {}),
    }
    return save_torch(path, ckpt)


def text_entries(model) -> dict:
    """What rebuilds a text model: its zoo name and constructor arguments, or its transformers config."""
    entries = {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "model": model.name,
               "modality": "text", "num_classes": model.num_classes}
    if hasattr(model, "hf_config"):
        return {**entries, "hf_config": model.hf_config, "text_args": {"pad_id": model.pad_id,
                                                                       "max_length": model.max_length}}
    return {**entries, "text_args": dict(model.text_args)}


def build_text(path: str | Path, ckpt: dict):
    """The text model a checkpoint describes (zoo name + text_args, or a transformers config), weights loaded."""
    try:
        if "hf_config" in ckpt:
            from kdpipe.models.hf_teacher import rebuild

            model = rebuild(ckpt["hf_config"], **ckpt["text_args"])
        else:
            from kdpipe.models.text_nets import build_text_model

            model = build_text_model(ckpt["model"], ckpt["text_args"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a text model kdpipe can rebuild ({e})") from None
    misfit = _misfit(model, ckpt["state_dict"])
    if misfit:
        raise CheckpointError(f"{path}: weights do not fit {model.name} ({misfit})")
    model.load_state_dict(ckpt["state_dict"])
    return model, ckpt


def load_checkpoint(path: str | Path) -> dict:
    """A kdpipe checkpoint dict (weights_only load); CheckpointError naming the file otherwise."""
    ckpt = load_torch(path, CheckpointError, missing="checkpoint not found", unreadable="not a loadable torch checkpoint")
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: expected a dict, got {type(ckpt).__name__}")
    return ckpt


def build_from_checkpoint(path: str | Path, *, fallback_model: str | None = None, in_channels: int | None = None,
                          num_classes: int | None = None, mean=None, std=None, finetune: bool = False):
    """Rebuild a model from a kdpipe checkpoint, or from a bare state dict of `fallback_model` (with `finetune`,
    tensors that do not fit this dataset are adapted or left freshly initialised: see bare_state)."""
    from kdpipe.models.zoo import build_model

    ckpt = load_checkpoint(path)
    if ckpt.get("modality") == "text":
        return build_text(path, ckpt)
    if "state_dict" in ckpt:
        missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
        if missing:
            raise CheckpointError(f"{path}: missing {', '.join(missing)}")
        name, state = ckpt["model"], ckpt["state_dict"]
        in_channels, num_classes = ckpt["in_channels"], ckpt["num_classes"]
        mean, std = ckpt["mean"], ckpt["std"]
        input_size = ckpt.get("input_size")  # absent from checkpoints older than teacher.input_size
    elif fallback_model and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        name, state, input_size = fallback_model, ckpt, None
    else:
        raise CheckpointError(f"{path}: neither a kdpipe checkpoint nor a state dict")
    try:
        model = build_model(name, in_channels, num_classes, mean=mean, std=std, input_size=input_size)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if "state_dict" not in ckpt:
        state = bare_state(model, state, finetune)
    misfit = _misfit(model, state)
    if not misfit:
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            misfit = str(e).splitlines()[0]
    if misfit:
        raise CheckpointError(f"{path}: weights do not fit {name} ({misfit})")
    return model, ckpt


def _misfit(model, state: dict) -> str:
    """Why `state` would not load into `model`, in a few words ("" when it fits): the first tensor of another
    shape, else how many keys are missing and unexpected (another architecture)."""
    own = model.state_dict()
    for key, value in state.items():
        if key in own and (not isinstance(value, torch.Tensor) or value.shape != own[key].shape):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            return f"{key} is {shape} in the file, {tuple(own[key].shape)} in {model.name}"
    missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    parts = [f"{len(missing)} missing keys such as {missing[0]}"] if missing else []
    parts += [f"{len(unexpected)} unexpected keys such as {unexpected[0]}"] if unexpected else []
    return ", ".join(parts)


def require_same_data(path: str | Path, found: object, digest: str, *, stage: str) -> None:
    """A file that records the dataset digest it was made from (`found`; None in files older than the digest)
    must have been made from the data prepared now; CheckpointError naming it and the stage to rerun otherwise."""
    if found not in (None, digest):
        raise CheckpointError(f"{path}: made for another dataset (digest {str(found)[:12]}, prepared data is "
                              f"{digest[:12]}); rerun the {stage} stage (dvc repro {stage})")


def load_trained(path: str | Path, digest: str, *, stage: str):
    """(model on the CPU in eval mode, checkpoint) written by `stage` on the dataset with `digest`.

    The one check every consumer of a checkpoint makes: it exists, it loads, and it was trained on the data
    prepared now (a stale checkpoint would otherwise be evaluated or shipped against other test images).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; run the {stage} stage first (dvc repro {stage})")
    try:
        model, ckpt = build_from_checkpoint(path)
    except CheckpointError as e:  # corrupt, truncated or foreign: the stage that writes it can write it again
        raise CheckpointError(f"{e}; rerun the {stage} stage (dvc repro {stage})") from None
    require_same_data(path, ckpt.get("dataset_digest"), digest, stage=stage)
    return model.cpu().eval(), ckpt


def ensemble_members(teacher: torch.nn.Module, ckpt: dict) -> list[torch.nn.Module]:
    """The teacher, followed by the other members of its ensemble (teacher.ensemble), which its checkpoint holds
    as state dicts of the same architecture."""
    import copy

    members = [teacher]
    for member in ckpt.get("ensemble", []):
        model = copy.deepcopy(teacher)
        model.load_state_dict(member["state_dict"])
        members.append(model)
    return members
