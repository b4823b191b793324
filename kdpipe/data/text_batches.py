"""Batches of texts by length (issue 34): seeded length-bucketed sampling and padding to the batch's longest
text, so a corpus of short texts does not pay for its longest one. Token ids stay (N, max_length) int32 on the
device; a batch is cut to its own longest length and widened to int64 (what nn.Embedding takes).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

BUCKET_BATCHES = 50  # a bucket holds this many batches of shuffled texts, sorted by length before cutting


def length_batches(pool: torch.Tensor, lengths: torch.Tensor, batch_size: int, gen: torch.Generator
                   ) -> Iterator[torch.Tensor]:
    """Index batches over `pool` (train positions): shuffle, cut into buckets of BUCKET_BATCHES batches, sort each
    bucket by length (stable), cut it into batches, then shuffle the order of all batches, so every batch holds
    texts of similar length while its members and the order stay random. Same generator state, same batches.
    A trailing batch of one is dropped, as for images."""
    order = pool[torch.randperm(len(pool), generator=gen)]
    lengths = lengths.cpu()
    batches = []
    bucket = batch_size * BUCKET_BATCHES
    for start in range(0, len(order), bucket):
        chunk = order[start : start + bucket]
        chunk = chunk[torch.argsort(lengths[chunk], stable=True)]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    for b in torch.randperm(len(batches), generator=gen).tolist():
        if len(batches[b]) > 1 or len(order) == 1:
            yield batches[b]


def trim(ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """A batch's ids (B, max_length) cut to its longest text (B, L) as int64."""
    longest = max(int(lengths.max()), 1) if len(lengths) else 1
    return ids[:, :longest].long()


def by_length(lengths: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Index batches covering every text once, shortest first (inference: the least padding, order restored by
    the caller)."""
    order = torch.argsort(lengths.cpu(), stable=True)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
