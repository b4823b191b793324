"""A training recipe's augmentation keys (teacher.* and student.* alike), validated with the rest of params.yaml.

`augment: pad_crop` is the CIFAR recipe (a zero-padded random crop, `crop_padding`, and `flip`), unchanged;
`augment: resized_crop` is the photo recipe of torchvision's classification references and timm: a random-resized
crop (`crop_scale`, `crop_ratio`) and `flip`, colour jitter, mixup / cutmix (kdpipe.data.photo_aug draws and
applies them on the device). `bn_recalibrate` recomputes BatchNorm statistics before each validation score.
pydantic only: kdpipe.config mixes AugmentParams into its TrainConfig, and importing it stays cheap.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PHOTO_KEYS = ("crop_scale", "crop_ratio", "color_jitter", "mixup_alpha", "cutmix_alpha")  # resized_crop only
HARD_LABEL_TERMS = ("dkd",)  # loss terms that need one class per image (DKD's target mask), not mixed labels


class AugmentParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    augment: Literal["pad_crop", "resized_crop"] = "pad_crop"
    # resized_crop: the share of the image's area a crop covers, and its aspect ratio (width / height), drawn
    # uniformly (the ratio on a log scale) as torchvision's RandomResizedCrop does; the crop is resized back
    crop_scale: tuple[float, float] = Field(default=(0.08, 1.0), strict=False)
    crop_ratio: tuple[float, float] = Field(default=(3 / 4, 4 / 3), strict=False)
    # brightness, contrast, saturation strengths s: factors drawn from [max(0, 1 − s), 1 + s]; 0 = off
    color_jitter: tuple[float, float, float] = Field(default=(0.0, 0.0, 0.0), strict=False)
    mixup_alpha: float = Field(default=0.0, ge=0, le=10)  # mixup (Zhang et al. 2018): weight ~ Beta(α, α); 0 = off
    cutmix_alpha: float = Field(default=0.0, ge=0, le=10)  # cutmix (Yun et al. 2019): area ~ Beta(α, α); 0 = off
    # Before each validation score, BatchNorm running statistics recomputed from this many un-augmented training
    # images in one batch (kdpipe.train.precise_bn; keep it to what one forward pass fits); 0 = off. For models
    # whose BatchNorm momentum is small (torchvision's MobileNetV3: 0.01), which short runs otherwise score with
    # the statistics of the untrained net
    bn_recalibrate: int = Field(default=0, ge=0, le=1_000_000)

    @model_validator(mode="after")
    def _check_augment(self) -> AugmentParams:
        defaults = type(self).model_fields
        if self.augment == "pad_crop":
            for key in PHOTO_KEYS:
                if getattr(self, key) != defaults[key].default:
                    raise ValueError(f"{key}: only with augment: resized_crop (pad_crop takes crop_padding and flip)")
        elif getattr(self, "crop_padding", 0):
            raise ValueError("crop_padding: pad_crop's zero padding; set it to 0 with augment: resized_crop")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop_scale: must be [low, high] with 0 < low <= high <= 1, got {list(self.crop_scale)}")
        low, high = self.crop_ratio
        if not 0 < low <= high:
            raise ValueError(f"crop_ratio: must be [low, high] with 0 < low <= high, got {list(self.crop_ratio)}")
        if any(not 0 <= s <= 1 for s in self.color_jitter):
            raise ValueError(f"color_jitter: each strength must be in [0, 1], got {list(self.color_jitter)}")
        return self


def augments(recipe) -> bool:
    """Does the recipe change the training images, so that the teacher's logits of the stored images do not
    describe what the student sees?"""
    return recipe.augment == "resized_crop" or recipe.crop_padding > 0 or recipe.flip


def mixes(recipe) -> bool:
    """Does the recipe mix pairs of images (mixup or cutmix), and so their labels?"""
    return recipe.mixup_alpha > 0 or recipe.cutmix_alpha > 0


def check_distill(student, distill, needs_features: bool, feature_terms: tuple[str, ...]) -> None:
    """What the student's augmentation asks of the distill section (a config.DistillConfig): ValueError with the
    key path otherwise. `needs_features`: the method's terms read teacher features (`feature_terms`)."""
    if distill.teacher_views:
        if not augments(student):
            raise ValueError("distill.teacher_views: the student sees un-augmented images (student.crop_padding "
                             "0, flip false), which the teacher's cached logits already cover; set it to 0")
        if needs_features:
            raise ValueError(f"distill.teacher_views: the method needs teacher features ({', '.join(feature_terms)}), "
                             "which cached views do not hold; set it to 0")
    if mixes(student):
        hard = [t for t in HARD_LABEL_TERMS if distill.resolved_weights().get(t)]
        if hard or distill.focal_gamma is not None:
            what = f"the {hard[0]} term" if hard else "focal loss (distill.focal_gamma)"
            raise ValueError(f"student.mixup_alpha: mixup and cutmix mix the labels, and {what} needs one class "
                             "per image; set student.mixup_alpha and student.cutmix_alpha to 0, or use another method")
