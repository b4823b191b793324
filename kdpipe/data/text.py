"""Text corpora for prepare (issue 34): `textfolder` (<folder>/<class>/*.txt, one text a file) and `textfile` (a
CSV, TSV or JSON-lines file with a text and a label column), read as checked UTF-8, split with the images' seeded
stratified split, tokenized once (kdpipe.data.tokenize) into right-padded int32 ids plus lengths, and digested.

Bad input is one line naming the file (and byte offset or row): a byte that is not UTF-8, a missing column, an
empty file or folder, a label with too few texts for every split. Empty texts are dropped and reported; texts that
appear in more than one split are reported (they are the user's data: kept). Only the standard library, numpy
and torch are imported here; the tokenizers library is imported by kdpipe.data.tokenize when it runs.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdpipe.data.splits import DataError, class_counts, dataset_digest, stratified_split

TEXT_EXTENSION = ".txt"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class TextCorpus:
    """Texts with their class names and where each came from (a file, or a file and row) for messages."""

    texts: list[str]
    labels: list[str]
    sources: list[str]


def decode_utf8(raw: bytes, where: str | Path) -> str:
    """`raw` as text; DataError naming `where` and the first byte that is not UTF-8 otherwise."""
    try:
        return raw.decode("utf-8-sig")  # a byte-order mark is UTF-8 too, not part of the text
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 at byte {e.start} (0x{raw[e.start]:02x}); save it as UTF-8") from None


def load_textfolder(root: Path) -> TextCorpus:
    """One text per .txt file under root/<class>/ (sorted, so the order never depends on the file system)."""
    if not root.is_dir():
        raise DataError(f"textfolder: {root} is not a folder; set data.folder to data/raw/<name> holding <class>/*.txt")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if len(class_dirs) < 2:
        raise DataError(f"textfolder: {root} has {len(class_dirs)} class folder(s), need at least 2")
    texts, labels, sources = [], [], []
    for class_dir in class_dirs:
        files = sorted(p for p in class_dir.iterdir() if p.is_file() and p.suffix.lower() == TEXT_EXTENSION)
        if not files:
            raise DataError(f"textfolder: class folder {class_dir} has no {TEXT_EXTENSION} files")
        for path in files:
            texts.append(decode_utf8(path.read_bytes(), path))
            labels.append(class_dir.name)
            sources.append(str(path))
    return TextCorpus(texts, labels, sources)


def load_textfile(path: Path, text_column: str, label_column: str) -> TextCorpus:
    """The rows of a .csv / .tsv (a header row names the columns) or .jsonl / .json (one JSON object a line)."""
    if not path.is_file():
        raise DataError(f"textfile: {path} not found; set data.text.file to a .csv, .tsv or .jsonl inside paths.raw")
    body = decode_utf8(path.read_bytes(), path)
    if not body.strip():
        raise DataError(f"{path}: empty (no rows); a textfile needs a {text_column!r} and a {label_column!r} per row")
    rows = _json_rows(body, path) if path.suffix.lower() in (".jsonl", ".json") else _table_rows(body, path)
    if not rows:
        raise DataError(f"{path}: no rows below the header; a textfile needs a row per text")
    texts, labels, sources = [], [], []
    for line, row in rows:
        for column in (text_column, label_column):
            if column not in row:
                key = "text_column" if column == text_column else "label_column"
                raise DataError(f"{path}: line {line} has no column {column!r} (it has {', '.join(map(repr, row)) or 'none'});"
                                f" set data.text.{key}")
        text, label = row[text_column], row[label_column]
        if not isinstance(text, str) or label is None or isinstance(label, dict | list):
            raise DataError(f"{path}: line {line}: {text_column!r} must be a string and {label_column!r} a class name, "
                            f"got {type(text).__name__} and {type(label).__name__}")
        texts.append(text)
        labels.append(str(label))
        sources.append(f"{path}:{line}")
    return TextCorpus(texts, labels, sources)


def _table_rows(body: str, path: Path) -> list[tuple[int, dict]]:
    """(line number, row) of a CSV or TSV with a header row (quoted fields may hold new lines and delimiters)."""
    csv.field_size_limit(1 << 30)  # a long document is one field
    reader = csv.DictReader(io.StringIO(body, newline=""), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    rows = []
    try:
        for row in reader:
            rows.append((reader.line_num, {k: v for k, v in row.items() if k is not None}))
    except csv.Error as e:
        raise DataError(f"{path}: line {reader.line_num}: not a readable CSV row ({e})") from None
    return rows


def _json_rows(body: str, path: Path) -> list[tuple[int, dict]]:
    rows = []
    for number, line in enumerate(body.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {number}: not a JSON object ({e.msg}); one object a line") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {number}: a JSON {type(row).__name__}, not an object; one object a line")
        rows.append((number, row))
    return rows


def drop_empty(corpus: TextCorpus) -> tuple[TextCorpus, list[str]]:
    """The corpus without texts that are empty or only white space, and where those were."""
    keep = [i for i, t in enumerate(corpus.texts) if t.strip()]
    empty = [corpus.sources[i] for i in range(len(corpus.texts)) if not corpus.texts[i].strip()]
    pick = lambda values: [values[i] for i in keep]  # noqa: E731
    return TextCorpus(pick(corpus.texts), pick(corpus.labels), pick(corpus.sources)), empty


def require_enough_texts(labels: list[str], where: str, needed: int) -> None:
    """Every label needs one text per carved split (train, val, test), else it would be missing from one."""
    names, counts = np.unique(np.array(labels, dtype=object), return_counts=True)
    if len(names) < 2:
        raise DataError(f"{where}: {len(names)} label(s) ({', '.join(map(repr, names))}); need at least 2 classes")
    few = [(n, c) for n, c in zip(names, counts, strict=True) if c < needed]
    if few:
        name, count = few[0]
        others = f" (and {len(few) - 1} more labels)" if len(few) > 1 else ""
        raise DataError(f"{where}: label {name!r} has {count} text(s), need at least {needed} (one each for train, val "
                        f"and test){others}; add texts of it or remove it")


def cross_split_duplicates(texts: dict[str, list[str]]) -> list[str]:
    """Texts (stripped) found in more than one split, in train order then val's: scores on val and test count
    texts the model trained on."""
    seen = {split: {t.strip() for t in texts[split]} for split in SPLITS}
    shared = (seen["train"] & (seen["val"] | seen["test"])) | (seen["val"] & seen["test"])
    return sorted(shared)


def prepare_text(corpus: TextCorpus, params, *, where: str, val_fraction: float, test_fraction: float,
                 seed: int) -> dict:
    """The prepared text dataset: seeded stratified splits of the corpus, the tokenizer (trained on the train
    split, or the teacher's), each split's ids (N, max_length) int32 right-padded with pad_id and lengths (N,)
    int32, classes, counts, digest and what was found (empty and shared texts). Nothing is written here."""
    from kdpipe.data import tokenize

    corpus, empty = drop_empty(corpus)
    if not corpus.texts:
        raise DataError(f"{where}: every text is empty")
    require_enough_texts(corpus.labels, where, 3)
    classes = sorted(set(corpus.labels))
    index = {c: i for i, c in enumerate(classes)}  # one lookup a text, not a scan of the classes
    y = torch.tensor([index[label] for label in corpus.labels], dtype=torch.int64)
    splits = stratified_split(y, val_fraction, test_fraction, seed)
    rows = {"train": splits.train_idx, "val": splits.val_idx, "test": splits.test_idx}
    texts = {split: [corpus.texts[i] for i in rows[split].tolist()] for split in SPLITS}
    tokenizer, pad_id = tokenize.tokenizer_for(params, texts["train"])
    prepared: dict = {"modality": "text", "classes": classes, "pad_id": pad_id, "max_length": params.max_length,
                      "vocab_size": tokenizer.get_vocab_size(), "tokenizer_json": tokenizer.to_str()}
    truncated = 0
    for split in SPLITS:
        ids, lengths, cut = tokenize.encode(tokenizer, texts[split], params.max_length, pad_id)
        prepared[f"{split}_x"], prepared[f"{split}_lengths"] = ids, lengths
        prepared[f"{split}_y"] = y[rows[split]]
        truncated += cut
    prepared["class_counts"] = class_counts(prepared, len(classes))
    shared = cross_split_duplicates(texts)
    prepared["found"] = {"empty_texts": len(empty), "empty_examples": empty[:5], "truncated_texts": truncated,
                         "shared_across_splits": len(shared), "shared_examples": [t[:80] for t in shared[:5]]}
    prepared["digest"] = text_digest(prepared)
    report_found(prepared["found"], params.max_length)
    return prepared


def text_digest(prepared: dict) -> str:
    """The images' digest over the id and label arrays and the classes, with the tokenizer's JSON: another
    vocabulary is another dataset even where the ids happen to agree."""
    h = hashlib.sha256(dataset_digest(prepared).encode())
    h.update(prepared["tokenizer_json"].encode())
    return h.hexdigest()


def report_found(found: dict, max_length: int) -> None:
    """One stderr line per thing worth a look; none when the corpus is clean."""
    if found["empty_texts"]:
        print(f"prepare: dropped {found['empty_texts']} empty text(s), e.g. {found['empty_examples'][0]}", file=sys.stderr)
    if found["shared_across_splits"]:
        print(f"prepare: {found['shared_across_splits']} text(s) appear in more than one split (val and test scores "
              f"count them), e.g. {found['shared_examples'][0]!r}", file=sys.stderr)
    if found["truncated_texts"]:
        print(f"prepare: {found['truncated_texts']} text(s) longer than data.text.max_length {max_length} tokens "
              f"were cut (data.text.truncation)", file=sys.stderr)
