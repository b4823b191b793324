"""Distillation losses: pure functions of tensors, each with its formula and paper.

Conventions shared by every function here:
- logits are (N, C), labels are (N,) class indices, features are (N, C, H, W);
- inputs are cast to fp32 before any arithmetic, so callers under bf16/fp16 autocast get an fp32 loss
  (fp64 inputs stay fp64, which lets tests check identities to machine precision);
- every loss is a scalar averaged over the batch;
- KL always runs teacher ‖ student: KL(p_t ‖ p_s) = Σ_c p_t,c (log p_t,c − log p_s,c).

The feature-based terms are in kdpipe/distill/feature_losses.py; kdpipe/distill/composite.py weights and sums them all.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor


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


def cross_entropy(student_logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """CE = −mean_i Σ_c q_i,c log softmax(z_i)_c, with q the one-hot label smoothed by `label_smoothing`
    (Szegedy et al. 2016, "Rethinking the Inception Architecture": q = (1 − ε)·onehot + ε/C).

    `labels` are class indices (N,), or probabilities (N, C) in place of the one-hot: mixup / cutmix's
    λ·onehot(y_a) + (1 − λ)·onehot(y_b) (Zhang et al. 2018), so CE = λ·CE(y_a) + (1 − λ)·CE(y_b), smoothed alike."""
    logits = _fp32(student_logits)
    if labels.is_floating_point():  # probabilities: in the logits' precision (fp32, or fp64 in tests)
        labels = labels.to(logits.dtype)
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


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


