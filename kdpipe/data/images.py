"""One image file as a model sees it, decoded the same way for `prepare` (image folders) and `kdpipe predict`.

Two ways to a square of the stored size (data.resize): "center_crop" (the default for image folders) resizes the
shorter side to the size and keeps the centre square, the evaluation transform of the ImageNet references, so a
640×427 photo keeps its proportions; "stretch" resizes both sides to it. Both resample once, bilinear with
Pillow's antialiasing (its filter widens with the scale when shrinking). numpy and PIL only (PIL imported inside
the functions): predict stays torch-free.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# The files an image folder contributes, for prepare (imagefolder datasets) and predict (folders) alike.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
RESIZES = ("center_crop", "stretch")  # data.resize; also the "resize" entry of an exported model's metadata


def load_image(path: str | Path, mode: str, size: tuple[int, int], resize: str = "stretch") -> np.ndarray:
    """uint8 (H, W) for mode "L" or (H, W, 3) for "RGB", resized (bilinear, antialiased) to size = (W, H): both
    sides stretched to it, or with resize "center_crop" the centre box of the target's aspect ratio taken
    (crop_box) and resampled to it in the same single pass.

    16-bit grey (Pillow modes I;16* and I) is scaled to 8 bits, v / 257 rounded (65535 → 255): Pillow's own
    convert("L") clips every value above 255 to white. An alpha channel is dropped, not blended. Pillow's
    errors (missing, unidentified or truncated files) propagate for the caller to name the file.
    """
    from PIL import Image

    with Image.open(path) as image:
        if image.mode == "I" or image.mode.startswith("I;16"):
            scaled = np.clip(np.rint(np.asarray(image, dtype=np.float64) / 257.0), 0, 255)  # (H, W) 0..65535
            image = Image.fromarray(scaled.astype(np.uint8))
        image = image.convert(mode)
        box = crop_box(image.size, size) if resize == "center_crop" else None
        image = image.resize(size, Image.Resampling.BILINEAR, box=box)
        return np.asarray(image, dtype=np.uint8)


def crop_box(source: tuple[int, int], target: tuple[int, int]) -> tuple[float, float, float, float] | None:
    """(left, upper, right, lower) of the centred box of `source` = (W, H) with the aspect ratio of `target`:
    resampling it to `target` is "shorter side resized to the target, then centre-cropped", in one pass (no
    rounding of an intermediate size). None when the aspect ratios agree already (the whole image)."""
    (w, h), (tw, th) = source, target
    if w * th == h * tw:
        return None
    if w * th > h * tw:  # wider than the target: keep the full height
        keep = h * tw / th
        return ((w - keep) / 2, 0.0, (w + keep) / 2, float(h))
    keep = w * th / tw
    return (0.0, (h - keep) / 2, float(w), (h + keep) / 2)


def describe(resize: str, mode: str, size: tuple[int, int]) -> str:
    """The preprocessing in words, for an exported model's metadata: what a consumer must do to an image file."""
    w, h = size
    colour = "grey (L)" if mode == "L" else "RGB"
    how = (f"shorter side resized to {min(w, h)} then centre crop {w}x{h}" if resize == "center_crop"
           else f"resized to {w}x{h} (aspect ratio not kept)")
    return f"{colour}, {how}, bilinear with antialiasing (Pillow), uint8 / 255"


def prepared_resize(data_params: dict) -> str:
    """How a prepared dataset's images were made square, from the data params prepare recorded: data.resize for an
    image folder (one prepared before the param existed was stretched), "stretch" for the fixed-size datasets,
    which are stored as they come (and which predict has always stretched other images to)."""
    if data_params.get("dataset") != "imagefolder":
        return "stretch"
    return data_params.get("resize", "stretch")
