"""The text benchmark's corpus: WordNet 3.0 noun glosses labelled with their lexicographer file (supersense).

Source: Debian's `wordnet-base` package (`apt-get install -y wordnet-base`), /usr/share/wordnet/data.noun; nothing
is downloaded. Licence (from /usr/share/doc/wordnet-base/copyright, "License: WordNet3.0"): "Permission to use,
copy, modify and distribute this software and database and its documentation for any purpose and without fee or
royalty is hereby granted, provided that you agree to comply with the following copyright notice and statements,
including the disclaimer, and that the same appear on ALL copies of the software, database and documentation,
including modifications that you make for internal use or for distribution. WordNet 3.0 Copyright 2006 by
Princeton University. All rights reserved." (The disclaimer follows it there: provided "AS IS", no warranties.)

The task: from a noun synset's gloss (its definition and example sentences), tell its lexicographer file, e.g.
noun.animal, noun.artifact, noun.person. The synset's own lemmas (and their plural forms) are removed from the
gloss, so the text is a description to read, not a lookup of the word. Only the `classes` most frequent files are
kept; `per_class` takes a seeded sample of each, so a run fits a CPU budget. One JSON line per synset:
{"text": ..., "label": "noun.animal", "synset": "02084071"} for `data.dataset: textfile` (data.text.file).

    python bench/text_corpus.py data/raw/wordnet.jsonl --classes 10 --per-class 500 --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

DATA_NOUN = Path("/usr/share/wordnet/data.noun")
# lexnames(5WN): the noun lexicographer files by number (data.noun's lex_filenum field)
LEXNAMES = {3: "noun.Tops", 4: "noun.act", 5: "noun.animal", 6: "noun.artifact", 7: "noun.attribute",
            8: "noun.body", 9: "noun.cognition", 10: "noun.communication", 11: "noun.event", 12: "noun.feeling",
            13: "noun.food", 14: "noun.group", 15: "noun.location", 16: "noun.motive", 17: "noun.object",
            18: "noun.person", 19: "noun.phenomenon", 20: "noun.plant", 21: "noun.possession", 22: "noun.process",
            23: "noun.quantity", 24: "noun.relation", 25: "noun.shape", 26: "noun.state", 27: "noun.substance",
            28: "noun.time"}
MISSING = "not found: install Debian's WordNet 3.0 database first: apt-get install -y wordnet-base"


def synsets(path: Path = DATA_NOUN) -> Iterator[tuple[str, str, list[str], str]]:
    """(offset, lexicographer file, lemmas, gloss) of each synset line of a WordNet data.noun file (wndb(5WN):
    offset lex_filenum ss_type w_cnt(hex) word lex_id ... p_cnt pointers... | gloss); the licence header's lines
    start with two spaces and are skipped."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("  ") or "|" not in line:
                continue
            fields, gloss = line.split("|", 1)
            parts = fields.split()
            n_words = int(parts[3], 16)
            lemmas = [parts[4 + 2 * i] for i in range(n_words)]
            yield parts[0], LEXNAMES[int(parts[1])], lemmas, gloss.strip()


def strip_lemmas(gloss: str, lemmas: list[str]) -> str:
    """The gloss without the synset's own lemmas: each lemma as a phrase (underscores as spaces, any adjective
    marker such as "(a)" dropped) and its plural (+s, +es), case-insensitive, on word boundaries; spaces tidied."""
    phrases = {re.sub(r"\(\w+\)$", "", lemma).replace("_", " ").lower() for lemma in lemmas}
    lowered = gloss.lower()
    for phrase in sorted(phrases, key=len, reverse=True):  # longest first: "sea horse" before "horse"
        if phrase not in lowered:  # most glosses never name their synset: no regex to build
            continue
        gloss = re.sub(rf"(?<![\w-]){re.escape(phrase)}(?:e?s)?(?![\w-])", " ", gloss, flags=re.IGNORECASE)
    gloss = re.sub(r'(^|\s)"\s+', r'\1"', gloss)  # an opening quote before a removed word
    gloss = re.sub(r'\s+"(?=$|[\s;,.)])', '"', gloss)  # a closing one after it
    gloss = re.sub(r"\s+([;,.)])", r"\1", gloss)
    return re.sub(r"\s+", " ", gloss).strip()


def corpus(path: Path = DATA_NOUN, classes: int = 10, per_class: int | None = None, seed: int = 0) -> list[dict]:
    """The records of the `classes` most frequent lexicographer files (ties: by name), each file's synsets
    sampled down to `per_class` (seeded), in a seeded shuffled order. A gloss that more than one synset has is
    dropped (it says neither), and so is one that stripping its lemmas leaves empty."""
    found = list(synsets(path))
    glosses = Counter(gloss for _, _, _, gloss in found)
    counts = Counter(label for _, label, _, gloss in found if glosses[gloss] == 1)
    kept = sorted(counts, key=lambda label: (-counts[label], label))[:classes]
    rng = random.Random(seed)
    out = []
    for label in kept:
        members = [{"text": strip_lemmas(gloss, lemmas), "label": label, "synset": offset}
                   for offset, name, lemmas, gloss in found if name == label and glosses[gloss] == 1]
        members = [r for r in members if r["text"]]
        out += rng.sample(members, per_class) if per_class and per_class < len(members) else members
    rng.shuffle(out)
    return out


def write_jsonl(records: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the JSONL file to write (e.g. data/raw/wordnet.jsonl)")
    parser.add_argument("--data-noun", type=Path, default=DATA_NOUN)
    parser.add_argument("--classes", type=int, default=10, help="keep the N most frequent lexicographer files")
    parser.add_argument("--per-class", type=int, default=None, help="sample at most this many synsets of each")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.data_noun.is_file():
        print(f"text_corpus: {args.data_noun}: {MISSING}", file=sys.stderr)
        return 2
    records = corpus(args.data_noun, args.classes, args.per_class, args.seed)
    write_jsonl(records, args.out)
    counts = Counter(r["label"] for r in records)
    print(f"text_corpus: {len(records)} glosses in {len(counts)} classes -> {args.out} "
          f"({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
