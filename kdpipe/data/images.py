"""One image file as a model sees it, decoded the same way for `prepare` (image folders) and `kdpipe predict`.

numpy and PIL only (PIL imported inside the function): predict stays torch-free.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# The files an image folder contributes, for prepare (imagefolder datasets) and predict (folders) alike.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def load_image(path: str | Path, mode: str, size: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W) for mode "L" or (H, W, 3) for "RGB", resized (bilinear) to size = (W, H).

    16-bit grey (Pillow modes I;16* and I) is scaled to 8 bits, v / 257 rounded (65535 → 255): Pillow's own
    convert("L") clips every value above 255 to white. An alpha channel is dropped, not blended. Pillow's
    errors (missing, unidentified or truncated files) propagate for the caller to name the file.
    """
    from PIL import Image

    with Image.open(path) as image:
        if image.mode == "I" or image.mode.startswith("I;16"):
            scaled = np.clip(np.rint(np.asarray(image, dtype=np.float64) / 257.0), 0, 255)  # (H, W) 0..65535
            image = Image.fromarray(scaled.astype(np.uint8))
        image = image.convert(mode).resize(size, Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8)
