"""Distillation losses: pure functions of tensors, each with its formula and paper.

Conventions shared by every function here:
- logits are (N, C), labels are (N,) class indices, features are (N, C, H, W);
- inputs are cast to fp32 before any arithmetic, so callers under bf16/fp16 autocast get an fp32 loss
  (fp64 inputs stay fp64, which lets tests check identities to machine precision);
- every loss is a scalar averaged over the batch;
- KL always runs teacher ‖ student: KL(p_t ‖ p_s) = Σ_c p_t,c (log p_t,c − log p_s,c).

`composite_loss` is the single place where terms are weighted and summed; it returns the parts for logging.
"""

import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_T = TypeVar("_T")

# Name → one line for `kdpipe list losses`. The keys are also the valid keys of a `weights` dict.
LOSSES: dict[str, str] = {
    "ce": "cross-entropy on the labels; optional label smoothing (Szegedy et al. 2016) or focal (Lin et al. 2017)",
    "kd": "T²·KL(teacher ‖ student) of temperature-softened outputs (Hinton et al. 2015)",
    "mse": "mean squared error between student and teacher logits (Ba & Caruana 2014)",
    "hint": "FitNets hint: MSE between adapted student and teacher features (Romero et al. 2015)",
    "at": "attention transfer: distance of normalised spatial attention maps (Zagoruyko & Komodakis 2017)",
    "dkd": "decoupled KD: alpha·TCKD + beta·NCKD (Zhao et al. 2022)",
    "dist": "DIST: inter- and intra-class Pearson relations of softened outputs (Huang et al. 2022)",
    "rkd": "relational KD: pairwise distances (×25) and triplet angles (×50) of embeddings (Park et al. 2019)",
    "pkt": "probabilistic knowledge transfer: KL of cosine-kernel affinities of embeddings (Passalis & Tefas 2018)",
    "sp": "similarity-preserving: batch Gram matrices of the last feature maps (Tung & Mori 2019)",
    "crd": "contrastive: NCE against a memory bank of training-set embeddings (Tian et al. 2020; kdpipe.crd)",
}

# Terms that need intermediate features, which no cache of teacher outputs holds. rkd, pkt and crd use the last
# stage's map average-pooled to an embedding (RepDistiller's choice), sp the map itself.
FEATURE_TERMS = ("hint", "at", "rkd", "pkt", "sp", "crd")


def needs_features(weights: dict[str, float]) -> bool:
    return any(weights.get(term, 0) > 0 for term in FEATURE_TERMS)


PRESETS: dict[str, dict[str, float]] = {
    # Training from scratch: the baseline every distilled student is compared with.
    "ce": {"ce": 1.0},
    # Hinton et al. 2015 with α = 0.9 (and T = 4), the usual CIFAR setting (e.g. RepDistiller's `-r 0.1 -a 0.9`);
    # the paper only says the hard-label term should get "a considerably lower weight".
    "kd": {"ce": 0.1, "kd": 0.9},
    # The seed article's L = MSE + α·KL with α = 0.5 (no label term).
    "seed": {"mse": 1.0, "kd": 0.5},
    # Ba & Caruana 2014 regress the teacher's logits only; labels are not used.
    "mse": {"mse": 1.0},
    # FitNets trains in two stages (hints, then KD); single-stage CE + hint is the common simplification.
    # Single-stage benchmarks (RepDistiller, mdistiller) raise the hint weight to 100 with a mean-reduced MSE.
    "fitnet": {"ce": 1.0, "hint": 1.0},
    # Zagoruyko & Komodakis' reference code adds β/2 · Σ at_loss with β = 1e3 and a mean-reduced at_loss
    # (the paper's "β = 1e3 divided by the number of elements in the attention map and batch size").
    "at": {"ce": 1.0, "at": 500.0},
    # Zhao et al. 2022 CIFAR-100 setting: CE weight 1, α = 1, β = 8 (passed as dkd_alpha / dkd_beta), T = 4.
    "dkd": {"ce": 1.0, "dkd": 1.0},
    # Huang et al. 2022's CIFAR setting: CE + β·inter + γ·intra with β = γ = 2 (the term holds β = γ = 1).
    "dist": {"ce": 1.0, "dist": 2.0},
    # RepDistiller's CIFAR-100 weights (Tian et al. 2020, `-b`): CE 1 plus the relational term.
    "rkd": {"ce": 1.0, "rkd": 1.0},
    "pkt": {"ce": 1.0, "pkt": 30000.0},
    "sp": {"ce": 1.0, "sp": 3000.0},
    # RepDistiller's CRD row (`-r 1 -a 0 -b 0.8`): CE 1 plus 0.8 · the contrastive term, no KD.
    "crd": {"ce": 1.0, "crd": 0.8},
}


