"""Raw text → class probabilities with an exported text model: tokenized by the tokenizer.json prepare saved
(its truncation to data.text.max_length and truncation side are configured inside it), then run by onnxruntime.

numpy at import; tokenizers and onnxruntime inside the functions; no torch and no other kdpipe module, so that
`kdpipe predict` runs it outside the training environment and the registered MLflow pyfunc (text_pyfunc.py)
ships it as it is. The exported file carries tokenizer.json in its metadata too (TOKENIZER_KEY), so an .onnx file
alone can classify text.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TOKENIZER_KEY = "tokenizer_json"  # ONNX metadata: tokenizer.json's text
BATCH = 64  # texts per onnxruntime run, of similar length


class TextModelError(ValueError):
    """A text model or input that cannot be used: one line naming it."""


def load_tokenizer(path: str | Path | None = None, text: str | None = None):
    """A `tokenizers.Tokenizer` from a tokenizer.json file or its text."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path)) if path is not None else Tokenizer.from_str(text)
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exceptions for bad JSON
        where = path if path is not None else "the model's tokenizer_json metadata"
        raise TextModelError(f"{where}: not a tokenizers tokenizer.json ({str(e).splitlines()[0][:120]})") from None


def encode(tokenizer, texts: list[str], pad_id: int) -> dict[str, np.ndarray]:
    """{input_ids, attention_mask}: int64 (N, L), right-padded with `pad_id` to the longest text, truncated as the
    tokenizer says (prepare's max_length and side)."""
    encodings = tokenizer.encode_batch(list(texts))
    rows = [e.ids[:sum(e.attention_mask)] for e in encodings]  # the tokens, without any padding the json adds
    longest = max((len(r) for r in rows), default=1) or 1
    ids = np.full((len(rows), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), longest), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
    return {"input_ids": ids, "attention_mask": mask}


def as_texts(model_input) -> list[str]:
    """The strings of a request: a list (or array) of strings, one string, a DataFrame's `text` column (or its only
    column), or {"text": [...]}."""
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, dict):
        model_input = model_input.get("text", model_input)
    columns = getattr(model_input, "columns", None)
    if columns is not None:  # a pandas DataFrame
        if "text" in columns:
            model_input = model_input["text"]
        elif len(columns) == 1:
            model_input = model_input[columns[0]]
        else:
            raise TextModelError(f"expected a column 'text' (or one column of strings), got columns {list(columns)}")
    texts = []
    for item in np.asarray(model_input, dtype=object).reshape(-1):  # {"text": [...]} arrives as one row of a list
        texts += list(item) if isinstance(item, list | tuple | np.ndarray) else [item]
    bad = next((t for t in texts if not isinstance(t, str)), None)
    if bad is not None or not texts:
        raise TextModelError(f"expected strings to classify, got {type(bad).__name__ if texts else 'nothing'}")
    return texts


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))  # (N, K), stable
    return e / e.sum(axis=1, keepdims=True)


class TextClassifier:
    """An exported text model and its tokenizer: `probabilities(texts)` (N, K), `classes`."""

    def __init__(self, onnx_path: str | Path, tokenizer_path: str | Path | None = None):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for unreadable files
            raise TextModelError(f"{onnx_path}: onnxruntime cannot load it ({type(e).__name__})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("modality") != "text":
            raise TextModelError(f"{onnx_path}: not a text model (its metadata has no modality: text)")
        self.classes: list[str] = json.loads(meta["classes"])
        self.pad_id = int(meta["pad_id"])
        if tokenizer_path is None and TOKENIZER_KEY not in meta:
            raise TextModelError(f"{onnx_path}: carries no tokenizer; pass its tokenizer.json")
        self.tokenizer = load_tokenizer(tokenizer_path, None if tokenizer_path else meta[TOKENIZER_KEY])

    def logits(self, texts: list[str]) -> np.ndarray:
        """(N, K) float32: texts tokenized, run in batches of similar length, in the order given."""
        feed = encode(self.tokenizer, texts, self.pad_id)
        lengths = feed["attention_mask"].sum(1)
        out = np.empty((len(texts), len(self.classes)), dtype=np.float32)
        order = np.argsort(lengths, kind="stable")
        for start in range(0, len(order), BATCH):
            rows = order[start:start + BATCH]
            longest = max(int(lengths[rows].max()), 1)
            out[rows] = self.session.run(None, {k: v[rows, :longest] for k, v in feed.items()})[0]
        return out

    def probabilities(self, texts: list[str]) -> np.ndarray:
        return softmax(self.logits(texts).astype(np.float64))
