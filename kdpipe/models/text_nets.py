"""The zoo's text networks (issue 34): a small BERT-shaped encoder (`text_transformer`) and a 1-D CNN over token
embeddings (`text_cnn`, Kim 2014). Both read right-padded token ids:

    forward(input_ids (B, L) int64, attention_mask (B, L) 1 = token, 0 = pad) -> logits (B, C)
    text_features(input_ids, attention_mask) -> (logits, hidden_states, attentions)

L is the batch's own longest text. Without `attention_mask` the mask is `input_ids != pad_id` (the pad token
is special: no text token has its id), so the training loop and the logit losses call `model(ids)` as they
call an image model. hidden_states: the embeddings' output first, then each block's, (B, L, width) each, as
Hugging Face's output_hidden_states; attentions: each layer's probabilities (B, heads, L, L) (the CNN has none).
`text_args` holds every constructor argument: a checkpoint rebuilds the model from it alone.
Only torch is imported.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TextNet(nn.Module):
    """What every text model shares: its name, constructor arguments, the pad id and the mask it implies."""

    modality = "text"

    def __init__(self, name: str, text_args: dict):
        super().__init__()
        self.name, self.text_args = name, dict(text_args)
        self.num_classes, self.pad_id = text_args["num_classes"], text_args["pad_id"]
        self.vocab_size, self.max_length = text_args["vocab_size"], text_args["max_length"]
        self.hidden_width = text_args["width"]  # of every hidden state text_features returns

    def mask_of(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        """(B, L) bool, True at tokens."""
        return (input_ids != self.pad_id) if attention_mask is None else attention_mask.bool()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.text_features(input_ids, attention_mask)[0]


def masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean over the tokens of each text: (B, L, H), (B, L) bool -> (B, H); pads never count."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class Attention(nn.Module):
    """Multi-head self-attention with BERT's projections (query, key, value, output); returns the probabilities
    too, for attention-map distillation."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value, self.output = (nn.Linear(width, width) for _ in range(4))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        b, length, width = x.shape
        split = lambda t: t.view(b, length, self.heads, width // self.heads).transpose(1, 2)  # noqa: E731 (B, h, L, d)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(width // self.heads)  # (B, h, L, L)
        scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)  # pad keys never attended
        probs = scores.softmax(-1)
        out = (self.dropout(probs) @ v).transpose(1, 2).reshape(b, length, width)  # (B, h, L, d) -> (B, L, H)
        return self.output(out), probs


class Block(nn.Module):
    """One post-LayerNorm encoder layer, as BERT's (so a BERT teacher's layers can initialise it)."""

    def __init__(self, width: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.attention = Attention(width, heads, dropout)
        self.attention_norm = nn.LayerNorm(width, eps=1e-12)
        self.intermediate, self.output = nn.Linear(width, ffn), nn.Linear(ffn, width)
        self.output_norm = nn.LayerNorm(width, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        attended, probs = self.attention(x, mask)
        x = self.attention_norm(x + self.dropout(attended))
        x = self.output_norm(x + self.dropout(self.output(F.gelu(self.intermediate(x)))))
        return x, probs


class TextTransformer(TextNet):
    """A small BERT-shaped encoder: token + position embeddings, `layers` post-LN blocks, the mean of the token
    states (pads excluded) into a linear head."""

    def __init__(self, text_args: dict):
        super().__init__("text_transformer", text_args)
        a = text_args
        width, ffn = a["width"], a["ffn"] or 4 * a["width"]
        self.word_embeddings = nn.Embedding(a["vocab_size"], width, padding_idx=a["pad_id"])
        self.position_embeddings = nn.Embedding(a["max_length"], width)
        self.embedding_norm = nn.LayerNorm(width, eps=1e-12)
        self.dropout = nn.Dropout(a["dropout"])
        self.blocks = nn.ModuleList(Block(width, a["heads"], ffn, a["dropout"]) for _ in range(a["layers"]))
        self.head = nn.Linear(width, a["num_classes"])
        self.apply(_init_bert)

    def text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None
                      ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        mask = self.mask_of(input_ids, attention_mask)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]  # (B, L, H)
        x = self.dropout(self.embedding_norm(x))
        hidden, attentions = [x], []
        for block in self.blocks:
            x, probs = block(x, mask)
            hidden.append(x)
            attentions.append(probs)
        return self.head(self.dropout(masked_mean(x, mask))), hidden, attentions


class TextCNN(TextNet):
    """Kim (2014)'s CNN for sentence classification: token embeddings, one Conv1d per n-gram width, each max-pooled
    over the tokens of the text (pads excluded), concatenated into a linear head. No attention: fast on a CPU."""

    def __init__(self, text_args: dict):
        super().__init__("text_cnn", text_args)
        a = text_args
        width = a["width"]
        self.word_embeddings = nn.Embedding(a["vocab_size"], width, padding_idx=a["pad_id"])
        self.convs = nn.ModuleList(nn.Conv1d(width, width, k, padding=k // 2) for k in a["kernel_sizes"])
        self.dropout = nn.Dropout(a["dropout"])
        self.head = nn.Linear(width * len(self.convs), a["num_classes"])

    def text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None
                      ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        mask = self.mask_of(input_ids, attention_mask)
        length = input_ids.shape[1]
        x = self.word_embeddings(input_ids)  # (B, L, H)
        hidden, pooled = [x], []
        for conv in self.convs:
            h = F.relu(conv(x.transpose(1, 2))[..., :length]).transpose(1, 2)  # (B, H, L') -> (B, L, H)
            hidden.append(h)
            pooled.append(h.masked_fill(~mask[..., None], torch.finfo(h.dtype).min).amax(1))  # (B, H)
        return self.head(self.dropout(torch.cat(pooled, 1))), hidden, []


def _init_bert(module: nn.Module) -> None:
    """BERT's initialisation: normal(0, 0.02) weights, zero biases, unit LayerNorms, a zero pad embedding."""
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        with torch.no_grad():
            module.weight[module.padding_idx].zero_()
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


TEXT_ZOO = {"text_transformer": TextTransformer, "text_cnn": TextCNN}


def text_args(num_classes: int, vocab_size: int, pad_id: int, max_length: int, net) -> dict:
    """The constructor arguments of a text model: the data's facts and `net`'s shape (a config TextNetParams)."""
    return {"num_classes": num_classes, "vocab_size": vocab_size, "pad_id": pad_id, "max_length": max_length,
            "width": net.width, "layers": net.layers, "heads": net.heads, "ffn": net.ffn, "dropout": net.dropout,
            "kernel_sizes": list(net.kernel_sizes)}


def is_text_model(name: str) -> bool:
    return name in TEXT_ZOO


def build_text_model(name: str, args: dict) -> nn.Module:
    """Text zoo model `name` from its constructor arguments (text_args)."""
    if name not in TEXT_ZOO:
        raise ValueError(f"unknown text model {name!r}; known: {', '.join(TEXT_ZOO)}")
    return TEXT_ZOO[name](args)


def build_text_for(name: str, net, prepared: dict) -> nn.Module:
    """Text zoo model `name` for a prepared text dataset, shaped by `net` (a config TextNetParams)."""
    return build_text_model(name, text_args(len(prepared["classes"]), prepared["vocab_size"], prepared["pad_id"],
                                            prepared["max_length"], net))
