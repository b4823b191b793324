"""The text path's params (issue 34), validated with the rest of params.yaml: how prepare reads and tokenizes a
text corpus (`data.text`), and the shape of a text network (`teacher.text`, `student.text`).

pydantic only (like augment_params): kdpipe.config imports it, and `import kdpipe.config` stays cheap.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kdpipe.data.augment_params import augments, mixes

TEXT_DATASETS = ("textfolder", "textfile")  # data.dataset values read by kdpipe.data.text
TRAINED_TOKENIZERS = ("wordpiece", "bpe")  # data.text.tokenizer values trained on the train split


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class TextDataParams(_Strict):
    """data.text: where a textfile is, which columns hold the text and label, and the tokenizer."""

    file: str | None = None  # textfile only: a .csv, .tsv, .jsonl (or .json lines) file inside paths.raw
    text_column: str = Field(default="text", min_length=1)  # textfile: the column (or JSON key) holding the text
    label_column: str = Field(default="label", min_length=1)  # textfile: the column holding the class name
    # wordpiece | bpe: trained on the train split (tokenizers library); anything else is a transformers model
    # (a local dir or a hub id in the local cache) whose own tokenizer is used: the teacher's, teacher.model
    tokenizer: str = Field(default="wordpiece", min_length=1)
    vocab_size: int = Field(default=8000, ge=100, le=1_000_000)  # trained tokenizers only
    lowercase: bool = True  # trained tokenizers only: BERT's normaliser (lowercase, strip accents)
    max_length: int = Field(default=128, ge=4, le=8192)  # tokens per text, special tokens included
    truncation: Literal["right", "left"] = "right"  # which end of a longer text is cut

    @property
    def trained(self) -> bool:
        return self.tokenizer in TRAINED_TOKENIZERS

    @model_validator(mode="after")
    def _check(self) -> TextDataParams:
        if self.file is not None and not self.file.lower().endswith((".csv", ".tsv", ".jsonl", ".json")):
            raise ValueError(f"file: must end in .csv, .tsv, .jsonl or .json (JSON lines), got {self.file!r}")
        return self


class TextNetParams(_Strict):
    """teacher.text / student.text: the shape of the zoo's text networks (text_transformer, text_cnn)."""

    width: int = Field(default=128, ge=8, le=4096)  # embedding and hidden size
    layers: int = Field(default=2, ge=1, le=48)  # transformer blocks (text_transformer)
    heads: int = Field(default=2, ge=1, le=64)  # attention heads (text_transformer); must divide width
    ffn: int = Field(default=0, ge=0, le=16384)  # feed-forward size (text_transformer); 0 = 4 × width
    dropout: float = Field(default=0.1, ge=0, lt=1)
    kernel_sizes: tuple[int, ...] = Field(default=(3, 4, 5), min_length=1, strict=False)  # text_cnn's n-gram widths
    # text_transformer student of a transformers (BERT-like) teacher: start from the teacher's embeddings and
    # every other layer (DistilBERT, Sanh et al. 2019) where the shapes match (kdpipe.train.text_init)
    init_from_teacher: bool = False

    @model_validator(mode="after")
    def _check(self) -> TextNetParams:
        if self.width % self.heads:
            raise ValueError(f"heads: must divide width ({self.width}), got {self.heads}")
        if any(not 1 <= k <= 16 for k in self.kernel_sizes):
            raise ValueError(f"kernel_sizes: each must be in [1, 16], got {list(self.kernel_sizes)}")
        return self


def check_text_data(data) -> None:
    """What a text dataset asks of the data section (a config.DataConfig): ValueError with the key path."""
    if data.dataset == "textfolder" and not data.folder:
        raise ValueError("folder: required when dataset is textfolder (data/raw/<name> holding <class>/*.txt)")
    if data.dataset == "textfile" and not data.text_params.file:
        raise ValueError("text.file: required when dataset is textfile (a .csv, .tsv or .jsonl in paths.raw)")
    if data.image_size is not None:
        raise ValueError(f"image_size: images only; a text dataset takes data.text.max_length, got {data.image_size}")
    if data.train_subset is not None:
        raise ValueError(f"train_subset: images only for now; sample the text file instead, got {data.train_subset}")
    if data.in_memory is False:
        raise ValueError("in_memory: token ids always live on the device (a few bytes per token); set it to auto")


def check_modality(cfg, is_text_model) -> None:
    """The models, teacher source, augmentation and tokenizer a dataset's modality allows (cfg: a config.Config;
    is_text_model: kdpipe.models.text_nets' check): ValueError otherwise. Loss terms: methods.check_terms_fit_model."""
    text = cfg.data.is_text
    if not text:
        if cfg.teacher.source == "transformers":
            raise ValueError(f"teacher.source: transformers teachers read text; data.dataset {cfg.data.dataset!r} "
                             f"is images (use textfolder or textfile)")
        for section in ("teacher", "student"):
            recipe = getattr(cfg, section)
            if is_text_model(recipe.model) or recipe.text is not None:
                what = f"{section}.model: {recipe.model!r} reads" if is_text_model(recipe.model) else f"{section}.text: for"
                raise ValueError(f"{what} text models; data.dataset {cfg.data.dataset!r} is images")
        return
    for section in ("teacher", "student"):
        recipe = getattr(cfg, section)
        if not recipe._external_model() and not is_text_model(recipe.model):
            raise ValueError(f"{section}.model: {recipe.model!r} reads images; a text dataset takes text_transformer "
                             f"or text_cnn (or teacher.source: transformers)")
        if augments(recipe) or mixes(recipe):
            key = "crop_padding" if recipe.crop_padding else "flip" if recipe.flip else "augment"
            raise ValueError(f"{section}.{key}: image augmentation; text is not augmented (set crop_padding: 0, "
                             f"flip: false, augment: pad_crop, no mixup or cutmix)")
    net = cfg.student.text
    if net is not None and net.init_from_teacher and (cfg.student.model != "text_transformer" or cfg.teacher.ensemble > 1
                                                      or cfg.teacher.model == "text_cnn"):
        raise ValueError("student.text.init_from_teacher: a text_transformer student of one transformer teacher "
                         f"(got student {cfg.student.model}, teacher {cfg.teacher.model} x{cfg.teacher.ensemble})")
    if cfg.teacher.source not in ("train", "transformers"):
        raise ValueError(f"teacher.source: {cfg.teacher.source} brings image models; for text use train "
                         f"(text_transformer) or transformers")
    tokenizer = cfg.data.text_params.tokenizer
    if cfg.teacher.source == "transformers" and tokenizer != cfg.teacher.model:
        raise ValueError(f"data.text.tokenizer: a transformers teacher reads its own tokenizer's ids; set it to "
                         f"teacher.model ({cfg.teacher.model!r}), got {tokenizer!r}")
