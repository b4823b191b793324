"""What the export stage feeds its models, by modality: images (uint8 (N, C, H, W) → float [0, 1], one input
"images") or token ids (input_ids and attention_mask, int64 (batch, sequence)). Each feed exports a model, checks it
against PyTorch on the test split, scores a split, times it, quantises it and describes its input in the ONNX
metadata, so shipping.py and registrations.py handle the roles and the gate once for both.

`feed_for(prepared, tokenizer)` picks it from the prepared data's modality.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kdpipe.ship.shipping import BIG_BATCH, Latency

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

    from kdpipe.config import Config, ExportConfig

EXAMPLES = 4  # inputs logged as each registered version's input example


def feed_for(prepared: dict, tokenizer: Path | None = None) -> ImageFeed | TextFeed:
    """The feed of a prepared dataset: TextFeed (with its tokenizer.json) for modality text, else ImageFeed."""
    if prepared.get("modality", "image") == "text":
        return TextFeed(prepared, Path(tokenizer) if tokenizer else None)
    return ImageFeed(prepared)


@dataclass(frozen=True)
class ImageFeed:
    """float32 (N, C, H, W) in [0, 1], normalisation inside the graph (kdpipe/ship/onnx_export.py)."""

    prepared: dict
    modality = "image"

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.prepared["image_shape"])

    def input_metadata(self) -> dict[str, str]:
        """ONNX metadata on the input: classes, size, and the image file → input preprocessing that prepare applied
        to the images evaluate scores (which `kdpipe predict` applies too)."""
        from kdpipe.data.images import describe, prepared_resize

        c, h, w = self.shape
        resize = prepared_resize(self.prepared.get("params", {}).get("data", {}))
        return {"classes": json.dumps(list(self.prepared["classes"])), "input_size": f"{c}x{h}x{w}",
                "input_format": "float32 (N, C, H, W) in [0, 1] (uint8 / 255); dynamic batch; normalisation inside",
                "resize": resize, "preprocess": describe(resize, "L" if c == 1 else "RGB", (w, h))}

    def export(self, model: nn.Module, path: Path, metadata: dict[str, str], opset: int) -> Path:
        from kdpipe.ship.onnx_export import export_onnx

        return export_onnx(model, path, self.shape, opset=opset, metadata=metadata)

    def parity(self, model: nn.Module, path: Path, opts: ExportConfig) -> dict:
        from kdpipe.ship.onnx_export import parity

        return parity(model, path, self.prepared["test_x"], atol=opts.parity_atol,
                      min_agreement=opts.parity_min_agreement)

    def correct(self, path: Path, split: str) -> np.ndarray:
        """(N,) int8 0/1 per image of `split` (val or test) under onnxruntime."""
        from kdpipe.ship.onnx_export import onnx_correct

        return onnx_correct(path, self.prepared[f"{split}_x"], self.prepared[f"{split}_y"])

    def latency(self, path: Path, opts: ExportConfig) -> Latency:
        from kdpipe.ship.onnx_export import ort_latency_ms

        b1, b64 = (ort_latency_ms(path, self.shape, batch_size=n, repeats=opts.latency_repeats,
                                  threads=opts.latency_threads) for n in (1, BIG_BATCH))
        return Latency(b1, b64)

    def quantize(self, fp32: Path, int8: Path, cfg: Config) -> Path:
        """Static int8 (QDQ), calibrated on a seeded sample of export.calibration_images train images."""
        import torch

        from kdpipe.ship.onnx_export import quantize_int8

        train_x = self.prepared["train_x"]
        order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(cfg.seed))
        return quantize_int8(fp32, int8, train_x[order[:cfg.export.calibration_images]])

    def example(self):
        """A few test images, float32 [0, 1] (N, C, H, W): the registered versions' input example."""
        from kdpipe.ship.onnx_export import as_float01

        return as_float01(self.prepared["test_x"][:EXAMPLES])


