"""A Hugging Face transformers sequence classifier as a kdpipe text teacher (teacher.source: transformers).

`pretrained(location, ...)` reads AutoModelForSequenceClassification from a local folder or the local hub cache
(local_files_only: a stage never reaches the hub, whatever HF_HUB_OFFLINE says; a missing model is one line
saying how to fetch it, as the torchvision teacher does) with a new head for the dataset's classes unless the
saved head already names exactly those classes. `rebuild(hf_config, ...)` makes the same architecture from the
config kept in teacher.pt, so distill, evaluate and export never need the model folder again.
The wrapper speaks the text models' interface (kdpipe.models.text_nets): forward(input_ids, attention_mask).
transformers is imported inside functions only.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor, nn

from kdpipe.errors import UserError


class TransformersError(UserError):
    """A transformers teacher that cannot be found or used: named by the param that asked for it."""


class HFTextTeacher(nn.Module):
    """forward(input_ids (B, L), attention_mask (B, L) or None: ids != pad_id) -> logits (B, C)."""

    modality = "text"
    name = "transformers"

    def __init__(self, net: nn.Module, pad_id: int, max_length: int):
        super().__init__()
        self.net, self.pad_id, self.max_length = net, pad_id, max_length
        self.num_classes, self.vocab_size = net.config.num_labels, net.config.vocab_size
        self.hidden_width = net.config.hidden_size
        self.hf_config = json.loads(net.config.to_json_string())  # plain types: a weights_only load reads it

    def _mask(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        return (input_ids != self.pad_id).long() if attention_mask is None else attention_mask.long()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.net(input_ids=input_ids, attention_mask=self._mask(input_ids, attention_mask)).logits

    def text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None
                      ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """(logits, hidden states: embeddings then each layer (B, L, H), attention probabilities (B, h, L, L))."""
        out = self.net(input_ids=input_ids, attention_mask=self._mask(input_ids, attention_mask),
                       output_hidden_states=True, output_attentions=True)
        return out.logits, list(out.hidden_states), list(out.attentions or [])


def fetch_hint(location: str) -> str:
    return (f"fetch it once where there is network: hf download {location} (HF_HOME moves the cache), or save it "
            f"to a folder (AutoModelForSequenceClassification.from_pretrained(...).save_pretrained(dir)) and point "
            f"teacher.model there")


def pretrained(location: str, classes: list[str], pad_id: int, max_length: int, finetune: bool) -> HFTextTeacher:
    """The model at `location` with a head for `classes` (its own head kept only if it names exactly these)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    try:
        saved = AutoConfig.from_pretrained(location, local_files_only=True)
    except (OSError, ValueError) as e:
        where = "is a folder without a transformers config" if Path(location).is_dir() else \
            "is neither a local folder nor in the Hugging Face cache"
        raise TransformersError(f"teacher.model: {location!r} {where} ({str(e).splitlines()[0][:100]}); "
                                f"{fetch_hint(location)}") from None
    own_head = [saved.id2label[i] for i in sorted(saved.id2label)] == list(classes) if saved.id2label else False
    if not own_head and not finetune:
        raise TransformersError(f"teacher.finetune: {location} has no head for these {len(classes)} classes; set "
                                f"teacher.finetune: true to train a new one (with the teacher recipe)")
    labels = {"id2label": dict(enumerate(classes)), "label2id": {c: i for i, c in enumerate(classes)}}
    try:
        net = AutoModelForSequenceClassification.from_pretrained(
            location, local_files_only=True, num_labels=len(classes), ignore_mismatched_sizes=True,
            attn_implementation="eager", **labels)
    except (OSError, ValueError) as e:
        raise TransformersError(f"teacher.model: {location!r} does not load as a sequence classifier "
                                f"({str(e).splitlines()[0][:160]}); {fetch_hint(location)}") from None
    if not own_head:
        new_head(net)
    return HFTextTeacher(net.float(), pad_id, max_length)


def teacher_for(location: str, prepared: dict, finetune: bool) -> HFTextTeacher:
    """`pretrained` for a prepared text dataset, checked against its ids (the vocabulary fits the embeddings)."""
    model = pretrained(location, prepared["classes"], prepared["pad_id"], prepared["max_length"], finetune)
    if prepared["vocab_size"] > model.vocab_size:
        raise TransformersError(f"teacher.model: {location} embeds {model.vocab_size} tokens, the prepared ids come "
                                f"from a vocabulary of {prepared['vocab_size']}; set data.text.tokenizer to "
                                f"teacher.model and rerun prepare")
    return model


def new_head(net: nn.Module) -> None:
    """Re-initialise what sits outside the base model (the classification head) as BERT does: normal(0, σ) weights
    (σ = the config's initializer_range), zero biases; seeded by the stage's seed."""
    std = getattr(net.config, "initializer_range", 0.02)
    for name, child in net.named_children():
        if name == net.base_model_prefix:
            continue
        for module in child.modules() if isinstance(child, nn.Module) else ():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)


def rebuild(hf_config: dict, pad_id: int, max_length: int) -> HFTextTeacher:
    """The architecture a teacher.pt's `hf_config` describes, freshly initialised (its weights are loaded after)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = dict(hf_config)
    config = AutoConfig.for_model(config.pop("model_type"), **config)
    net = AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
    return HFTextTeacher(net.float(), pad_id, max_length)