def _fp32(x: Tensor) -> Tensor:
    """Upcast half/bf16 to fp32; keep fp64 so exactness tests stay exact."""
    return x if x.dtype == torch.float64 else x.float()


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction: must be 'mean' or 'none', got {reduction!r}")


def _kl_rows(log_p_teacher: Tensor, log_p_student: Tensor) -> Tensor:
    """Per-row KL(teacher ‖ student) = Σ_c p_t (log p_t − log p_s) from log-probabilities, (N, C) → (N,)."""
    return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)


def _pool_to_smaller(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Adaptive-average-pool whichever map is spatially larger so both share the smaller (H, W)."""
    size = (min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1]))
    if tuple(a.shape[-2:]) != size:
        a = F.adaptive_avg_pool2d(a, size)
    if tuple(b.shape[-2:]) != size:
        b = F.adaptive_avg_pool2d(b, size)
    return a, b


def cross_entropy(student_logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """CE = −mean_i Σ_c q_i,c log softmax(z_i)_c, with q the one-hot label smoothed by `label_smoothing`
    (Szegedy et al. 2016, "Rethinking the Inception Architecture": q = (1 − ε)·onehot + ε/C)."""
    return F.cross_entropy(_fp32(student_logits), labels, label_smoothing=label_smoothing)


def focal_loss(student_logits: Tensor, labels: Tensor, gamma: float = 2.0) -> Tensor:
    """Focal loss (Lin et al. 2017, "Focal Loss for Dense Object Detection"): mean_i −(1 − p_t)^γ log p_t,
    where p_t is the probability of the true class. γ down-weights easy samples; γ = 0 is cross-entropy."""
    if gamma < 0:
        raise ValueError(f"focal_gamma: must be ≥ 0, got {gamma}")
    log_p = F.log_softmax(_fp32(student_logits), dim=1)
    log_pt = log_p.gather(1, labels.view(-1, 1)).squeeze(1)  # (N,)
    return (-((1 - log_pt.exp()) ** gamma) * log_pt).mean()


def kd_kl(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float, *, reduction: str = "mean"
) -> Tensor:
    """Soft-target loss of Hinton et al. 2015, "Distilling the Knowledge in a Neural Network":

        KD = T² · KL(p_t^T ‖ p_s^T),   p^T = softmax(z / T),
        KL(p_t ‖ p_s) = Σ_c p_t,c (log p_t,c − log p_s,c), summed over classes, mean over the batch
        ("batchmean"); reduction="none" returns the (N,) per-sample values.

    The KL runs teacher ‖ student: the teacher's distribution is the target the student must cover.
    Why T²: the gradient of the softened KL w.r.t. the student logits scales as 1/T² (for large T it is
    ≈ (z_s − z_t)/(C·T²)), so multiplying by T² keeps gradient magnitudes comparable across temperatures
    and relative to the hard-label term when T is changed.
    """
    log_p_student = F.log_softmax(_fp32(student_logits) / temperature, dim=1)
    log_p_teacher = F.log_softmax(_fp32(teacher_logits) / temperature, dim=1)
    return _reduce(temperature**2 * _kl_rows(log_p_teacher, log_p_student), reduction)


def logit_mse(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Logit regression (Ba & Caruana 2014, "Do Deep Nets Really Need to be Deep?"):
    mean over all N·C elements of (z_s − z_t)²."""
    return F.mse_loss(_fp32(student_logits), _fp32(teacher_logits))


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


def _binary_log_probs(logits: Tensor, gt_mask: Tensor) -> Tensor:
    """log [p_target, 1 − p_target] of softmax(logits), computed stably, (N, C) → (N, 2)."""
    log_p = F.log_softmax(logits, dim=1)
    log_target = log_p.masked_fill(~gt_mask, -math.inf).logsumexp(dim=1)
    log_rest = log_p.masked_fill(gt_mask, -math.inf).logsumexp(dim=1)
    return torch.stack([log_target, log_rest], dim=1)


def dkd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    alpha: float,
    beta: float,
    temperature: float,
    *,
    reduction: str = "mean",
) -> dict[str, Tensor]:
    """Decoupled KD (Zhao et al. 2022, "Decoupled Knowledge Distillation"), official mdistiller formulation.

    With b = [p_y, 1 − p_y] the binary target-vs-rest distribution and p̂ the distribution over the
    non-target classes (softmax with the target logit pushed down by 1000, the "gt mask"), all at temperature T:

        TCKD = T² · KL(b_t ‖ b_s),   NCKD = T² · KL(p̂_t ‖ p̂_s),   loss = alpha·TCKD + beta·NCKD.

    Classical KD decomposes exactly as KD = TCKD + (1 − p_y,t^T)·NCKD, where p_y,t^T is the teacher's softened
    target probability: DKD frees NCKD from that confidence-dependent weight. KL runs teacher ‖ student and T²
    is there for the same reason as in `kd_kl`. Returns {"loss", "tckd", "nckd"}, batch-means (or (N,)
    per-sample values with reduction="none").
    """
    s = _fp32(student_logits) / temperature
    t = _fp32(teacher_logits) / temperature
    gt_mask = F.one_hot(labels, s.shape[1]).bool()  # (N, C), True at the label
    tckd = _kl_rows(_binary_log_probs(t, gt_mask), _binary_log_probs(s, gt_mask))
    push_down = 1000.0 * gt_mask.to(s.dtype)
    nckd = _kl_rows(F.log_softmax(t - push_down, dim=1), F.log_softmax(s - push_down, dim=1))
    tckd, nckd = temperature**2 * tckd, temperature**2 * nckd
    parts = {"loss": alpha * tckd + beta * nckd, "tckd": tckd, "nckd": nckd}
    return {name: _reduce(value, reduction) for name, value in parts.items()}


