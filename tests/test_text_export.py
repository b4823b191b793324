"""Text models to ONNX and back (kdpipe/ship/text_onnx.py, text_runtime.py, `kdpipe predict` on texts), on a small
stand-in model that follows the text contract (forward(input_ids, attention_mask) -> logits) and a tokenizer trained
here: inputs, dynamic axes, parity over length batches, padding that changes nothing, int8, latency lengths, the
tokenizer as prepare configures it, and predict without torch."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from conftest import subprocess_env
from torch import nn

from kdpipe.ship import text_onnx, text_runtime
from kdpipe.ship.onnx_export import ort_session

CLASSES = ["animal", "money", "weather"]
MAX_LENGTH = 24
TEXTS = {"animal": ["the cat sat on the mat", "a dog barked at the cat", "the horse ran in the field",
                    "a bird sang in the tree"],
         "money": ["stocks fell sharply today", "the bank raised its rates", "the market rallied on profits",
                   "bond prices slipped"],
         "weather": ["rain fell all day", "a storm hit the coast", "the sun shone and it was warm",
                     "snow covered the hills"]}


class StandIn(nn.Module):
    """A text model by the contract: embeddings, one masked self-attention layer, the mean over tokens, a head."""

    modality, name = "text", "stand_in"

    def __init__(self, vocab_size: int, num_classes: int, pad_id: int, width: int = 16):
        super().__init__()
        self.num_classes = num_classes
        self.embed = nn.Embedding(vocab_size, width, padding_idx=pad_id)
        self.position = nn.Embedding(MAX_LENGTH, width)
        self.query, self.head = nn.Linear(width, width), nn.Linear(width, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.bool()  # (B, L)
        x = self.embed(input_ids) + self.position(torch.arange(input_ids.shape[1]))[None]  # (B, L, H)
        scores = self.query(x) @ x.transpose(1, 2) / math.sqrt(x.shape[-1])  # (B, L, L)
        x = scores.masked_fill(~mask[:, None, :], -1e9).softmax(-1) @ x
        weights = mask[..., None].float()
        return self.head((x * weights).sum(1) / weights.sum(1).clamp_min(1))  # (B, C)


def make_tokenizer(direction: str = "right", max_length: int = MAX_LENGTH):
    """A BERT-style WordPiece tokenizer trained on TEXTS, configured as prepare saves it (truncation, padding)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"],
                                        show_progress=False)
    tokenizer.train_from_iterator([t for texts in TEXTS.values() for t in texts], trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                             special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer.enable_truncation(max_length, direction=direction)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    return tokenizer


def random_split(n: int = 150, vocab: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """ids (n, MAX_LENGTH) int32 right-padded with 0, lengths (n,) int32 from 1 to MAX_LENGTH, as prepare stores."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, MAX_LENGTH + 1, n).astype(np.int32)
    ids = np.zeros((n, MAX_LENGTH), np.int32)
    for i, length in enumerate(lengths):
        ids[i, :length] = rng.integers(4, vocab, length)
    return ids, lengths


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, tokenizer, path of its ONNX with the text metadata)."""
    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    model = StandIn(tokenizer.get_vocab_size(), len(CLASSES), pad_id=0).eval()
    meta = {"modality": "text", "classes": json.dumps(CLASSES), "pad_id": "0",
            text_runtime.TOKENIZER_KEY: tokenizer.to_str()}
    path = text_onnx.export_text_onnx(model, tmp_path_factory.mktemp("text") / "m.onnx", max_length=MAX_LENGTH,
                                      pad_id=0, vocab_size=tokenizer.get_vocab_size(), metadata=meta)
    return model, tokenizer, path


def test_graph_takes_int64_ids_and_mask_with_dynamic_batch_and_sequence(exported):
    _, _, path = exported
    graph = onnx.load(path).graph
    inputs = {i.name: i.type.tensor_type for i in graph.input}
    assert list(inputs) == ["input_ids", "attention_mask"] and [o.name for o in graph.output] == ["logits"]
    for tensor_type in inputs.values():
        assert tensor_type.elem_type == onnx.TensorProto.INT64
        assert [d.dim_param for d in tensor_type.shape.dim] == ["batch", "sequence"]
    assert graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_parity_over_length_batches(exported):
    model, _, path = exported
    ids, lengths = random_split()
    found = text_onnx.text_parity(model, path, ids, lengths, atol=1e-4)
    assert found["passed"] and found["n_texts"] == len(ids) and found["parity_max_abs_diff"] <= 1e-4
    assert found["argmax_agreement"] == 1.0
    # the same logits as torch on each text alone, at its own length: batching and padding change nothing
    with torch.no_grad():
        alone = np.stack([model(torch.from_numpy(ids[i:i + 1, :n]).long(), torch.ones(1, n, dtype=torch.long))[0]
                          .numpy() for i, n in enumerate(lengths)])
    onnx_logits = text_onnx.ort_text_logits(ort_session(path), ids, lengths)
    assert np.abs(onnx_logits - alone).max() <= 1e-4


def test_parity_fails_for_a_model_that_is_not_the_exported_one(exported):
    model, _, path = exported
    other = StandIn(model.embed.num_embeddings, len(CLASSES), pad_id=0).eval()  # other random weights
    ids, lengths = random_split()
    assert not text_onnx.text_parity(other, path, ids, lengths, atol=1e-4)["passed"]


def test_length_batches_group_similar_lengths_and_cut_each_to_its_longest():
    lengths = np.array([5, 1, 9, 3, 7, 2, 8])
    ids = np.arange(7 * 10).reshape(7, 10)
    batches = list(text_onnx.length_batches(lengths, batch_size=3))
    assert [list(b) for b in batches] == [[1, 5, 3], [0, 4, 6], [2]]
    feed = text_onnx.batch_feed(ids, lengths, batches[1])
    assert feed["input_ids"].shape == (3, 8) and feed["input_ids"].dtype == np.int64
    assert feed["attention_mask"].tolist() == [[1] * 5 + [0] * 3, [1] * 7 + [0], [1] * 8]


def test_int8_is_dynamic_and_agrees(exported, tmp_path):
    model, _, path = exported
    int8 = text_onnx.quantize_text_int8(path, tmp_path / "m.int8.onnx")
    ops = {node.op_type for node in onnx.load(int8).graph.node}
    assert ops & {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"}, ops
    assert {p.key: p.value for p in onnx.load(int8).metadata_props}["modality"] == "text"  # metadata kept
    ids, lengths = random_split()
    fp32 = text_onnx.ort_text_logits(ort_session(path), ids, lengths)
    q = text_onnx.ort_text_logits(ort_session(int8), ids, lengths)
    assert np.isfinite(q).all() and (q.argmax(1) == fp32.argmax(1)).mean() >= 0.9


def test_latency_lengths_and_timing(exported):
    assert text_onnx.latency_lengths(128) == (16, 64, 128)
    assert text_onnx.latency_lengths(64) == (16, 64) and text_onnx.latency_lengths(8) == (8,)
    _, tokenizer, path = exported
    ms = text_onnx.text_latency_ms(path, length=MAX_LENGTH, batch_size=4, vocab_size=tokenizer.get_vocab_size(),
                                   repeats=3, warmup=1)
    assert 0 < ms < 10_000


# ---------------------------------------------------------------------------------------------------------
# Raw text: the tokenizer as prepare configured it


@pytest.mark.parametrize("direction", ["right", "left"])
def test_encode_is_what_prepare_stores(direction):
    """text_runtime.encode and the prepare stage's kdpipe.data.tokenize.encode give the same tokens per text:
    the same max_length and truncation side (from the tokenizer.json), right-padded."""
    from kdpipe.data.tokenize import encode as prepare_encode

    tokenizer = make_tokenizer(direction, max_length=6)
    texts = ["the cat sat on the mat and the dog barked", "rain", ""]
    feed = text_runtime.encode(tokenizer, texts, pad_id=0)
    ids, lengths, cut = prepare_encode(tokenizer, texts, 6, 0)
    assert feed["attention_mask"].sum(1).tolist() == lengths.tolist() and cut == 1
    for row, n, stored in zip(feed["input_ids"], lengths.tolist(), ids.numpy(), strict=True):
        assert row[:n].tolist() == stored[:n].tolist() and set(row[n:].tolist()) <= {0}
    long_one = tokenizer.encode(texts[0]).ids
    kept = feed["input_ids"][0].tolist()
    assert kept == long_one and len(kept) == 6  # cut to max_length, [CLS] ... [SEP] around the kept end
    words = tokenizer.encode(texts[0], add_special_tokens=False).ids
    assert kept[1:-1] == (words[:4] if direction == "right" else words[-4:])


def test_text_classifier_gives_the_models_probabilities(exported):
    model, tokenizer, path = exported
    texts = ["the cat sat", "stocks fell sharply today after the bank raised rates", "snow"]
    classifier = text_runtime.TextClassifier(path)  # tokenizer from the file's metadata
    assert classifier.classes == CLASSES
    feed = text_runtime.encode(tokenizer, texts, pad_id=0)
    with torch.no_grad():
        expected = torch.softmax(model(*(torch.from_numpy(feed[k]) for k in text_onnx.TEXT_INPUTS)), 1).numpy()
    assert np.abs(classifier.probabilities(texts) - expected).max() < 1e-5


@pytest.mark.parametrize("model_input", [["a cat", "rain"], "a cat", {"text": ["a cat", "rain"]}])
def test_as_texts_accepts_strings_in_the_usual_shapes(model_input):
    import pandas as pd

    assert text_runtime.as_texts(model_input) in (["a cat", "rain"], ["a cat"])
    assert text_runtime.as_texts(pd.DataFrame({"text": ["a", "b"], "id": [1, 2]})) == ["a", "b"]
    assert text_runtime.as_texts(pd.DataFrame({"body": ["a"]})) == ["a"]


@pytest.mark.parametrize(("model_input", "message"), [
    ([1, 2], "expected strings to classify, got int"), ([], "expected strings to classify, got nothing")])
def test_as_texts_refuses_what_is_not_text(model_input, message):
    with pytest.raises(text_runtime.TextModelError, match=message):
        text_runtime.as_texts(model_input)


def test_as_texts_names_the_columns_it_cannot_choose_from():
    import pandas as pd

    with pytest.raises(text_runtime.TextModelError, match=r"expected a column 'text'.*\['a', 'b'\]"):
        text_runtime.as_texts(pd.DataFrame({"a": ["x"], "b": ["y"]}))


# ---------------------------------------------------------------------------------------------------------
# kdpipe predict on texts, without torch

PREDICT = """
import sys
from kdpipe import cli
code = cli.main(sys.argv[1:])
assert "torch" not in sys.modules, "kdpipe predict imported torch"
sys.exit(code)
"""


def kdpipe_predict(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PREDICT, "predict", *args], capture_output=True, text=True,
                          env=subprocess_env(), timeout=120)


def test_predict_classifies_texts_without_torch(exported):
    model, tokenizer, path = exported
    texts = ["the cat sat on the mat", "the market rallied"]
    done = kdpipe_predict("--model", str(path), *texts, "--top", "2")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == json.dumps(texts[0]) and lines[3] == json.dumps(texts[1]) and len(lines) == 6
    probs = text_runtime.TextClassifier(path).probabilities(texts)
    for block, row in ((lines[1:3], probs[0]), (lines[4:6], probs[1])):
        best = np.argsort(-row)[:2]
        assert [line.split()[1] for line in block] == [CLASSES[i] for i in best]
        assert float(block[0].split()[2]) == pytest.approx(row[best[0]], abs=1e-4)


def test_predict_on_a_text_model_without_a_tokenizer_is_one_line(exported, tmp_path):
    _, _, path = exported
    proto = onnx.load(path)
    kept = [p for p in proto.metadata_props if p.key != text_runtime.TOKENIZER_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    onnx.save(proto, tmp_path / "bare.onnx")
    done = kdpipe_predict("--model", str(tmp_path / "bare.onnx"), "a cat")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [f"kdpipe predict: error: {tmp_path / 'bare.onnx'}: carries no "
                                                f"tokenizer; pass its tokenizer.json"]
