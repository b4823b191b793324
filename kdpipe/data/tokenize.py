"""The text path's tokenizer (issue 34): trained on the train split with the Hugging Face `tokenizers` library
(WordPiece or BPE, data.text.vocab_size), or a transformers model's own (data.text.tokenizer: its dir or hub id,
read from the local cache only: a stage never downloads). Either way it is saved as one tokenizer.json with
truncation (data.text.max_length, data.text.truncation) and padding to the batch's longest text configured in it,
so whoever serves the model tokenizes raw text exactly as prepare did.

Imports `tokenizers` (and `transformers` for a model's tokenizer) inside functions: the image path never loads them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kdpipe.data.splits import DataError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # a trained tokenizer's, [PAD] first: id 0


def tokenizer_for(params, train_texts: list[str]):
    """(tokenizers.Tokenizer configured for encoding, pad id): trained on `train_texts`, or the model's own."""
    tokenizer, pad_token = (train(params, train_texts), "[PAD]") if params.trained else pretrained(params.tokenizer)
    pad_id = tokenizer.token_to_id(pad_token)
    tokenizer.enable_truncation(params.max_length, direction=params.truncation)
    tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token)  # to the longest text of each encoded batch
    return tokenizer, pad_id


def train(params, texts: list[str]):
    """A BERT-style tokenizer (BERT's normaliser and pre-tokenizer, [CLS] text [SEP]) with a WordPiece or BPE
    vocabulary of at most data.text.vocab_size entries, learned from `texts` alone (the train split)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.normalizer = normalizers.BertNormalizer(lowercase=params.lowercase, strip_accents=params.lowercase)
    bpe.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    bpe.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=params.vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False), length=len(texts))
    if params.tokenizer == "wordpiece":
        tokenizer = Tokenizer(models.WordPiece(wordpiece_vocab(bpe, texts, params.vocab_size), unk_token="[UNK]"))
        tokenizer.normalizer, tokenizer.pre_tokenizer = bpe.normalizer, bpe.pre_tokenizer
        tokenizer.decoder = decoders.WordPiece()
    else:
        tokenizer, tokenizer.decoder = bpe, decoders.BPEDecoder()
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[
        ("[CLS]", cls), ("[SEP]", sep)])
    return tokenizer


def wordpiece_vocab(bpe, texts: list[str], vocab_size: int) -> dict[str, int]:
    """A WordPiece vocabulary from a trained BPE: every piece the BPE cuts the train words into, "##"-marked
    where it continues a word, most frequent first (ties by the piece), after the special tokens and every
    character in both forms (so no word becomes [UNK] whole). Not tokenizers' WordPieceTrainer: with its "##"
    prefix it breaks ties between equally frequent merges in hash order, another vocabulary each run (0.23.3),
    which would change the ids and the digest of the same data."""
    from collections import Counter

    pieces, chars = Counter(), set()
    for text in texts:
        for word, _ in bpe.pre_tokenizer.pre_tokenize_str(bpe.normalizer.normalize_str(text)):
            chars.update(word)
            for i, token in enumerate(bpe.model.tokenize(word)):
                pieces[token.value if i == 0 else "##" + token.value] += 1
    base = list(SPECIAL_TOKENS) + [c for ch in sorted(chars) for c in (ch, "##" + ch)]
    ranked = [p for p, _ in sorted(pieces.items(), key=lambda kv: (-kv[1], kv[0])) if p not in set(base)]
    vocab = list(dict.fromkeys(base))[: max(vocab_size, len(SPECIAL_TOKENS))]
    vocab += ranked[: max(vocab_size - len(vocab), 0)]
    return {token: i for i, token in enumerate(vocab)}


def pretrained(location: str):
    """(the fast tokenizer of a transformers model, its pad token), from a local dir or the local hub cache."""
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(location, local_files_only=True)
    except (OSError, ValueError) as e:
        where = "is not a folder with its files" if Path(location).is_dir() else "is neither a local folder nor in " \
            "the Hugging Face cache"
        raise DataError(f"data.text.tokenizer: {location!r} {where} ({str(e).splitlines()[0][:120]}); fetch it once "
                        f"where there is network: hf download {location} (HF_HOME moves the cache), or point it at "
                        f"a local folder") from None
    if not getattr(hf, "is_fast", False):
        raise DataError(f"data.text.tokenizer: {location!r} has no fast (tokenizer.json) tokenizer; convert it with "
                        f"transformers first (AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained(dir))")
    if hf.pad_token is None:
        raise DataError(f"data.text.tokenizer: {location!r} has no pad token; add one (tokenizer.add_special_tokens("
                        f"{{'pad_token': '[PAD]'}}) and resize the model's embeddings) and save it again")
    from tokenizers import Tokenizer

    return Tokenizer.from_str(hf.backend_tokenizer.to_str()), hf.pad_token


def encode(tokenizer, texts: list[str], max_length: int, pad_id: int, chunk: int = 4096
           ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(ids (N, max_length) int32 right-padded with pad_id, lengths (N,) int32, how many texts were cut)."""
    ids = np.full((len(texts), max_length), pad_id, dtype=np.int32)
    lengths = np.zeros(len(texts), dtype=np.int32)
    cut = 0
    for start in range(0, len(texts), chunk):
        for i, enc in enumerate(tokenizer.encode_batch(texts[start : start + chunk]), start):
            n = sum(enc.attention_mask)
            ids[i, :n] = enc.ids[:n]
            lengths[i] = n
            cut += bool(enc.overflowing)
    return torch.from_numpy(ids), torch.from_numpy(lengths), cut