def _pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Per-row Pearson correlation of two (N, C) tensors: cosine similarity of the row-centred rows, (N,)."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """DIST (Huang et al. 2022, "Knowledge Distillation from A Stronger Teacher"), with β = γ = 1:

        p = softmax(z / τ);  inter = 1 − mean_i ρ(p_s[i, :], p_t[i, :]);  intra = 1 − mean_c ρ(p_s[:, c], p_t[:, c])
        DIST = τ² · (inter + intra),   ρ = Pearson correlation

    Matching relations instead of exact probabilities lets a student follow a much stronger teacher. Zero
    when the student's outputs equal the teacher's (up to a per-row affine map, for inter)."""
    p_s = F.softmax(_fp32(student_logits) / temperature, dim=1)
    p_t = F.softmax(_fp32(teacher_logits) / temperature, dim=1)
    inter = 1 - _pearson_rows(p_s, p_t).mean()
    intra = 1 - _pearson_rows(p_s.t(), p_t.t()).mean()
    return temperature**2 * (inter + intra)


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


def validate_weights(weights: dict[str, float], temperature: float) -> None:
    """Raise ValueError, naming the key, for unknown terms, negative or non-finite weights,
    a non-positive temperature, or weights that are all zero."""
    for key, weight in weights.items():
        if key not in LOSSES:
            raise ValueError(f"unknown loss term {key!r}; known: {', '.join(LOSSES)}")
        if not weight >= 0:  # also catches NaN
            raise ValueError(f"{key}: weight must be ≥ 0, got {weight}")
        if math.isinf(weight):
            raise ValueError(f"{key}: weight must be finite, got {weight}")
    if not 0 < temperature < math.inf:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    if not any(weight > 0 for weight in weights.values()):
        raise ValueError("all loss weights are zero")


def _require(value: _T | None, what: str, term: str) -> _T:
    """Return `value`, or raise naming the loss term that needs it."""
    if value is None:
        raise ValueError(f"{term}: needs {what}")
    return value


def composite_loss(
    student_logits: Tensor,
    labels: Tensor,
    *,
    teacher_logits: Tensor | None = None,
    weights: dict[str, float],
    temperature: float = 4.0,
    focal_gamma: float | None = None,
    label_smoothing: float = 0.0,
    student_feats: Sequence[Tensor] | None = None,
    teacher_feats: Sequence[Tensor] | None = None,
    hint_adapter: Callable[[Tensor], Tensor] | None = None,
    hint_index: int | tuple[int, int] = -1,
    dkd_alpha: float = 1.0,
    dkd_beta: float = 8.0,
    crd: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """The one explicit weighted sum of the terms above:

        L = w_ce·CE + w_kd·T²·KL(p_t^T ‖ p_s^T) + w_mse·MSE + w_hint·Hint + w_at·AT + w_dkd·DKD
            + w_dist·DIST + w_rkd·RKD + w_pkt·PKT + w_sp·SP + w_crd·CRD

    Missing or zero weights are not computed. The seed article's "L = MSE + α·KL" is weights
    {"mse": 1, "kd": α}; Hinton's KD is {"ce": 1 − α, "kd": α}. CE becomes focal loss when `focal_gamma`
    is given (still logged as "ce"). Hint uses feature pair `hint_index` (an int indexes both lists, a pair
    (i_student, i_teacher) each); AT uses all pairs zipped from the deepest stage; DIST the logits; RKD, PKT,
    SP and CRD the deepest stage of each network. `crd(student_map, teacher_map)` is the batch's CRD head
    (kdpipe.crd.CRDHead bound to the batch's train positions): it holds the memory banks, so it is state, not
    a pure function.

    Returns {"loss": L, <term>: unweighted value for each active term}, all fp32 scalars.
    """
    validate_weights(weights, temperature)
    if focal_gamma is not None and label_smoothing > 0:
        raise ValueError("label_smoothing: not supported together with focal_gamma")
    active = [name for name in LOSSES if weights.get(name, 0.0) > 0]
    parts: dict[str, Tensor] = {}
    if "ce" in active:
        parts["ce"] = (
            cross_entropy(student_logits, labels, label_smoothing)
            if focal_gamma is None
            else focal_loss(student_logits, labels, focal_gamma)
        )
    if "kd" in active:
        parts["kd"] = kd_kl(student_logits, _require(teacher_logits, "teacher_logits", "kd"), temperature)
    if "mse" in active:
        parts["mse"] = logit_mse(student_logits, _require(teacher_logits, "teacher_logits", "mse"))
    if "hint" in active:
        i_s, i_t = (hint_index, hint_index) if isinstance(hint_index, int) else hint_index
        parts["hint"] = hint_loss(
            _require(student_feats, "student_feats", "hint")[i_s],
            _require(teacher_feats, "teacher_feats", "hint")[i_t],
            _require(hint_adapter, "hint_adapter", "hint"),
        )
    if "at" in active:
        parts["at"] = attention_transfer(
            _require(student_feats, "student_feats", "at"), _require(teacher_feats, "teacher_feats", "at")
        )
    if "dkd" in active:
        teacher = _require(teacher_logits, "teacher_logits", "dkd")
        parts["dkd"] = dkd(student_logits, teacher, labels, dkd_alpha, dkd_beta, temperature)["loss"]
    if "dist" in active:
        parts["dist"] = dist_loss(student_logits, _require(teacher_logits, "teacher_logits", "dist"), temperature)
    for name, fn in (("rkd", rkd_loss), ("pkt", pkt_loss), ("sp", sp_loss)):
        if name in active:  # the deepest stage's maps of both networks
            parts[name] = fn(_require(student_feats, "student_feats", name)[-1],
                             _require(teacher_feats, "teacher_feats", name)[-1])
    if "crd" in active:
        parts["crd"] = _require(crd, "a CRD head", "crd")(_require(student_feats, "student_feats", "crd")[-1],
                                                           _require(teacher_feats, "teacher_feats", "crd")[-1])
    total = torch.stack([weights[name] * value for name, value in parts.items()]).sum()
    return {"loss": total, **parts}
