"""Evidence from per-image predictions: is one classifier better than another beyond noise, how faithful is a
student to its teacher, and how well calibrated is each model. numpy only (scipy for the temperature fit):
the evaluate stage, the export gate and the benchmarks share it, and none of it trains.

Paired designs. Two models scored on the same images are compared image by image, never as two means: the
image-to-image variation they share cancels, so the interval is far tighter (Dietterich 1998, "Approximate
statistical tests for comparing supervised classification learning algorithms"; Bouthillier et al. 2021,
"Accounting for variance in machine learning benchmarks", for resampling seeds as well as data).
  * `paired_bootstrap`: the accuracy difference with a percentile interval. With one seed it resamples images
    (each image keeps both models' predictions); with S seeds it is two-level: each replicate draws S seed pairs
    with replacement and N images with replacement, so seed variance is inside the interval. Seeded: the same
    inputs give the same interval, bit for bit (integer counts, no floating-point sums in the resampling).
  * `mcnemar`: the exact McNemar test, a two-sided binomial test with p = 1/2 on the discordant images (those
    that one model gets right and the other wrong; McNemar 1947, exact form as in Dietterich 1998).
Fidelity (Stanton et al. 2021, "Does knowledge distillation really work?"): top-1 agreement with the teacher
and mean KL(teacher ‖ student) at T = 1. Calibration (Guo et al. 2017, "On calibration of modern neural
networks"): ECE over equal-width confidence bins, NLL, Brier score, and the temperature that minimises NLL.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

CONFIDENCE = 0.95
BOOTSTRAP_SAMPLES = 10_000
ECE_BINS = 15  # Guo et al. 2017's choice
_CELLS_PER_CHUNK = 4_000_000  # replicates × images drawn at once: ~32 MB of int64 indices


# ---------------------------------------------------------------------------------------------------------
# Paired accuracy differences


def correct(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(…, N) int8 array: 1 where the argmax of `logits` (…, N, K) is the label, else 0."""
    return (np.asarray(logits).argmax(-1) == np.asarray(labels)).astype(np.int8)


def as_rows(a: np.ndarray) -> np.ndarray:
    """A (N,) or (S, N) 0/1 (or −1/0/1) array as (S, N) int64."""
    a = np.asarray(a, dtype=np.int64)
    return a[None, :] if a.ndim == 1 else a


