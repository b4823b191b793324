"""params.yaml → typed, validated, frozen objects. The only reader of params.yaml.

Every section is a pydantic model with ``extra="forbid"`` so a typo fails instead of being ignored, and every
error is reported as one line naming the key path (``teacher.lr: must be > 0, got -1``) before any work runs.
Names that a module implements (datasets, models, loss presets, curriculum orderings and pacings) are checked
against that module's own table, imported only when params are validated: one list each, and a cheap import.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, StrictFloat, StrictInt, ValidationError, model_validator

from kdpipe import params_file
from kdpipe.data.augment_params import AugmentParams, check_distill
from kdpipe.data.text_params import (
    TEXT_DATASETS,
    TextDataParams,
    TextNetParams,
    check_modality,
    check_text_data,
)
from kdpipe.params_file import ConfigError
from kdpipe.sections import (  # noqa: F401 - re-exported: every section is kdpipe.config.<Name>
    EvaluateConfig,
    ExportConfig,
    PathsConfig,
    RuntimeConfig,
    TrackingConfig,
    _Section,
)

DEFAULT_PARAMS = "params.yaml"


def _one_of(key: str, value: str, known) -> None:
    if value not in known:
        raise ValueError(f"{key}: must be one of {', '.join(repr(k) for k in known)}, got {value!r}")


class DataConfig(_Section):
    dataset: str = "digits"  # a key of datasets.LOADERS
    folder: str | None = None  # imagefolder only: a folder of class/image files, e.g. data/raw/pets
    image_size: int | None = Field(default=None, ge=4, le=1024)  # imagefolder only: square resize
    resize: Literal["center_crop", "stretch"] = "center_crop"  # imagefolder only: kdpipe.data.images
    val_fraction: float = Field(default=0.15, gt=0, lt=1)
    test_fraction: float = Field(default=0.2, ge=0, lt=1)  # used only where no official test split exists
    download: bool = False  # allow torchvision downloads when the files are not on disk
    train_subset: int | None = Field(default=None, ge=10)  # stratified sample of the training pool, before splits
    in_memory: bool | Literal["auto"] = "auto"  # training splits on the device, or streamed from disk
    workers: int | None = Field(default=None, ge=0, le=64)  # streaming loader / imagefolder decoder processes
    text: TextDataParams | None = None  # textfolder / textfile only (None: the defaults of TextDataParams)

    @property
    def is_text(self) -> bool:
        return self.dataset in TEXT_DATASETS

    @property
    def text_params(self) -> TextDataParams:
        return self.text or TextDataParams()

    @model_validator(mode="after")
    def _imagefolder_needs_folder_and_size(self) -> DataConfig:
        from kdpipe.data.datasets import DATASETS

        _one_of("dataset", self.dataset, DATASETS + TEXT_DATASETS)
        if self.is_text:
            check_text_data(self)
        elif self.text is not None:
            raise ValueError(f"text: only for the text datasets ({', '.join(TEXT_DATASETS)}), got dataset {self.dataset!r}")
        if self.dataset == "imagefolder":
            if not self.folder:
                raise ValueError("folder: required when dataset is imagefolder")
            if self.image_size is None:
                raise ValueError("image_size: required when dataset is imagefolder")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"val_fraction: val_fraction + test_fraction must be < 1, got {self.val_fraction + self.test_fraction}"
            )
        return self


class TrainConfig(AugmentParams, _Section):
    """One training recipe: optimizer, schedule, regularisation, augmentation (AugmentParams), early stopping."""

    model: str
    epochs: int = Field(default=30, ge=1, le=10_000)
    batch_size: int = Field(default=64, ge=1, le=65_536)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(default=0.05, gt=0, le=10)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(default=5e-4, ge=0, lt=1)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    step_milestones: tuple[StrictFloat, ...] = Field(default=(0.5, 0.75), strict=False)  # where step decays
    step_gamma: float = Field(default=0.1, gt=0, le=1)
    warmup_epochs: int = Field(default=1, ge=0)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    patience: int = Field(default=10, ge=0)  # epochs without val improvement before stopping; 0 = never stop early
    crop_padding: int = Field(default=0, ge=0, le=64)
    flip: bool = False
    chance_guard: bool = True  # a run that learned nothing (val accuracy at chance) fails instead of being kept
    text: TextNetParams | None = None  # text models only: width, layers, heads (None: TextNetParams' defaults)

    def _external_model(self) -> bool:
        """model names something outside the zoo (a transformers teacher's dir or hub id)."""
        return False

    @model_validator(mode="after")
    def _check_recipe(self) -> TrainConfig:
        from kdpipe.models.zoo import is_known_model

        if not self._external_model() and not is_known_model(self.model):
            raise ValueError(f"model: unknown model {self.model!r} (see `kdpipe list models`)")
        if self.batch_size == 1:
            raise ValueError("batch_size: must be >= 2: BatchNorm cannot train on a batch of one image, got 1")
        if self.warmup_epochs >= self.epochs and self.warmup_epochs > 0:
            raise ValueError(f"warmup_epochs: must be < epochs ({self.epochs}), got {self.warmup_epochs}")
        if self.nesterov and self.optimizer == "sgd" and self.momentum == 0:
            raise ValueError("nesterov: needs momentum > 0")
        if any(not 0 < m < 1 for m in self.step_milestones):
            raise ValueError(f"step_milestones: each must be in (0, 1), got {list(self.step_milestones)}")
        return self


class TeacherConfig(TrainConfig):
    model: str = "resnet20"
    # transformers: teacher.model is a local dir or a hub id in the local Hugging Face cache (text datasets)
    source: Literal["train", "checkpoint", "registry", "torchvision", "transformers"] = "train"
    checkpoint: str | None = None  # with source: checkpoint, a .pt file (a kdpipe checkpoint or a state dict)
    registry_uri: str | None = None  # with source: registry, e.g. models:/kdpipe-teacher@champion
    weights: str | None = None  # with source: torchvision, a weights name of teacher.model, e.g. IMAGENET1K_V1
    finetune: bool = False  # train a brought teacher further with this recipe (needed for a new head)
    input_size: int | None = Field(default=None, ge=8, le=1024)  # the teacher's input, resized on the device
    ensemble: int = Field(default=1, ge=1, le=16)  # teachers trained with seeds seed, seed+1, ...; logits averaged

    def _external_model(self) -> bool:
        return self.source == "transformers"

    @model_validator(mode="after")
    def _source_needs_location(self) -> TeacherConfig:
        if self.ensemble > 1 and self.source != "train":
            raise ValueError(f"ensemble: an ensemble of seeds is trained here (source: train), got source "
                             f"{self.source!r} with ensemble {self.ensemble}")
        if self.source == "torchvision":
            if not self.model.startswith("tv:"):
                raise ValueError(f"model: must be tv:<torchvision name> when source is torchvision, got {self.model!r}")
            if not self.weights:
                raise ValueError("weights: required when source is torchvision (e.g. IMAGENET1K_V1 or DEFAULT)")
        if self.source == "checkpoint" and not self.checkpoint:
            raise ValueError("checkpoint: required when source is checkpoint")
        if self.source == "registry" and not (self.registry_uri or "").startswith("models:/"):
            raise ValueError(f"registry_uri: must be models:/<name>@<alias> or models:/<name>/<version> "
                             f"when source is registry, got {self.registry_uri!r}")
        return self


class StudentConfig(TrainConfig):
    """The recipe shared by the scratch baseline and the distilled student, run once per seed."""

    model: str = "tiny_cnn"
    seeds: tuple[StrictInt, ...] = Field(default=(0, 1, 2), min_length=1, strict=False)  # a YAML list, as a tuple

    @model_validator(mode="after")
    def _unique_seeds(self) -> StudentConfig:
        if len(set(self.seeds)) != len(self.seeds) or any(s < 0 for s in self.seeds):
            raise ValueError(f"seeds: must be distinct and >= 0, got {list(self.seeds)}")
        return self


class DistillConfig(_Section):
    """The distillation loss: a named preset of term weights, optionally overridden term by term."""

    method: str = "kd"  # a key of losses.PRESETS
    weights: dict[str, float] = Field(default_factory=dict)  # e.g. {kd: 0.5, ce: 0.5}; merged over the preset
    temperature: float = Field(default=4.0, gt=0, le=100)
    focal_gamma: float | None = Field(default=None, ge=0, le=10)  # CE → focal loss (Lin et al. 2017)
    dkd_alpha: float = Field(default=1.0, ge=0)
    dkd_beta: float = Field(default=8.0, ge=0)
    hint_layer: int = -1  # FitNets: which feature stage (same index for student and teacher); -1 = deepest
    hint_epochs: int = Field(default=0, ge=0)  # FitNets stage 1: epochs of hint-only training first
    crd_negatives: int = Field(default=4096, ge=1)  # CRD: negatives drawn from the memory bank per sample
    # FKD (Shen & Xing 2022): the teacher labels this many augmented views of each training image once, and
    # the student replays them (no teacher forward per step); 0 = a live teacher on every batch
    teacher_views: int = Field(default=0, ge=0, le=64)

    def resolved_weights(self) -> dict[str, float]:
        from kdpipe.distill.methods import PRESETS

        return {**PRESETS[self.method], **self.weights}

    @model_validator(mode="after")
    def _check_weights(self) -> DistillConfig:
        from kdpipe.distill.methods import LOSSES, PRESETS, validate_weights

        _one_of("method", self.method, PRESETS)
        try:
            validate_weights(self.resolved_weights(), self.temperature)
        except ValueError as e:
            msg = str(e)
            term = msg.split(":")[0]
            if term in LOSSES:
                raise ValueError(f"weights.{msg}") from None
            raise ValueError(f"weights: {msg}") from None
        if self.hint_epochs and not self.resolved_weights().get("hint"):
            raise ValueError("hint_epochs: needs a hint weight > 0 (method fitnet)")
        return self


class CurriculumConfig(_Section):
    """Present training samples easy → hard by teacher difficulty (Bengio et al. 2009)."""

    enabled: bool = False
    ordering: str = "easy_to_hard"  # a key of curriculum.ORDERINGS
    pacing: str = "linear"  # a key of curriculum.PACINGS
    start_fraction: float = Field(default=0.3, gt=0, le=1)  # share of the easiest samples at epoch 1
    full_at: float = Field(default=0.5, gt=0, le=1)  # share of student.epochs after which all samples are used
    steps: int = Field(default=4, ge=2)  # levels of the step pacing

    @model_validator(mode="after")
    def _known_names(self) -> CurriculumConfig:
        from kdpipe.distill.methods import ORDERINGS, PACINGS

        _one_of("ordering", self.ordering, ORDERINGS)
        _one_of("pacing", self.pacing, PACINGS)
        return self


class Config(_Section):
    # default_factory, not instances: building a default runs its validators (which import the model zoo
    # and so torch); a factory defers that to load time and keeps `import kdpipe.config` cheap.
    seed: int = Field(default=0, ge=0, lt=2**32)
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    curriculum: CurriculumConfig = Field(default_factory=CurriculumConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    paths: PathsConfig = Field(default_factory=PathsConfig)

    @model_validator(mode="after")
    def _teacher_outputs_fit_the_method(self) -> Config:
        from kdpipe.distill.methods import FEATURE_TERMS, needs_features

        if self.runtime.processes > 1 and self.distill.resolved_weights().get("crd"):
            raise ValueError(f"runtime.processes: CRD's memory banks live in one process; set runtime.processes: 1 "
                             f"for method crd (got {self.runtime.processes})")
        if self.runtime.reproducible and (self.runtime.precision in ("bf16", "fp16") or self.runtime.compile):
            key, fix = ("compile", "false") if self.runtime.compile else ("precision", "fp32 or auto")
            raise ValueError(f"runtime.{key}: reproducible runs eager fp32 (bf16, fp16, compiled code vary by CPU); set it to {fix}")
        if self.teacher.ensemble > 1 and needs_features(self.distill.resolved_weights()):
            raise ValueError(f"distill.method: {self.distill.method} needs one teacher's features "
                             f"({', '.join(FEATURE_TERMS)}), and teacher.ensemble {self.teacher.ensemble} averages "
                             f"only logits; use a logit method (kd, dkd, dist, mse) or teacher.ensemble: 1")
        check_distill(self.student, self.distill, needs_features(self.distill.resolved_weights()), FEATURE_TERMS)
        return self

    @model_validator(mode="after")
    def _models_fit_the_modality(self) -> Config:
        from kdpipe.distill.methods import check_terms_fit_model
        from kdpipe.models.text_nets import is_text_model

        # the text terms (hidden, attn, cos) read token hidden states, attn also attention maps (not text_cnn's)
        check_terms_fit_model(self.distill.resolved_weights(), text=self.data.is_text,
                              attention=self.student.model != "text_cnn")
        check_modality(self, is_text_model)
        return self

    @model_validator(mode="after")
    def _folder_under_raw(self) -> Config:
        key, where = ("data.text.file", self.data.text_params.file) if self.data.dataset == "textfile" else \
            ("data.folder", self.data.folder)
        folder, raw = (os.path.abspath(p) for p in (where or "", self.paths.raw))
        inside = os.path.commonpath([folder, raw]) == raw
        if self.data.dataset in ("imagefolder", "textfolder", "textfile") and not inside:
            raise ValueError(f"{key}: must be inside paths.raw ({self.paths.raw}), prepare's DVC dependency (edits "
                             f"elsewhere never rerun it), got {where}; move it there or set paths.raw above it")
        return self

    def flat(self) -> dict[str, Any]:
        """Params flattened to dotted keys (``teacher.lr``), as MLflow logs them."""
        return params_file.flatten(self.model_dump(mode="json"))


def load(path: str | Path = DEFAULT_PARAMS) -> Config:
    """Read and validate a params file; raise ConfigError with a one-line, key-path message."""
    return from_dict(params_file.read(path))


def from_dict(raw: dict) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(params_file.first_error(e)) from None
