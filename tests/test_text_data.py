"""The text path's data (issue 34): prepare on text folders and text files (CSV, TSV, JSONL) with a trained or the
teacher's tokenizer, bad input as one line + exit 2 with nothing written, length-bucketed batches, masks (a text's
logits do not depend on its batch's padding), text checkpoints rebuilt from the file alone, the transformers teacher
offline, the params checks, and an image path that never imports transformers or tokenizers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from text_fixtures import corpus, text_params, tiny_bert, write_textfile, write_textfolder

from kdpipe import config
from kdpipe.params_file import ConfigError
from kdpipe.stages import prepare


def write_params(work: Path, **sections) -> Path:
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(text_params(work, **sections), sort_keys=False))
    return path


def prepare_in(work: Path, **sections) -> dict:
    cfg = config.load(write_params(work, **sections))
    return prepare.prepare(cfg, Path(cfg.paths.prepared) / "dataset.pt")


def textfile_data(work: Path, name: str, **text) -> dict:
    return {"dataset": "textfile", "folder": None,
            "text": {"file": str(work / "data/raw" / name), "vocab_size": 200, "max_length": 32, **text}}


@pytest.fixture(scope="module")
def rows():
    return corpus(20)


# ------------------------------------------------------------------ prepare: forms, tokenizers, what it reports


@pytest.mark.parametrize("name", ["topics.csv", "topics.tsv", "topics.jsonl"])
def test_a_textfile_gives_the_textfolder_splits_and_ids(tmp_path, rows, name):
    """The same texts as a folder or as a file: the same splits, ids and digest (the order of reading is sorted
    by file name in a folder, so the file is written in that order)."""
    write_textfolder(tmp_path / "data/raw/topics", rows)
    folder = prepare_in(tmp_path)
    ordered = [(p.read_text(), p.parent.name) for p in sorted((tmp_path / "data/raw/topics").glob("*/*.txt"))]
    write_textfile(tmp_path / "data/raw" / name, ordered, text_column="body", label_column="topic")
    file = prepare_in(tmp_path, data=textfile_data(tmp_path, name, text_column="body", label_column="topic"))
    assert file["digest"] == folder["digest"] and file["classes"] == ["food", "sport", "tech"]
    for split in ("train", "val", "test"):
        assert torch.equal(file[f"{split}_x"], folder[f"{split}_x"])
        assert file[f"{split}_x"].dtype == torch.int32 and file[f"{split}_lengths"].dtype == torch.int32


@pytest.mark.parametrize("tokenizer", ["wordpiece", "bpe"])
def test_a_trained_tokenizer_gives_the_same_digest_each_run_and_learns_from_train_only(tmp_path, rows, tokenizer):
    write_textfolder(tmp_path / "data/raw/topics", rows)
    data = {"text": {"tokenizer": tokenizer, "vocab_size": 150, "max_length": 32}}
    first, second = prepare_in(tmp_path, data=data), prepare_in(tmp_path, data=data)
    assert first["digest"] == second["digest"] and first["tokenizer_json"] == second["tokenizer_json"]
    assert first["vocab_size"] <= 150 and first["pad_id"] == 0
    lengths, ids = first["train_lengths"], first["train_x"]
    assert bool((ids[torch.arange(ids.shape[1])[None] >= lengths[:, None]] == 0).all())  # right-padded with pad
    assert bool((ids[torch.arange(ids.shape[1])[None] < lengths[:, None]] != 0).all())  # no pad inside a text


def test_truncation_side_and_max_length(tmp_path):
    long = [(" ".join(["goal"] * 5 + ["bread"] * 40), "a")] * 3 + [(" ".join(["code"] * 3), "b")] * 3
    write_textfolder(tmp_path / "data/raw/topics", [(t + f" {i}", y) for i, (t, y) in enumerate(long)])
    right = prepare_in(tmp_path, data={"text": {"vocab_size": 120, "max_length": 8}})
    left = prepare_in(tmp_path, data={"text": {"vocab_size": 120, "max_length": 8, "truncation": "left"}})
    tok = json.loads(right["tokenizer_json"])["model"]["vocab"]
    for prepared, kept in ((right, "goal"), (left, "bread")):
        ids = torch.cat([prepared[f"{s}_x"] for s in ("train", "val", "test")])
        lengths = torch.cat([prepared[f"{s}_lengths"] for s in ("train", "val", "test")])
        assert ids.shape[1] == 8 and int(lengths.max()) == 8
        cut = ids[lengths == 8]
        assert bool((cut[:, 1] == tok[kept]).all())  # after [CLS]: the start (right cut) or the end (left cut)
        assert prepared["found"]["truncated_texts"] == 3


def test_the_teachers_own_tokenizer_gives_its_ids(tmp_path, rows):
    from transformers import AutoTokenizer

    write_textfolder(tmp_path / "data/raw/topics", rows)
    bert = tiny_bert(tmp_path / "data/raw/bert", rows)
    prepared = prepare_in(tmp_path, data={"text": {"tokenizer": str(bert), "max_length": 32}})
    hf = AutoTokenizer.from_pretrained(bert, local_files_only=True)
    texts = {p.read_text() for p in (tmp_path / "data/raw/topics").glob("*/*.txt")}
    ids, lengths = prepared["test_x"], prepared["test_lengths"]
    expected = {tuple(hf(t, truncation=True, max_length=32)["input_ids"]) for t in texts}
    assert {tuple(row[:n].tolist()) for row, n in zip(ids, lengths, strict=True)} <= expected
    assert prepared["pad_id"] == hf.pad_token_id and prepared["vocab_size"] == hf.backend_tokenizer.get_vocab_size()


def test_empty_and_shared_texts_are_reported(tmp_path, rows, capsys):
    extra = [("   ", "food"), ("", "tech")] + [("the same text twice", "sport")] * 12
    write_textfolder(tmp_path / "data/raw/topics", rows + extra)
    found = prepare_in(tmp_path)["found"]
    assert found["empty_texts"] == 2 and found["shared_across_splits"] == 1
    err = capsys.readouterr().err
    assert "dropped 2 empty text(s)" in err and "1 text(s) appear in more than one split" in err


# ------------------------------------------------------------------ bad input: one line, exit 2, nothing written


def bad_cases(root: Path, rows) -> dict:
    """name → (data section, the file to damage, its bytes, what the line must say)."""
    good = "label,text\n" + "".join(f"{y},{t}\n" for t, y in rows)
    return {
        "not utf-8 in a folder": ({}, root / "topics/food/bad.txt", b"caf\xe9 soup", "bad.txt: not UTF-8 at byte 3 (0xe9)"),
        "not utf-8 in a file": (textfile_data(root.parent.parent, "t.csv"), root / "t.csv",
                                good.encode() + b"food,na\xefve\n", f"t.csv: not UTF-8 at byte {len(good) + 7} (0xef)"),
        "missing column": (textfile_data(root.parent.parent, "t.csv"), root / "t.csv",
                           good.replace("label,text", "label,body").encode(), "has no column 'text'"),
        "one text": (textfile_data(root.parent.parent, "t.jsonl"), root / "t.jsonl",
                     "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows + [("x y", "lonely")]).encode(),
                     "label 'lonely' has 1 text(s), need at least 3"),
        "empty file": (textfile_data(root.parent.parent, "t.tsv"), root / "t.tsv", b"", "t.tsv: empty (no rows)"),
    }


@pytest.mark.parametrize("case", ["not utf-8 in a folder", "not utf-8 in a file", "missing column", "one text",
                                  "empty file"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, rows, capsys, case, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = tmp_path / "data/raw"
    write_textfolder(raw / "topics", rows)
    data, path, content, says = bad_cases(raw, rows)[case]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    code = prepare.main(["--params", str(write_params(tmp_path, data=data) if data else write_params(tmp_path))])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and says in err[0], err
    assert err[0].startswith("kdpipe prepare: error: ")
    assert not (tmp_path / "data/prepared").exists() or not any((tmp_path / "data/prepared").iterdir())


def test_a_bad_file_leaves_the_last_prepared_data(tmp_path, rows, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_textfolder(tmp_path / "data/raw/topics", rows)
    assert prepare.main(["--params", str(write_params(tmp_path))]) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "data/prepared").iterdir()}
    (tmp_path / "data/raw/topics/food/bad.txt").write_bytes(b"\xff")
    assert prepare.main(["--params", str(write_params(tmp_path))]) == 2
    assert {p.name: p.read_bytes() for p in (tmp_path / "data/prepared").iterdir()} == before
    assert {"train_ids.npy", "train_lengths.npy", "tokenizer.json", "dataset.pt", "meta.json"} <= set(before)


# ------------------------------------------------------------------ params


@pytest.mark.parametrize(("sections", "says"), [
    ({"student": {"model": "tiny_cnn"}}, "student.model: 'tiny_cnn' reads images"),
    ({"student": {"crop_padding": 2}}, "student.crop_padding: image augmentation"),
    ({"teacher": {"source": "transformers", "model": "some/bert"}}, "data.text.tokenizer: a transformers teacher"),
    ({"data": {"text": {"vocab_sise": 10}}}, "vocab_sise"),
    ({"data": {"dataset": "textfile", "folder": None}}, "data.text.file: required"),
    ({"student": {"text": {"width": 30, "heads": 4}}}, "heads: must divide width"),
    ({"distill": {"method": "fitnet"}}, "hint"),
    ({"distill": {"method": "tinybert"}}, "attn term reads attention maps"),  # the student is a text_cnn
])
def test_text_params_that_cannot_work_fail_in_one_line(tmp_path, sections, says):
    with pytest.raises(ConfigError, match=None) as e:
        config.load(write_params(tmp_path, **sections))
    assert says in str(e.value) and "\n" not in str(e.value)


def test_text_models_refused_for_images(tmp_path):
    params = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    params["student"]["model"] = "text_cnn"
    with pytest.raises(ConfigError, match="student.model: 'text_cnn' reads text models"):
        config.from_dict(params)


# ------------------------------------------------------------------ batches, masks, checkpoints, teachers


def test_length_batches_cover_the_pool_once_with_similar_lengths_and_are_seeded():
    from kdpipe.data.text_batches import length_batches

    lengths = torch.randint(2, 200, (1000,), generator=torch.Generator().manual_seed(0))
    pool = torch.arange(1000)
    draw = lambda seed: list(length_batches(pool, lengths, 10, torch.Generator().manual_seed(seed)))  # noqa: E731
    batches = draw(1)
    assert sorted(torch.cat(batches).tolist()) == list(range(1000))
    assert [b.tolist() for b in batches] == [b.tolist() for b in draw(1)]
    assert [b.tolist() for b in batches] != [b.tolist() for b in draw(2)]
    spread = torch.tensor([float(lengths[b].max() - lengths[b].min()) for b in batches]).mean()
    random_spread = torch.tensor([float(lengths[b].max() - lengths[b].min())
                                  for b in torch.randperm(1000).split(10)]).mean()
    assert spread < random_spread / 5  # a bucket of 500 sorted texts: neighbours of similar length


def text_model(name: str, **shape):
    from kdpipe.config import TextNetParams
    from kdpipe.models.text_nets import build_text_for

    prepared = {"classes": ["a", "b", "c"], "vocab_size": 50, "pad_id": 0, "max_length": 24}
    torch.manual_seed(0)
    return build_text_for(name, TextNetParams(width=16, heads=2, dropout=0.0, **shape), prepared).eval()


@pytest.mark.parametrize("name", ["text_transformer", "text_cnn"])
def test_a_texts_logits_do_not_depend_on_its_batch_padding(name):
    from kdpipe.run.runtime import make_runtime
    from kdpipe.train.inference import predict

    model = text_model(name)
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 25, (40,), generator=gen)
    ids = torch.zeros(40, 24, dtype=torch.int32)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, 50, (int(n),), generator=gen)
    batched = predict(model, ids, make_runtime("cpu", "fp32"), batch_size=7)
    with torch.no_grad():
        alone = torch.cat([model(ids[i : i + 1, : int(n)].long()) for i, n in enumerate(lengths)])
        padded = model(ids.long())  # every text padded to max_length
    assert torch.allclose(batched, alone, atol=1e-5) and torch.allclose(padded, alone, atol=1e-5)
    _, hidden, attentions = model.text_features(ids[:3].long())
    assert len(hidden) == (3 if name == "text_transformer" else 4) and all(h.shape == (3, 24, 16) for h in hidden)
    assert [a.shape for a in attentions] == ([(3, 2, 24, 24)] * 2 if name == "text_transformer" else [])


@pytest.mark.parametrize("name", ["text_transformer", "text_cnn", "transformers"])
def test_a_text_checkpoint_rebuilds_its_model_from_the_file_alone(tmp_path, name):
    from kdpipe.models.checkpoint import build_from_checkpoint, save_checkpoint

    if name == "transformers":
        from transformers import BertConfig, BertForSequenceClassification

        from kdpipe.models.hf_teacher import HFTextTeacher

        torch.manual_seed(0)
        net = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                       num_attention_heads=2, intermediate_size=32, num_labels=3,
                                                       attn_implementation="eager"))
        model = HFTextTeacher(net.eval(), pad_id=0, max_length=24)
    else:
        model = text_model(name)
    save_checkpoint(tmp_path / "m.pt", model, classes=["a", "b", "c"], params={})
    rebuilt, ckpt = build_from_checkpoint(tmp_path / "m.pt")
    ids = torch.tensor([[5, 6, 7, 0], [9, 0, 0, 0]])
    with torch.no_grad():
        assert torch.allclose(rebuilt.eval()(ids), model(ids), atol=1e-6)
    assert ckpt["modality"] == "text" and rebuilt.pad_id == 0 and rebuilt.num_classes == 3


def test_a_missing_transformers_model_is_one_line_saying_how_to_fetch_it(monkeypatch):
    from kdpipe.models.hf_teacher import TransformersError, pretrained

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TransformersError) as e:
        pretrained("kdpipe-no-such-org/no-such-bert", ["a", "b"], 0, 16, finetune=True)
    assert "hf download kdpipe-no-such-org/no-such-bert" in str(e.value) and "\n" not in str(e.value)


def test_a_local_bert_gets_a_new_head_for_the_classes(tmp_path, rows):
    from kdpipe.models.hf_teacher import TransformersError, pretrained

    bert = tiny_bert(tmp_path / "bert", rows)
    with pytest.raises(TransformersError, match="teacher.finetune: .* has no head for these 3 classes"):
        pretrained(str(bert), ["food", "sport", "tech"], 0, 32, finetune=False)
    model = pretrained(str(bert), ["food", "sport", "tech"], 0, 32, finetune=True)
    assert model.num_classes == 3 and model.hidden_width == 32
    assert model.net.config.id2label == {0: "food", 1: "sport", 2: "tech"}


def test_the_image_path_never_imports_transformers_or_tokenizers():
    code = ("import sys\n"
            "from kdpipe import cli, config\n"
            "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "cfg = config.load('params.yaml')\n"
            "import kdpipe.stages.prepare, kdpipe.stages.teacher, kdpipe.stages.scratch, kdpipe.stages.distill\n"
            "import kdpipe.stages.evaluate, kdpipe.stages.export, kdpipe.train.distiller, kdpipe.train.students\n"
            "import kdpipe.models.checkpoint, kdpipe.data.prepared, kdpipe.train.text_distill\n"
            "print(sorted(m for m in ('transformers', 'tokenizers') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).parents[1])
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("teacher_kind", ["bert", "text_transformer"])
def test_distilbert_init_copies_the_embeddings_and_every_other_layer(tmp_path, teacher_kind):
    """A 1-layer student of a 2-layer teacher: its embeddings and first layer give the teacher's embeddings and
    first layer's hidden states exactly (BERT's token-type embedding folded into the positions)."""
    from kdpipe.config import TextNetParams
    from kdpipe.models.text_nets import build_text_for
    from kdpipe.train.text_init import InitError, init_from_teacher

    prepared = {"classes": ["a", "b", "c"], "vocab_size": 50, "pad_id": 0, "max_length": 24}
    torch.manual_seed(0)
    if teacher_kind == "bert":
        from transformers import BertConfig, BertForSequenceClassification

        from kdpipe.models.hf_teacher import HFTextTeacher

        net = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                                       num_attention_heads=2, intermediate_size=32, num_labels=3,
                                                       attn_implementation="eager"))
        teacher = HFTextTeacher(net.eval(), pad_id=0, max_length=24)
    else:
        teacher = build_text_for("text_transformer", TextNetParams(width=16, layers=2, heads=2, ffn=32, dropout=0.0),
                                 prepared).eval()
    shape = {"width": 16, "heads": 2, "ffn": 32, "dropout": 0.0}
    student = build_text_for("text_transformer", TextNetParams(layers=1, **shape), prepared).eval()
    ids = torch.tensor([[2, 7, 9, 11, 3, 0], [2, 5, 3, 0, 0, 0]])
    assert init_from_teacher(student, teacher) == [0]
    with torch.no_grad():
        _, student_hidden, _ = student.text_features(ids)
        _, teacher_hidden, _ = teacher.text_features(ids)
    mask = ids != 0
    for s, t in zip(student_hidden, teacher_hidden[:2], strict=True):
        assert torch.allclose(s[mask], t[mask], atol=1e-5)
    wide = build_text_for("text_transformer", TextNetParams(layers=1, **{**shape, "width": 32}), prepared)
    with pytest.raises(InitError, match="word_embeddings.weight is .* in the teacher"):
        init_from_teacher(wide, teacher)


def test_macs_count_a_text_cnns_conv1d_layers():
    """A Conv1d of k taps over L tokens costs out_channels × L × in_channels × k MACs (by hand, not by the hook)."""
    import torch
    from torch import nn

    from kdpipe.metrics import count_macs

    conv = nn.Conv1d(8, 6, 3, padding=1)
    assert count_macs(conv, (), example=torch.zeros(1, 8, 10)) == 6 * 10 * 8 * 3
    grouped = nn.Conv1d(8, 8, 5, padding=2, groups=4)
    assert count_macs(grouped, (), example=torch.zeros(1, 8, 7)) == 8 * 7 * (8 // 4) * 5
