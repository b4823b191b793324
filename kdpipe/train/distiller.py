"""Distillation: the frozen teacher, where its outputs come from, the loss the engine calls, FitNets' hint phase
and the curriculum's sample pools. The distill path reads in three places: kdpipe/stages/distill.py → kdpipe/train/ (this, students.py,
engine.py) → kdpipe/distill/.

The loss itself lives in kdpipe/distill/ (pure functions, weighted by composite.py). Teacher outputs come either from the cache the teacher
stage wrote (logits over the un-augmented train split: right only when the student sees exactly those images
and needs logits alone), or from a live teacher forward on the very augmented batch the student sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kdpipe.config import Config, DistillConfig, StudentConfig
from kdpipe.data.augment_params import augments
from kdpipe.distill import composite, curriculum, feature_losses
from kdpipe.distill.methods import needs_features
from kdpipe.distill.views import TeacherViews
from kdpipe.models.zoo import Ensemble
from kdpipe.paths import Paths
from kdpipe.train import text_distill
from kdpipe.train.engine import fit
from kdpipe.train.objective import LossFn, Objective
from kdpipe.train.text_init import init_from_teacher


def freeze(teacher: nn.Module) -> nn.Module:
    """Eval mode (BatchNorm uses its running statistics) and no gradients, for good."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def fold_batchnorm(teacher: nn.Module) -> nn.Module:
    """A copy of the frozen teacher with each BatchNorm folded into the convolution before it (torch.fx's
    conv-bn fusion, exact up to float rounding in eval mode): fewer ops per forward, 2–9 % more images/s for
    resnet56 on this CPU (two runs of bench/teacher_forward.py, bf16 channels_last: 1829 → 1872, 1658 → 1799).
    For logits only: the copy has no forward_features.
    A model fx cannot trace symbolically (data-dependent control flow) is returned unchanged."""
    from torch.fx.experimental.optimization import fuse

    try:
        return freeze(fuse(teacher))
    except Exception:  # fx raises many types (TraceError, TypeError, NotImplementedError...) on untraceable code
        return teacher


def can_use_cached_logits(student: StudentConfig, weights: dict[str, float]) -> bool:
    """Cached teacher logits describe the un-augmented images; they are right only when the student
    sees exactly those, and when no term needs the teacher's intermediate features."""
    return not augments(student) and not needs_features(weights)


def starts_from_teacher(cfg: Config) -> bool:
    """student.text.init_from_teacher: the distilled student starts from the teacher's layers (kdpipe.train.text_init)."""
    return cfg.student.text is not None and cfg.student.text.init_from_teacher


def load_teacher_outputs(paths: Paths, prepared: dict) -> dict:
    """The teacher stage's logits (N_train, K) and difficulty (N_train,) over the train split, checked against the
    prepared data: readable, complete, made from this dataset, one row per training image."""
    from kdpipe.files import load_torch
    from kdpipe.models.checkpoint import CheckpointError, require_same_data

    path, rerun = paths.teacher_outputs, "rerun the teacher stage (dvc repro teacher)"
    outputs = load_torch(path, CheckpointError, missing="not found; run the teacher stage first (dvc repro teacher)",
                         unreadable="not readable, truncated or corrupt", fix=rerun)
    if not isinstance(outputs, dict) or not all(isinstance(outputs.get(k), torch.Tensor)
                                                for k in ("train_logits", "difficulty")):
        raise CheckpointError(f"{path}: lacks the train_logits and difficulty tensors; {rerun}")
    require_same_data(path, outputs.get("dataset_digest"), prepared["digest"], stage="teacher")
    expected = (len(prepared["train_y"]), len(prepared["classes"]))
    found = (tuple(outputs["train_logits"].shape), tuple(outputs["difficulty"].shape))
    if found != (expected, expected[:1]):
        raise CheckpointError(f"{path}: logits {found[0]} and difficulty {found[1]}, the train split needs "
                              f"{expected} and {expected[:1]}; {rerun}")
    return outputs


def make_hint_adapter(student: nn.Module, teacher: nn.Module, cfg: DistillConfig) -> nn.Module | None:
    """FitNets' regressor from the student's guided layer to the teacher's hint layer (trained with the student)."""
    if not cfg.resolved_weights().get("hint"):
        return None
    return feature_losses.make_hint_adapter(student.feature_channels[cfg.hint_layer], teacher.feature_channels[cfg.hint_layer])