@dataclass(frozen=True)
class TextFeed:
    """input_ids and attention_mask, int64 (batch, sequence), right-padded (kdpipe/ship/text_onnx.py); raw text
    becomes them through the prepared tokenizer.json, which the metadata carries (text_runtime.TOKENIZER_KEY)."""

    prepared: dict
    tokenizer: Path | None  # tokenizer.json beside the prepared data
    modality = "text"

    def split(self, name: str) -> tuple:
        return self.prepared[f"{name}_x"], self.prepared[f"{name}_lengths"]

    def input_metadata(self) -> dict[str, str]:
        from kdpipe.ship.text_runtime import TOKENIZER_KEY

        p, truncation = self.prepared, self.truncation()
        return {"modality": "text", "classes": json.dumps(list(p["classes"])), "pad_id": str(int(p["pad_id"])),
                "max_length": str(int(p["max_length"])), "vocab_size": str(int(p["vocab_size"])),
                "input_format": "input_ids, attention_mask: int64 (batch, sequence), right-padded with pad_id, "
                                "1 = token; dynamic batch and sequence",
                "preprocess": f"tokenizer.json (in tokenizer_json), truncated to {p['max_length']} tokens from the "
                              f"{truncation}", TOKENIZER_KEY: self.tokenizer_json()}

    def tokenizer_json(self) -> str:
        from kdpipe.ship.onnx_export import ExportError

        if self.tokenizer is None or not self.tokenizer.is_file():
            raise ExportError(f"{self.tokenizer}: the prepared tokenizer.json is missing; rerun prepare "
                              "(dvc repro prepare)")
        return self.tokenizer.read_text(encoding="utf-8")

    def truncation(self) -> str:
        """Which end prepare cut long texts from, as the tokenizer.json records it ("right" or "left")."""
        settings = json.loads(self.tokenizer_json()).get("truncation") or {}
        return str(settings.get("direction", "Right")).lower()

    def export(self, model: nn.Module, path: Path, metadata: dict[str, str], opset: int) -> Path:
        from kdpipe.ship.text_onnx import export_text_onnx

        p = self.prepared
        return export_text_onnx(model, path, max_length=int(p["max_length"]), pad_id=int(p["pad_id"]),
                                vocab_size=int(p["vocab_size"]), metadata=metadata, opset=opset)

    def parity(self, model: nn.Module, path: Path, opts: ExportConfig) -> dict:
        from kdpipe.ship.text_onnx import text_parity

        return text_parity(model, path, *self.split("test"), atol=opts.parity_atol,
                           min_agreement=opts.parity_min_agreement)

    def correct(self, path: Path, split: str) -> np.ndarray:
        from kdpipe.ship.text_onnx import text_correct

        return text_correct(path, *self.split(split), self.prepared[f"{split}_y"])

    def latency(self, path: Path, opts: ExportConfig) -> Latency:
        """Batch 1 and BIG_BATCH at each of text_onnx.latency_lengths (16, 64, max_length); b1 and b64 are the
        max_length figures (the slowest request), `by_length` has them all."""
        from kdpipe.ship.text_onnx import latency_lengths, text_latency_ms

        vocab = int(self.prepared["vocab_size"])
        by_length = {n: {f"b{b}": text_latency_ms(path, length=n, batch_size=b, vocab_size=vocab,
                                                  repeats=opts.latency_repeats, threads=opts.latency_threads)
                         for b in (1, BIG_BATCH)}
                     for n in latency_lengths(int(self.prepared["max_length"]))}
        longest = by_length[max(by_length)]
        return Latency(longest["b1"], longest[f"b{BIG_BATCH}"], by_length)

    def quantize(self, fp32: Path, int8: Path, cfg: Config) -> Path:
        """Dynamic int8 (text_onnx.quantize_text_int8): no calibration data."""
        from kdpipe.ship.text_onnx import quantize_text_int8

        return quantize_text_int8(fp32, int8)

    def example(self) -> list[str]:
        """A few test texts as the tokenizer decodes their ids (special tokens dropped; lower-cased where it
        normalises so): the registered versions' input example."""
        from kdpipe.ship.text_runtime import load_tokenizer

        ids, lengths = self.split("test")
        tokenizer = load_tokenizer(text=self.tokenizer_json())
        return [tokenizer.decode([int(t) for t in ids[i][:int(lengths[i])]], skip_special_tokens=True) or "text"
                for i in range(min(EXAMPLES, len(lengths)))]
