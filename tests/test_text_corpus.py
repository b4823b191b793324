"""The text benchmark's corpus converter (bench/text_corpus.py): WordNet data.noun lines → JSONL of glosses
labelled with their lexicographer file, the synset's own lemmas removed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import text_corpus  # noqa: E402

HEADER = "  1 This software and database is being provided to you, the LICENSEE, by Princeton University\n"


def line(offset: str, lexnum: int, lemmas: list[str], gloss: str) -> str:
    """One data.noun line as wndb(5WN) lays it out (w_cnt in hex, a pointer, the gloss after |)."""
    words = " ".join(f"{lemma} 0" for lemma in lemmas)
    return f"{offset} {lexnum:02d} n {len(lemmas):02x} {words} 001 @ 00001740 n 0000 | {gloss}  \n"


@pytest.fixture
def data_noun(tmp_path):
    rows = [line("00000001", 5, ["cat", "true_cat"], 'feline mammal; "cats purr and a true cat hunts"'),
            line("00000002", 5, ["sea_horse", "horse(a)"], "small fish with a horse-like head; not a horse"),
            line("00000003", 6, ["hammer"], "a hand tool with a heavy head; \"he used a Hammer\""),
            line("00000004", 6, ["mallet"], "a hammer with a large wooden head"),
            line("00000005", 18, ["smith"], "a worker in metal"),
            line("00000006", 5, ["dog"], "dog"),  # nothing left once stripped: dropped
            line("00000007", 6, ["anvil"], "a heavy block"), line("00000008", 6, ["slab"], "a heavy block"),
            line("00000010", 6, ["forge"], "a furnace")]
    # eleven lemmas: w_cnt "0b" in hex
    rows.append(line("00000009", 6, [f"tool{i}" for i in range(11)], "an implement; tool3 and tool10s"))
    path = tmp_path / "data.noun"
    path.write_text(HEADER + "".join(rows), encoding="utf-8")
    return path


def test_lines_are_parsed_as_wndb_says(data_noun):
    found = list(text_corpus.synsets(data_noun))
    assert found[0] == ("00000001", "noun.animal", ["cat", "true_cat"], 'feline mammal; "cats purr and a true cat hunts"')
    assert found[-1][2] == [f"tool{i}" for i in range(11)] and found[-1][1] == "noun.artifact"
    assert [f[1] for f in found[:5]] == ["noun.animal", "noun.animal", "noun.artifact", "noun.artifact", "noun.person"]


@pytest.mark.parametrize(("gloss", "lemmas", "expected"), [
    ('feline mammal; "cats purr and a true cat hunts"', ["cat", "true_cat"], 'feline mammal; "purr and a hunts"'),
    ("small fish with a horse-like head; not a horse", ["sea_horse", "horse(a)"],
     "small fish with a horse-like head; not a"),  # "horse-like" is another word
    ('a hand tool; "he used a Hammer"', ["hammer"], 'a hand tool; "he used a"'),
    ("glasses and a glass", ["glass"], "and a"),  # plural +es
    ("a catalogue of cats", ["cat"], "a catalogue of"),  # only whole words
])
def test_the_synsets_own_lemmas_leave_the_gloss(gloss, lemmas, expected):
    assert text_corpus.strip_lemmas(gloss, lemmas) == expected


def test_corpus_keeps_the_most_frequent_classes_drops_empty_and_shared_glosses(data_noun):
    records = text_corpus.corpus(data_noun, classes=2)
    assert {r["label"] for r in records} == {"noun.animal", "noun.artifact"}  # noun.person (1 synset) left out
    texts = {r["synset"]: r["text"] for r in records}
    assert "00000006" not in texts  # "dog" minus "dog" is empty
    assert "00000007" not in texts and "00000008" not in texts  # the same gloss for two synsets
    assert texts["00000009"] == "an implement; and"
    assert all("cat" not in t.split() for t in texts.values())


def test_per_class_sampling_is_seeded(data_noun):
    a = text_corpus.corpus(data_noun, classes=2, per_class=1, seed=3)
    assert len(a) == 2 and {r["label"] for r in a} == {"noun.animal", "noun.artifact"}
    assert a == text_corpus.corpus(data_noun, classes=2, per_class=1, seed=3)
    draws = {tuple(r["synset"] for r in text_corpus.corpus(data_noun, classes=2, per_class=1, seed=s))
             for s in range(8)}
    assert len(draws) > 1


def test_main_writes_jsonl_for_textfile(data_noun, tmp_path, capsys):
    out = tmp_path / "raw" / "wordnet.jsonl"
    assert text_corpus.main([str(out), "--data-noun", str(data_noun), "--classes", "3"]) == 0
    records = [json.loads(row) for row in out.read_text(encoding="utf-8").splitlines()]
    assert {r["label"] for r in records} == {"noun.animal", "noun.artifact", "noun.person"}
    assert set(records[0]) == {"text", "label", "synset"}
    assert "3 classes" in capsys.readouterr().err


def test_a_missing_database_is_one_line_with_the_install_command(tmp_path, capsys):
    assert text_corpus.main([str(tmp_path / "o.jsonl"), "--data-noun", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "apt-get install -y wordnet-base" in err[0]
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.skipif(not text_corpus.DATA_NOUN.is_file(), reason="Debian's wordnet-base is not installed")
def test_the_real_database_gives_ten_supersenses():
    records = text_corpus.corpus(classes=10, per_class=50, seed=0)
    labels = {r["label"] for r in records}
    assert len(labels) == 10 and len(records) == 500 and {"noun.animal", "noun.artifact", "noun.person"} <= labels