def bootstrap_means(arrays: list[np.ndarray], *, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> list[np.ndarray]:
    """Bootstrap replicates of the mean of each (S_i, N) integer array in `arrays`, all from the same draws.

    Every array covers the same N images in the same order; S_i is its number of seeds (1 for a model trained
    once, such as the teacher, which then stands beside every drawn seed). A replicate draws N images with
    replacement (the same ones for every array) and S seed indices with replacement (S = the largest S_i,
    shared by every array with S rows), and takes the mean over the drawn (seed, image) cells. Returns one
    (samples,) float64 array per input. Exact: per-image draw counts are integers and the sums are integer
    matrix products (in float64, where every partial sum is an integer below 2^53 and so exact in any order), so
    the result does not depend on the CPU's vector width or the BLAS's summation order.
    """
    arrays = [as_rows(a).astype(np.float64) for a in arrays]  # BLAS; every partial sum is an integer < 2^53
    n_images = arrays[0].shape[1]
    n_seeds = max(a.shape[0] for a in arrays)
    if any(a.shape[1] != n_images for a in arrays) or any(a.shape[0] not in (1, n_seeds) for a in arrays):
        raise ValueError(f"arrays must share N images and have 1 or {n_seeds} rows: {[a.shape for a in arrays]}")
    if n_images == 0 or samples < 1:
        raise ValueError(f"need images and samples ≥ 1, got {n_images} images, {samples} samples")
    rng = np.random.default_rng(seed)
    chunk = max(1, _CELLS_PER_CHUNK // n_images)
    out = [np.empty(samples) for _ in arrays]
    for start in range(0, samples, chunk):
        size = min(chunk, samples - start)
        images = rng.integers(0, n_images, (size, n_images))  # (R, N) image indices
        seeds = rng.integers(0, n_seeds, (size, n_seeds))  # (R, S) seed indices
        flat = (np.arange(size)[:, None] * n_images + images).ravel()
        counts = np.bincount(flat, minlength=size * n_images).reshape(size, n_images).astype(np.float64)  # (R, N)
        for a, dest in zip(arrays, out, strict=True):
            sums = a @ counts.T  # (S_i, R): each seed's total over the drawn images (integers: exact in float64)
            picked = sums[0] * n_seeds if a.shape[0] == 1 else np.take_along_axis(sums.T, seeds, 1).sum(1)
            dest[start:start + size] = picked / (n_seeds * n_images)
    return out


def percentile_interval(replicates: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The central `confidence` interval of bootstrap replicates (NaN replicates dropped)."""
    finite = replicates[np.isfinite(replicates)]
    if finite.size == 0:
        return math.nan, math.nan
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(finite, [tail, 1.0 - tail])
    return float(low), float(high)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, *, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0,
                     confidence: float = CONFIDENCE) -> dict:
    """Accuracy of model a minus model b, with its paired bootstrap interval.

    a, b: 0/1 correctness, (N,) for one run each or (S, N) for S seeds, row s of a paired with row s of b (b may
    have one row: a model trained once). Returns {difference, low, high, confidence, samples, seeds, images}:
    fractions (multiply by 100 for points); `difference` is the observed mean of a − b.
    """
    diff = as_rows(a) - as_rows(b)  # (S, N) in {−1, 0, 1}: broadcast pairs a one-row b with every seed of a
    (replicates,) = bootstrap_means([diff], samples=samples, seed=seed)
    return interval_record(diff, replicates, samples, confidence)


def interval_record(diff: np.ndarray, replicates: np.ndarray, samples: int, confidence: float) -> dict:
    """paired_bootstrap's record for the (S, N) or (N,) differences `diff` and their replicates."""
    diff = as_rows(diff)
    low, high = percentile_interval(replicates, confidence)
    return {"difference": float(diff.mean()), "low": low, "high": high, "confidence": confidence,
            "samples": samples, "seeds": int(diff.shape[0]), "images": int(diff.shape[1])}


def gap_recovered_interval(teacher: np.ndarray, scratch: np.ndarray, distilled: np.ndarray, *,
                           samples: int = BOOTSTRAP_SAMPLES, seed: int = 0,
                           confidence: float = CONFIDENCE) -> dict:
    """(distilled − scratch) / (teacher − scratch) with a bootstrap interval from the same two-level draws.

    Each replicate's ratio uses its own resampled accuracies; replicates whose teacher − scratch gap is 0 have
    no ratio and are dropped (counted in `undefined`). Returns {value, low, high, confidence, undefined}.
    """
    gained, gap = as_rows(distilled) - as_rows(scratch), as_rows(teacher) - as_rows(scratch)
    gained_reps, gap_reps = bootstrap_means([gained, gap], samples=samples, seed=seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(gap_reps != 0, gained_reps / np.where(gap_reps != 0, gap_reps, 1), np.nan)
    low, high = percentile_interval(ratios, confidence)
    observed_gap = gap.mean()
    value = float(gained.mean() / observed_gap) if observed_gap != 0 else None
    return {"value": value, "low": low, "high": high, "confidence": confidence,
            "undefined": int(np.isnan(ratios).sum())}


def binomial_two_sided_p(k: int, n: int) -> float:
    """Exact two-sided p of k successes in n fair coin flips: 2·P(X ≤ min(k, n − k)), at most 1.

    For p = 1/2 the binomial is symmetric, so this equals summing every outcome no more likely than k (what
    scipy.stats.binomtest does). Exact rational arithmetic: no underflow for thousands of flips.
    """
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1))
    return min(1.0, float(Fraction(2 * tail, 2**n)))


def mcnemar(a: np.ndarray, b: np.ndarray) -> dict:
    """Exact McNemar test of two models on the same images. a, b: (N,) 0/1 correctness.

    Returns {a_only, b_only, p}: images only a got right, only b got right, and the exact two-sided p that both
    are equally likely (a binomial test with p = 1/2 on the a_only + b_only discordant images).
    """
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    return {"a_only": a_only, "b_only": b_only, "p": binomial_two_sided_p(a_only, a_only + b_only)}


# ---------------------------------------------------------------------------------------------------------
# Fidelity and calibration


def log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise log-softmax of logits / temperature, in float64."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def fidelity(student_logits: np.ndarray, teacher_logits: np.ndarray) -> dict:
    """How closely a student follows its teacher on the same images (Stanton et al. 2021).

    agreement: share of images where both predict the same class; kl: mean over images of
    KL(teacher ‖ student) = Σ_k p_t,k (log p_t,k − log p_s,k) at T = 1, in nats (0 for a perfect copy).
    """
    log_s, log_t = log_softmax(student_logits), log_softmax(teacher_logits)
    kl = (np.exp(log_t) * (log_t - log_s)).sum(axis=-1)
    agreement = (np.asarray(student_logits).argmax(-1) == np.asarray(teacher_logits).argmax(-1)).mean()
    return {"agreement": float(agreement), "kl": float(kl.mean())}


def reliability_bins(confidence: np.ndarray, hit: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Equal-width bins of top-1 confidence: [0, 1/B], (1/B, 2/B], …, ((B−1)/B, 1] (each bin closed on the right,
    as Guo et al. 2017). Per bin: lower, upper, count, mean confidence and accuracy (None when empty)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges[1:-1], confidence, side="left"), 0, bins - 1)
    rows = []
    for i in range(bins):
        inside = which == i
        count = int(inside.sum())
        rows.append({"lower": float(edges[i]), "upper": float(edges[i + 1]), "count": count,
                     "confidence": float(confidence[inside].mean()) if count else None,
                     "accuracy": float(hit[inside].mean()) if count else None})
    return rows


def calibration(logits: np.ndarray, labels: np.ndarray, *, bins: int = ECE_BINS, temperature: float = 1.0) -> dict:
    """ECE, NLL and Brier score of softmax(logits / temperature) against `labels` (Guo et al. 2017).

    ECE = Σ_b (n_b / N)·|accuracy_b − confidence_b| over `bins` equal-width bins of top-1 confidence;
    NLL = mean −log p(label); Brier = mean over images of Σ_k (p_k − 1[k = label])² (0 best, 2 worst).
    Returns {ece, nll, brier, bins} with the reliability bins.
    """
    labels = np.asarray(labels)
    log_p = log_softmax(logits, temperature)
    probs = np.exp(log_p)
    confidence, hit = probs.max(axis=-1), (probs.argmax(axis=-1) == labels).astype(np.float64)
    rows = reliability_bins(confidence, hit, bins)
    ece = sum(r["count"] * abs(r["accuracy"] - r["confidence"]) for r in rows if r["count"]) / len(labels)
    onehot = np.eye(probs.shape[-1])[labels]
    return {"ece": float(ece), "nll": float(-log_p[np.arange(len(labels)), labels].mean()),
            "brier": float(((probs - onehot) ** 2).sum(axis=-1).mean()), "bins": rows}


def fit_temperature(logits: np.ndarray, labels: np.ndarray, *, low: float = 0.05, high: float = 20.0) -> float:
    """The temperature T in [low, high] minimising the NLL of softmax(logits / T) on `labels` (temperature
    scaling, Guo et al. 2017): fitted on the validation split, then reported on the test split. A bounded 1-D
    search over log T (scipy's bounded Brent)."""
    from scipy.optimize import minimize_scalar

    labels = np.asarray(labels)
    rows = np.arange(len(labels))

    def nll(log_t: float) -> float:
        return float(-log_softmax(logits, math.exp(log_t))[rows, labels].mean())

    found = minimize_scalar(nll, bounds=(math.log(low), math.log(high)), method="bounded",
                            options={"xatol": 1e-5})
    return float(math.exp(found.x))


# ---------------------------------------------------------------------------------------------------------
# Verdicts


HELPED, NO_EVIDENCE, HURT = "helped", "no evidence", "hurt"


def direction(comparison: dict) -> str:
    """helped when the whole interval is above 0, hurt when it is below 0, else no evidence."""
    if comparison["low"] > 0:
        return HELPED
    if comparison["high"] < 0:
        return HURT
    return NO_EVIDENCE


def points(value: float, signed: bool = True) -> str:
    """A fraction as percentage points, e.g. 0.0123 → '+1.23' (a real minus sign for negatives)."""
    text = f"{value * 100:+.2f}" if signed else f"{value * 100:.2f}"
    return text.replace("-", "−")


def interval_text(comparison: dict) -> str:
    """'+1.20 points (95 % CI +0.40 to +2.00)'."""
    level = round(comparison["confidence"] * 100)
    return (f"{points(comparison['difference'])} points ({level} % CI {points(comparison['low'])} to "
            f"{points(comparison['high'])})")
