"""Feature-based distillation losses: pure functions of intermediate feature maps (N, C, H, W) or their pooled
embeddings, each with its formula and paper. The conventions of kdpipe/distill/losses.py hold here too (fp32
arithmetic, batch means)."""

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdpipe.distill.losses import _fp32


def _pool_to_smaller(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Adaptive-average-pool whichever map is spatially larger so both share the smaller (H, W)."""
    size = (min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1]))
    if tuple(a.shape[-2:]) != size:
        a = F.adaptive_avg_pool2d(a, size)
    if tuple(b.shape[-2:]) != size:
        b = F.adaptive_avg_pool2d(b, size)
    return a, b


def make_hint_adapter(student_channels: int, teacher_channels: int) -> nn.Module:
    """FitNets regressor: 1×1 conv + BatchNorm mapping student channels to teacher channels.
    The only trainable piece in this module; it must be optimised together with the student."""
    return nn.Sequential(
        nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False),
        nn.BatchNorm2d(teacher_channels),
    )


def hint_loss(
    student_feature: Tensor, teacher_feature: Tensor, adapter: Callable[[Tensor], Tensor]
) -> Tensor:
    """FitNets hint (Romero et al. 2015, "FitNets: Hints for Thin Deep Nets"):

        Hint = mean over all elements of (r(F_s) − F_t)²,

    with r the adapter (see `make_hint_adapter`). If the spatial sizes still differ after r, the larger map
    is adaptive-average-pooled to the smaller. (The paper writes ½‖·‖²; we use the mean, scale-free in N·C·H·W.)
    """
    projected = _fp32(adapter(_fp32(student_feature)))  # (N, C_t, H_s, W_s)
    projected, target = _pool_to_smaller(projected, _fp32(teacher_feature))
    return F.mse_loss(projected, target)


def _attention_map(feature: Tensor, p: float) -> Tensor:
    """Spatial attention of a feature map: mean over channels of |F|^p, (N, C, H, W) → (N, H, W)."""
    return _fp32(feature).abs().pow(p).mean(dim=1)


def _attention_pair_loss(student_feature: Tensor, teacher_feature: Tensor, p: float) -> Tensor:
    map_s, map_t = _pool_to_smaller(_attention_map(student_feature, p), _attention_map(teacher_feature, p))
    a_s = F.normalize(map_s.flatten(1), dim=1)  # (N, H·W), unit L2 norm per sample
    a_t = F.normalize(map_t.flatten(1), dim=1)
    return (a_s - a_t).pow(2).mean()


def attention_transfer(
    student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor], p: float = 2
) -> Tensor:
    """Attention transfer (Zagoruyko & Komodakis 2017, "Paying More Attention to Attention"):

        a(F) = vec(mean_c |F_c|^p) / ‖vec(mean_c |F_c|^p)‖₂
        AT   = Σ_pairs mean_{i, j} (a_s − a_t)²_{i, j}      (= Σ_pairs mean_i ‖a_s,i − a_t,i‖₂² / (H·W))

    as in the paper's reference code (`at_loss = (at(x) - at(y)).pow(2).mean()`); the paper's β/2 factor
    belongs to the weight. When the two maps of a pair differ in size, the larger attention map is
    average-pooled to the smaller. When the lists differ in length, pairs are zipped from the end, so the
    deepest stages are matched. Normalisation makes the loss invariant to rescaling a feature map.
    """
    pairs = list(zip(reversed(student_feats), reversed(teacher_feats), strict=False))
    if not pairs:
        raise ValueError("at: needs at least one student/teacher feature pair")
    return torch.stack([_attention_pair_loss(s, t, p) for s, t in pairs]).sum()


def embedding(feature: Tensor) -> Tensor:
    """A feature map (N, C, H, W) average-pooled to (N, C); a (N, D) input is returned as it is."""
    return _fp32(feature).mean(dim=(2, 3)) if feature.dim() == 4 else _fp32(feature)


def _pairwise_distances(e: Tensor, eps: float = 1e-12) -> Tensor:
    """(N, N) Euclidean distances between rows, exactly 0 on the diagonal."""
    square = e.pow(2).sum(1)
    d = (square[:, None] + square[None, :] - 2 * e @ e.t()).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


def rkd_loss(student_feature: Tensor, teacher_feature: Tensor, distance_weight: float = 25.0,
             angle_weight: float = 50.0) -> Tensor:
    """Relational KD (Park et al. 2019, "Relational Knowledge Distillation"), on embeddings e = pool(feature):

        ψ_D(i, j) = ‖e_i − e_j‖ / μ,  μ = mean of the non-zero distances in the batch
        ψ_A(i, j, k) = ⟨(e_i − e_j)/‖·‖, (e_k − e_j)/‖·‖⟩
        RKD = 25 · Huber(ψ_D^s, ψ_D^t) + 50 · Huber(ψ_A^s, ψ_A^t)   (Huber = smooth L1, δ = 1; the paper's weights)

    Only relations inside the batch are matched, so student and teacher widths may differ. Zero when the
    student's embeddings are the teacher's up to scale."""
    s, t = embedding(student_feature), embedding(teacher_feature).detach()
    d_t = _pairwise_distances(t)
    d_t = d_t / d_t[d_t > 0].mean()
    d_s = _pairwise_distances(s)
    d_s = d_s / d_s[d_s > 0].mean()
    distance = F.smooth_l1_loss(d_s, d_t)

    def angles(e: Tensor) -> Tensor:
        diff = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)  # (N, N, D): e_j − e_i, unit length
        return torch.bmm(diff, diff.transpose(1, 2)).reshape(-1)  # cosines of every angle at every anchor

    angle = F.smooth_l1_loss(angles(s), angles(t))
    return distance_weight * distance + angle_weight * angle


def pkt_loss(student_feature: Tensor, teacher_feature: Tensor, eps: float = 1e-7) -> Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas 2018, "Learning Deep Representations with Probabilistic
    Knowledge Transfer"), with the cosine kernel of their code:

        K_ij = (cos(e_i, e_j) + 1) / 2;  P_ij = K_ij / Σ_j K_ij  (each of student, teacher)
        PKT = mean_ij P^t_ij · log((P^t_ij + ε) / (P^s_ij + ε))

    The conditional distributions of neighbours in embedding space are matched; widths may differ. Zero when
    the student's embeddings are the teacher's up to scale."""
    def affinities(e: Tensor) -> Tensor:
        e = e / (e.norm(dim=1, keepdim=True) + eps)
        k = (e @ e.t() + 1.0) / 2.0
        return k / k.sum(dim=1, keepdim=True)

    p_s, p_t = affinities(embedding(student_feature)), affinities(embedding(teacher_feature).detach())
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def sp_loss(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """Similarity-preserving KD (Tung & Mori 2019, "Similarity-Preserving Knowledge Distillation"):

        G = normalize_rows(F Fᵀ),  F the (B, C·H·W) flattened feature maps of the batch
        SP = ‖G_t − G_s‖²_F / B²

    Samples that activate the teacher alike must activate the student alike; maps may differ in shape.
    Zero when the student's maps are the teacher's (up to a positive scale)."""
    b = student_feature.shape[0]
    g_s = F.normalize(_fp32(student_feature).reshape(b, -1) @ _fp32(student_feature).reshape(b, -1).t(), dim=1)
    t = _fp32(teacher_feature).detach().reshape(b, -1)
    g_t = F.normalize(t @ t.t(), dim=1)
    return (g_t - g_s).pow(2).sum() / (b * b)