def make_crd_head(student: nn.Module, teacher: nn.Module, n_train: int, cfg: DistillConfig, seed: int,
                  ) -> nn.Module | None:
    """CRD's embeddings and memory banks over the train split (trained with the student), when crd is weighted."""
    if not cfg.resolved_weights().get("crd"):
        return None
    from kdpipe.distill.crd import CRDHead

    return CRDHead(student.feature_channels[-1], teacher.feature_channels[-1], n_train,
                   negatives=cfg.crd_negatives, seed=seed)


def distill_loss(
    cfg: DistillConfig,
    teacher: nn.Module,
    *,
    weights: dict[str, float] | None = None,
    cached_logits: torch.Tensor | None = None,
    hint_adapter: nn.Module | None = None,
    crd_head: nn.Module | None = None,
    label_smoothing: float = 0.0,
) -> LossFn:
    """The engine's loss for a distilled student; `cached_logits` (rows, K) replaces the teacher forward: row r
    labels the image the engine passes with r (a train position, or a cached view's row). `crd_head` gets the
    batch's train positions (features never come from cached views, so rows are train positions then)."""
    weights = weights or cfg.resolved_weights()
    with_feats = needs_features(weights)

    def loss_fn(student, x, y, idx):
        if with_feats:
            student_logits, student_feats = student.forward_features(x)
        else:
            student_logits, student_feats = student(x), None
        teacher_feats = None
        with torch.no_grad():  # not inference_mode: its tensors may not enter an autograd graph
            if cached_logits is not None:
                teacher_logits = cached_logits[idx.to(cached_logits.device)].to(x.device, torch.float32)
            elif with_feats:
                teacher_logits, teacher_feats = teacher.forward_features(x)
            else:
                teacher_logits = teacher(x)
        parts = composite.composite_loss(
            student_logits, y, teacher_logits=teacher_logits, weights=weights, temperature=cfg.temperature,
            focal_gamma=cfg.focal_gamma, label_smoothing=0.0 if cfg.focal_gamma is not None else label_smoothing,
            student_feats=student_feats, teacher_feats=teacher_feats, hint_adapter=hint_adapter,
            hint_index=cfg.hint_layer, dkd_alpha=cfg.dkd_alpha, dkd_beta=cfg.dkd_beta,
            crd=(lambda fs, ft: crd_head(fs, ft, idx.to(fs.device))) if crd_head is not None else None,
        )
        return student_logits, parts

    return loss_fn


