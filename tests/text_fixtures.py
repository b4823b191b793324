"""Text-path helpers shared by tests/test_text_*.py (issue 34): a generated labelled corpus (as a text folder or a
text file), a tiny BERT teacher made and saved locally (no hub), and tiny text params in a temp workspace.

The corpus: three topics, each text a few topic words among shared filler words, lengths 3-30 words, so a model
learns it in an epoch or two and batches by length matter (the lengths vary tenfold)."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TOPICS = {
    "sport": "goal match team score referee league coach striker season stadium",
    "food": "bread cheese soup recipe oven spice noodle salad baker butter",
    "tech": "laptop code server chip network router kernel python cloud battery",
}
FILLER = "the a of and to in is it that was for on with as at by this from".split()


def corpus(n_per_class: int = 60, seed: int = 0) -> list[tuple[str, str]]:
    """(text, label) rows, shuffled; every text distinct."""
    rng = random.Random(seed)
    rows, seen = [], set()
    for label, words in TOPICS.items():
        topic = words.split()
        while sum(r[1] == label for r in rows) < n_per_class:
            n = rng.randint(3, 30)
            text = " ".join(rng.choice(topic) if rng.random() < 0.4 else rng.choice(FILLER) for _ in range(n))
            if text not in seen:
                seen.add(text)
                rows.append((text, label))
    rng.shuffle(rows)
    return rows


def write_textfolder(root: Path, rows: list[tuple[str, str]]) -> Path:
    for i, (text, label) in enumerate(rows):
        (root / label).mkdir(parents=True, exist_ok=True)
        (root / label / f"{i:04d}.txt").write_text(text, encoding="utf-8")
    return root


def write_textfile(path: Path, rows: list[tuple[str, str]], text_column: str = "text",
                   label_column: str = "label") -> Path:
    """A .csv, .tsv or .jsonl by `path`'s suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({text_column: t, label_column: y}) + "\n" for t, y in rows), encoding="utf-8")
        return path
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t" if path.suffix == ".tsv" else ",")
        writer.writerow([label_column, text_column])
        writer.writerows([(y, t) for t, y in rows])
    return path


def tiny_bert(folder: Path, rows: list[tuple[str, str]], hidden: int = 32, layers: int = 2) -> Path:
    """A BertForSequenceClassification (hidden 32, 2 layers, 2 heads) with a WordPiece tokenizer trained here on
    `rows`, saved with save_pretrained: what a user's fine-tunable local model folder holds. The vocabulary comes
    from kdpipe's own trainer (deterministic): tokenizers' WordPieceTrainer gives another one each run, so the
    teacher, and whether a 2-epoch student learned anything, changed from run to run."""
    from types import SimpleNamespace

    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from kdpipe.data import tokenize

    tok = tokenize.train(SimpleNamespace(lowercase=True, vocab_size=300, tokenizer="wordpiece"), [t for t, _ in rows])
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]")
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=64,
                        pad_token_id=0)
    import torch

    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def text_params(work: Path, **sections) -> dict:
    """The repo's params.yaml for a text corpus in `work`: tiny text models, 2 epochs, no augmentation, every path
    (and the sqlite store) inside `work`. `sections`: {section: {key: value}} merged over it."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(dataset="textfolder", folder=str(work / "data/raw/topics"),
                          text={"vocab_size": 200, "max_length": 32})
    net = {"width": 32, "layers": 2, "heads": 2, "dropout": 0.0}
    recipe = dict(epochs=2, batch_size=16, patience=0, crop_padding=0, flip=False, optimizer="adamw", lr=3e-3,
                  weight_decay=0.0, warmup_epochs=0)
    params["teacher"].update(model="text_transformer", text=net, **recipe)
    params["student"].update(model="text_cnn", text={"width": 16}, seeds=[0, 1], **recipe)
    params["export"].update(latency_repeats=3, calibration_images=16)
    params["tracking"].update(system_metrics=False)
    params["paths"] = {k: str(work / v) for k, v in params["paths"].items()}
    params["tracking"]["uri"] = f"sqlite:///{work / 'mlflow.db'}"
    for section, values in sections.items():
        if isinstance(params.get(section), dict) and isinstance(values, dict):
            params[section].update(values)
        else:
            params[section] = values
    return params
