"""DistilBERT's initialisation (Sanh et al. 2019, §3 "Student initialization"): a text_transformer student starts from
its teacher's embeddings and every other layer, "taking one layer out of two", where the shapes allow (the same
width, heads, feed-forward size and tokenizer). The teacher is a text_transformer or a BERT-like transformers model
(BERT's parameter names); BERT's token-type embedding of type 0, which it adds at every position, is folded into
the student's position embeddings, so the student's embeddings equal BERT's on every text.

Student layer j takes teacher layer j·s with s = max(1, L_teacher // L_student): for 12 → 6 layers 0, 2, ..., 10.
The classification head stays the student's own (a mean over tokens, not BERT's pooled [CLS]).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdpipe.errors import UserError

BLOCK_PARTS = {  # student block parameter → BERT encoder layer parameter
    "attention.query": "attention.self.query", "attention.key": "attention.self.key",
    "attention.value": "attention.self.value", "attention.output": "attention.output.dense",
    "attention_norm": "attention.output.LayerNorm", "intermediate": "intermediate.dense",
    "output": "output.dense", "output_norm": "output.LayerNorm",
}


class InitError(UserError):
    """A student whose shapes do not fit its teacher's layers."""


def teacher_layers(teacher: nn.Module) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    """(embedding tensors, one dict per layer) of the teacher, keyed by the student's parameter names."""
    state = teacher.state_dict()
    if getattr(teacher, "name", "") == "text_transformer":
        embeddings = {k: v for k, v in state.items() if k.split(".")[0] in ("word_embeddings", "position_embeddings",
                                                                              "embedding_norm")}
        layers = [{k.split(".", 2)[2]: v for k, v in state.items() if k.startswith(f"blocks.{i}.")}
                  for i in range(len(teacher.blocks))]
        return embeddings, layers
    prefix = f"net.{teacher.net.base_model_prefix}."
    emb = prefix + "embeddings."
    if emb + "word_embeddings.weight" not in state:
        raise InitError(f"student.text.init_from_teacher: the teacher ({teacher.name}) has no BERT-like embeddings")
    positions = state[emb + "position_embeddings.weight"]
    if emb + "token_type_embeddings.weight" in state:  # BERT adds type 0 at every position: fold it in
        positions = positions + state[emb + "token_type_embeddings.weight"][0]
    embeddings = {"word_embeddings.weight": state[emb + "word_embeddings.weight"],
                  "position_embeddings.weight": positions,
                  "embedding_norm.weight": state[emb + "LayerNorm.weight"],
                  "embedding_norm.bias": state[emb + "LayerNorm.bias"]}
    layers = []
    for i in range(teacher.net.config.num_hidden_layers):
        base = f"{prefix}encoder.layer.{i}."
        layers.append({f"{ours}.{kind}": state[f"{base}{theirs}.{kind}"]
                       for ours, theirs in BLOCK_PARTS.items() for kind in ("weight", "bias")})
    return embeddings, layers


def init_from_teacher(student: nn.Module, teacher: nn.Module) -> list[int]:
    """Copy the teacher's embeddings and every other layer into `student` (a text_transformer); the teacher
    layers taken. InitError naming the first tensor that does not fit."""
    embeddings, layers = teacher_layers(teacher)
    step = max(1, len(layers) // len(student.blocks))
    taken = [j * step for j in range(len(student.blocks))]
    if taken[-1] >= len(layers):
        raise InitError(f"student.text.init_from_teacher: the student has {len(student.blocks)} layers, the teacher "
                        f"only {len(layers)}; use at most as many layers as the teacher")
    own = student.state_dict()
    new = {k: v[: own[k].shape[0]] if k == "position_embeddings.weight" else v for k, v in embeddings.items()}
    for j, i in enumerate(taken):
        new.update({f"blocks.{j}.{k}": v for k, v in layers[i].items()})
    for key, value in new.items():
        if key not in own or own[key].shape != value.shape:
            found = tuple(own[key].shape) if key in own else "absent"
            raise InitError(f"student.text.init_from_teacher: {key} is {tuple(value.shape)} in the teacher, {found} in "
                            f"the student; give the student the teacher's width, heads, ffn and tokenizer, or set it "
                            f"to false")
    with torch.no_grad():
        for key, value in new.items():
            own[key].copy_(value.to(own[key].device, own[key].dtype))
    return taken