@dataclass
class Distiller:
    """What distill loads once (teacher, cached logits, difficulty) and turns into each seed's objective."""

    cfg: Config
    rt: object  # runtime.Runtime
    teacher: nn.Module  # frozen, on the training device
    weights: dict[str, float]
    cached_logits: torch.Tensor | None  # (N_train, K) on the device when the cache applies
    difficulty: torch.Tensor | None  # (N_train,) teacher loss per sample, with the curriculum
    views: TeacherViews | None = None  # with distill.teacher_views: labelled once by label_views()

    @classmethod
    def load(cls, cfg: Config, paths: Paths, prepared: dict, rt) -> Distiller:
        """The teacher checked against this dataset, and its cached outputs where they are used."""
        from kdpipe.models.checkpoint import ensemble_members, load_trained

        teacher, ckpt = load_trained(paths.teacher, prepared["digest"], stage="teacher")
        weights = cfg.distill.resolved_weights()
        use_cache = can_use_cached_logits(cfg.student, weights)
        outputs = load_teacher_outputs(paths, prepared) if use_cache or cfg.curriculum.enabled else None
        members = [freeze(m) for m in ensemble_members(teacher, ckpt)]
        if not needs_features(weights) and getattr(teacher, "modality", "image") == "image":  # fold BatchNorms
            members = [fold_batchnorm(m) for m in members]
        teacher = members[0] if len(members) == 1 else Ensemble(members)
        if starts_from_teacher(cfg):  # a student that cannot take the teacher's layers fails before any run opens
            from kdpipe.train.students import build_student

            init_from_teacher(build_student(cfg.student, prepared, "cpu"), teacher)
        return cls(cfg, rt, rt.prepare(teacher), weights,
                   outputs["train_logits"].to(rt.device) if use_cache else None,
                   outputs["difficulty"] if cfg.curriculum.enabled else None)

    def label_views(self, train_x: torch.Tensor) -> float:
        """With distill.teacher_views K: the teacher labels K views of each training image, once for every
        seed (FKD). Returns the seconds it took."""
        import time

        from kdpipe.distill.views import label_photo_views, label_views

        t0 = time.perf_counter()
        recipe, k = self.cfg.student, self.cfg.distill.teacher_views
        if recipe.augment == "resized_crop":
            views = label_photo_views(self.teacher, train_x, k, recipe, self.cfg.seed, self.rt)
        else:
            views = label_views(self.teacher, train_x, k, recipe.crop_padding, recipe.flip, self.cfg.seed, self.rt)
        self.views = views.to(self.rt.device)
        return time.perf_counter() - t0

    @property
    def teacher_outputs(self) -> str:
        if self.views is not None:
            return f"views{self.views.k}"
        return "cached" if self.cached_logits is not None else "live"

    def objective(self, student: nn.Module, seed: int, splits) -> Objective:
        """The student's loss, its FitNets adapter (after the hint phase, when asked) and its curriculum."""
        cfg = self.cfg
        if starts_from_teacher(cfg):  # DistilBERT: the teacher's embeddings and every other layer
            init_from_teacher(student, self.teacher)
        if text_distill.is_text(student) and needs_features(self.weights):
            return self.text_objective(student, seed)
        adapter = make_hint_adapter(student, self.teacher, cfg.distill)
        crd_head = make_crd_head(student, self.teacher, len(splits[0]), cfg.distill, seed)
        extra = [self.rt.prepare(m) for m in (adapter, crd_head) if m is not None]
        if cfg.distill.hint_epochs:
            self.hint_phase(student, adapter, seed, splits)
        cached = self.views.flat_logits() if self.views is not None else self.cached_logits
        loss_fn = distill_loss(cfg.distill, self.teacher, weights=self.weights, cached_logits=cached,
                               hint_adapter=adapter, crd_head=extra[-1] if crd_head is not None else None,
                               label_smoothing=cfg.student.label_smoothing)
        pool = (curriculum.epoch_pools(cfg.curriculum, self.difficulty, cfg.student.epochs, seed)
                if cfg.curriculum.enabled else None)
        return Objective(loss_fn=loss_fn, extra_modules=extra, epoch_pool=pool,
                         augment=self.views.reading(splits[0]).augment if self.views is not None else None)

    def text_objective(self, student: nn.Module, seed: int) -> Objective:
        """A text student taught through hidden states or attention maps (text_distill), with its projection."""
        projection = text_distill.make_projection(student, self.teacher, self.weights)
        extra = [self.rt.prepare(projection)] if projection is not None else []
        pool = (curriculum.epoch_pools(self.cfg.curriculum, self.difficulty, self.cfg.student.epochs, seed)
                if self.cfg.curriculum.enabled else None)
        loss_fn = text_distill.text_distill_loss(self.cfg.distill, self.teacher, weights=self.weights,
                                                 projection=extra[0] if extra else None,
                                                 label_smoothing=self.cfg.student.label_smoothing)
        return Objective(loss_fn=loss_fn, extra_modules=extra, epoch_pool=pool)

    def hint_phase(self, student: nn.Module, adapter: nn.Module, seed: int, splits) -> None:
        """FitNets stage 1 (Romero et al. 2015): train the student up to its guided layer, with the adapter,
        on the hint loss alone, before the full distillation stage."""
        recipe = self.cfg.student.model_copy(update={"epochs": self.cfg.distill.hint_epochs, "patience": 0,
                                                     "warmup_epochs": 0})
        loss_fn = distill_loss(self.cfg.distill, self.teacher, weights={"hint": 1.0}, hint_adapter=adapter)
        train, val, _ = splits
        fit(student, train, val, recipe, self.rt, seed=seed, objective=Objective(loss_fn, [adapter]),
            desc=f"distill hints seed {seed}", restore_best=False)
