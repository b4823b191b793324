"""Contrastive representation distillation (CRD; Tian, Krishnan & Isola 2020, "Contrastive Representation
Distillation", ICLR), following their reference code RepDistiller (crd/criterion.py: CRDLoss, ContrastLoss, Embed;
crd/memory.py: ContrastMemory).

CRD maximises a lower bound on the mutual information between the teacher's and the student's representations:
both are embedded onto the unit sphere, and each embedding must pick its own sample's embedding of the other
network (the positive) out of K negatives drawn from a memory bank, with the NCE loss of `crd_nce_loss`.

The memory banks of `CRDHead` hold one embedding per TRAINING sample, and nothing else: the `rows` passed to the
head are positions in the training split (0..n_data−1), so the validation and test splits never enter a bank.
The head is trained alongside the student (its embeddings are optimised with the student's parameters), and its
state_dict — embeddings, both banks and the normalisation constants Z — is saved and resumed with the student run.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdpipe.distill.feature_losses import embedding
from kdpipe.distill.losses import _fp32

_EPS = 1e-7  # RepDistiller's eps in ContrastLoss


def crd_nce_loss(scores: Tensor, n_data: int) -> Tensor:
    """NCE loss of CRD (Tian et al. 2020; RepDistiller's ContrastLoss). `scores` (B, K+1) are the
    normalised exp-similarities P, column 0 the positive, columns 1..K the negatives; the noise distribution is
    uniform over the n_data training samples, Pn = 1/n_data, and m = K:

        loss = −( Σ_b log(P_pos / (P_pos + m·Pn + ε)) + Σ_b Σ_k log(m·Pn / (P_neg,k + m·Pn + ε)) ) / B,  ε = 1e-7

    i.e. the binary cross-entropy of telling the positive (data) from the negatives (noise), summed over the K+1
    columns and averaged over the batch.
    """
    scores = _fp32(scores)
    if scores.dim() != 2:
        raise ValueError(f"crd scores: must be (B, K+1), got shape {tuple(scores.shape)}")
    batch, m = scores.shape[0], scores.shape[1] - 1
    noise = m / n_data  # m·Pn: the mass the noise distribution puts on the m negatives
    positive, negatives = scores[:, 0], scores[:, 1:]
    log_d1 = torch.log(positive / (positive + noise + _EPS))  # log P(data | positive)
    log_d0 = torch.log(noise / (negatives + noise + _EPS))  # log P(noise | negative)
    return -(log_d1.sum() + log_d0.sum()) / batch


def crd_scores(anchor: Tensor, bank_rows: Tensor, temperature: float) -> Tensor:
    """Unnormalised CRD scores exp(⟨bank_row, anchor⟩ / T): `anchor` (B, D) unit vectors, `bank_rows` (B, K+1, D)
    the memory rows each anchor is compared with → (B, K+1). RepDistiller's ContrastMemory before dividing by Z."""
    anchor, bank_rows = _fp32(anchor), _fp32(bank_rows)
    return torch.exp(torch.bmm(bank_rows, anchor.unsqueeze(2)).squeeze(2) / temperature)


class Embed(nn.Module):
    """RepDistiller's Embed: a linear map to `feat_dim`, then L2 normalisation onto the unit sphere."""

    def __init__(self, dim_in: int, feat_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, feat_dim)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


def _init_bank(n_data: int, feat_dim: int, generator: torch.Generator) -> Tensor:
    """RepDistiller's memory init: uniform in [−stdv, stdv], stdv = 1/sqrt(feat_dim/3) (unit-variance rows)."""
    stdv = 1.0 / math.sqrt(feat_dim / 3)
    return torch.rand(n_data, feat_dim, generator=generator) * (2 * stdv) - stdv


class CRDHead(nn.Module):
    """The CRD criterion with its trainable embeddings and memory banks (RepDistiller's CRDLoss + ContrastMemory).

    student_dim / teacher_dim are the channel counts of the feature maps passed to `forward`; n_data the size of
    the training split. `negatives` (K) is clamped to n_data − 1 for tiny training sets. Banks and Z are buffers:
    saved in the state_dict, never optimised.
    """

    def __init__(self, student_dim: int, teacher_dim: int, n_data: int, feat_dim: int = 128,
                 negatives: int = 4096, temperature: float = 0.07, momentum: float = 0.5, seed: int = 0) -> None:
        super().__init__()
        if n_data < 2:
            raise ValueError(f"crd: n_data must be ≥ 2 (one positive plus negatives), got {n_data}")
        if negatives < 1:
            raise ValueError(f"crd: negatives must be ≥ 1, got {negatives}")
        if not 0 < temperature < math.inf:
            raise ValueError(f"crd: temperature must be > 0, got {temperature}")
        if not 0 <= momentum <= 1:
            raise ValueError(f"crd: momentum must be in [0, 1], got {momentum}")
        self.n_data = n_data
        self.negatives = min(negatives, n_data - 1)
        self.temperature = temperature
        self.momentum = momentum
        self.embed_s = Embed(student_dim, feat_dim)
        self.embed_t = Embed(teacher_dim, feat_dim)
        generator = torch.Generator().manual_seed(seed)  # its own generator: the global RNG stream is left alone
        self.register_buffer("memory_s", _init_bank(n_data, feat_dim, generator))
        self.register_buffer("memory_t", _init_bank(n_data, feat_dim, generator))
        # Z < 0 means "not set yet"; the first batch sets it and it stays fixed (RepDistiller's params[2:4]).
        self.register_buffer("z_s", torch.tensor(-1.0))
        self.register_buffer("z_t", torch.tensor(-1.0))

    def _check_rows(self, rows: Tensor, batch: int) -> None:
        if rows.shape != (batch,):
            raise ValueError(f"crd: rows must have shape ({batch},), got {tuple(rows.shape)}")
        bad = rows[(rows < 0) | (rows >= self.n_data)]
        if bad.numel():
            raise ValueError(f"crd: row {bad[0].item()} is out of range [0, n_data={self.n_data}); rows must be "
                             "positions in the training split")

    def _sample_indices(self, rows: Tensor, generator: torch.Generator | None) -> Tensor:
        """(B, K+1) bank indices: column 0 the positive (the sample's own row), then K uniform negatives.
        Like RepDistiller's ContrastMemory when given no contrast_idx (AliasMethod over uniform weights), the
        positive is not excluded from the negatives: each negative hits it with probability 1/n_data. (Its CIFAR
        script instead passes negatives drawn from other classes' samples, the dataset's mode='exact'.)"""
        negatives = torch.randint(0, self.n_data, (len(rows), self.negatives), generator=generator,
                                  device=rows.device)
        return torch.cat([rows.unsqueeze(1), negatives], dim=1)

    def _normalise(self, z: Tensor, out: Tensor) -> Tensor:
        """Divide by Z, setting Z = mean(out)·n_data on the first batch (a Monte-Carlo estimate of the partition
        function, then fixed). torch.where instead of `if z < 0` keeps the step free of a host sync."""
        with torch.no_grad():
            value = torch.where(z < 0, out.detach().mean() * self.n_data, z)
            z.copy_(value)
        return out / value  # not the buffer itself: a later step's copy_ must not touch this step's graph

    @torch.no_grad()
    def _update_bank(self, bank: Tensor, rows: Tensor, v: Tensor) -> None:
        """RepDistiller's momentum update of the rows seen in this batch, renormalised onto the sphere. A row
        repeated in the batch gets one of its updates (training batches hold distinct positions)."""
        mixed = self.momentum * bank[rows] + (1 - self.momentum) * v.detach()
        bank.index_copy_(0, rows, F.normalize(mixed, dim=1))

    def forward(self, student_feature: Tensor, teacher_feature: Tensor, rows: Tensor,
                generator: torch.Generator | None = None) -> Tensor:
        """CRD loss (scalar) of a batch: features (B, C, H, W) maps (average-pooled) or (B, C) vectors, `rows`
        (B,) the samples' positions in the training split, `generator` (on the rows' device) for the negatives.
        Updates both banks at `rows` after reading them."""
        rows = rows.long()
        self._check_rows(rows, student_feature.shape[0])
        dtype = self.memory_s.dtype  # fp32, or fp64 after .double() (exactness tests)
        # The exp(·/0.07) scores are too sharp for bf16/fp16: the whole head runs in full precision.
        with torch.autocast(student_feature.device.type, enabled=False):
            f_s = embedding(student_feature).to(dtype)
            f_t = embedding(teacher_feature).detach().to(dtype)  # no gradient into the teacher
            v_s, v_t = self.embed_s(f_s), self.embed_t(f_t)  # both embeddings are trained, as in RepDistiller
            idx = self._sample_indices(rows, generator)
            # Read the banks before this step's update (RepDistiller's order). Banks are buffers: no gradient.
            out_t = crd_scores(v_t, self.memory_s[idx], self.temperature)  # teacher vs the student bank
            out_s = crd_scores(v_s, self.memory_t[idx], self.temperature)  # student vs the teacher bank
            out_s, out_t = self._normalise(self.z_s, out_s), self._normalise(self.z_t, out_t)
            loss = crd_nce_loss(out_s, self.n_data) + crd_nce_loss(out_t, self.n_data)
            self._update_bank(self.memory_s, rows, v_s)
            self._update_bank(self.memory_t, rows, v_t)
        return loss
