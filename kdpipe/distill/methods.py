"""The names params are checked against: loss terms, method presets, curriculum orderings and pacings.

Torch-free, so `kdpipe.config` validates a params file without importing any implementation (and a stage that
only validates params, such as prepare, does not rerun when a loss formula changes).
"""

import math

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
    "crd": "contrastive: NCE against a memory bank of training-set embeddings (Tian et al. 2020; kdpipe.distill.crd)",
    "hidden": "text: MSE of projected student and teacher hidden states, embeddings + mapped layers (TinyBERT, Jiao et al. 2020)",
    "attn": "text: MSE of attention probability maps of mapped layers, pads masked (TinyBERT, Jiao et al. 2020)",
    "cos": "text: 1 − cosine of last-layer token vectors, pads masked (DistilBERT, Sanh et al. 2019)",
}


# Terms that need intermediate features, which no cache of teacher outputs holds. rkd, pkt and crd use the last
# stage's map average-pooled to an embedding (RepDistiller's choice), sp the map itself. The image terms read
# (N, C, H, W) maps (`forward_features`), the text terms token hidden states and attention maps
# (`text_features`, kdpipe/distill/transformer_losses.py): neither kind fits the other kind of model.
IMAGE_FEATURE_TERMS = ("hint", "at", "rkd", "pkt", "sp", "crd")
TEXT_FEATURE_TERMS = ("hidden", "attn", "cos")
FEATURE_TERMS = IMAGE_FEATURE_TERMS + TEXT_FEATURE_TERMS


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
    # TinyBERT's task-specific distillation (Jiao et al. 2020) in one stage: attention and hidden-state (with
    # embedding) terms at weight 1, as the paper sums them, plus its prediction-layer term as KD; the paper runs
    # the intermediate terms first, then the prediction term, and uses no label term.
    "tinybert": {"kd": 1.0, "hidden": 1.0, "attn": 1.0},
    # DistilBERT's loss (Sanh et al. 2019; their training script's alpha_ce 5, alpha_mlm 2, alpha_cos 1, T = 2)
    # for classification: the masked-LM weight goes to the label term.
    "distilbert": {"kd": 5.0, "ce": 2.0, "cos": 1.0},
}


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


def check_terms_fit_model(weights: dict[str, float], text: bool, attention: bool = True) -> None:
    """Raise ValueError (one line, naming the term) when a weighted feature term does not fit the models: text terms
    for image models, image terms for text models, attn for a student without attention maps (`attention`)."""
    active = [term for term in FEATURE_TERMS if weights.get(term, 0) > 0]
    wrong = [t for t in active if (t in TEXT_FEATURE_TERMS) != text]
    if wrong and not text:
        raise ValueError(f"distill: the {wrong[0]} term reads token hidden states ({', '.join(TEXT_FEATURE_TERMS)} "
                         f"are text terms), which image models lack; use a logit method or {', '.join(IMAGE_FEATURE_TERMS)}")
    if wrong:
        raise ValueError(f"distill: the {wrong[0]} term reads (N, C, H, W) feature maps ({', '.join(IMAGE_FEATURE_TERMS)} "
                         f"are image terms), which text models lack; use a logit method or {', '.join(TEXT_FEATURE_TERMS)}")
    if "attn" in active and not attention:
        raise ValueError("distill: the attn term reads attention maps, which the student lacks (a non-attention model "
                         "such as text_cnn); use hidden or cos")


# The one list of each (params' curriculum.ordering and curriculum.pacing are checked against them).
ORDERINGS: tuple[str, ...] = ("easy_to_hard", "hard_to_easy", "random")


PACINGS: tuple[str, ...] = ("linear", "root", "step", "geometric")
