"""`kdpipe predict`: top-k classes of images, or of texts, with an exported model, using onnxruntime, PIL and
numpy only (and `tokenizers` for a text model).

No torch here, nor any kdpipe module that imports it: this is the path a model takes outside the training
environment. A registry URI (models:/name@alias, models:/name/3) is downloaded with mlflow first, through
kdpipe.ship.registry. Everything the model needs is in the ONNX file's metadata: class names, the input size
C×H×W, how an image file becomes that input ("resize": center_crop or stretch) and the contract float32
(N, C, H, W) in [0, 1] with normalisation inside the graph.

Images are read as the prepare stage read the images evaluate scored (kdpipe.data.images, the same function: grey
or RGB by the model's channels, an alpha channel dropped, 16-bit grey scaled to 8 bits, the shorter side resized
and the centre square kept, or stretched for a model whose data was), so a photo of any size gets the class
evaluate would give it. A model exported before the "resize" entry existed is read by stretching, as then. A
folder stands for the image files directly inside it.

A text model (metadata modality: text) takes the arguments as texts: tokenized with the tokenizer.json the file
carries (prepare's, with its max_length and truncation side), then run (kdpipe.ship.text_runtime, torch-free).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from kdpipe.data.images import IMAGE_EXTENSIONS
from kdpipe.errors import EXIT_USER_ERROR, UserError
from kdpipe.ship.text_runtime import softmax  # numpy only: one softmax for image and text models


class PredictError(UserError):
    """Bad model or image: one line naming it."""


def model_path(model: str, tracking_uri: str | None, download_to: str | Path) -> Path:
    """A local .onnx path, or the model.onnx of a models:/ registry URI downloaded into `download_to`."""
    if model.startswith("models:/"):
        from kdpipe.ship import registry

        try:
            return registry.download_onnx(model, tracking_uri or default_tracking_uri(), download_to)
        except registry.RegistryError as e:
            raise PredictError(str(e)) from None
    path = Path(model)
    if not path.is_file():
        raise PredictError(f"{model}: model file not found; pass an .onnx file or a models:/ registry URI")
    return path


def default_tracking_uri() -> str:
    """The store the stages default to: MLFLOW_TRACKING_URI, else the sqlite file in the current directory."""
    from kdpipe.config import TrackingConfig
    from kdpipe.store import tracking_uri

    return tracking_uri(TrackingConfig())


def reason(e: BaseException) -> str:
    """An exception as a short phrase for a one-line message."""
    text = getattr(e, "strerror", None) or str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load(path: Path):
    """(onnxruntime session, class names, (C, H, W), resize) from an exported file's metadata."""
    import onnxruntime

    check_external_data(path)
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for unreadable files
        raise PredictError(f"{path}: onnxruntime cannot load it ({type(e).__name__}); re-export the model "
                           "or download it again") from None
    meta = session.get_modelmeta().custom_metadata_map
    shape = input_shape(meta, session)
    classes = json.loads(meta["classes"]) if "classes" in meta else None
    return session, classes, shape, resize_of(meta)


def resize_of(meta: dict[str, str]) -> str:
    """The metadata's "resize" (center_crop | stretch); "stretch" for models exported before it was recorded."""
    from kdpipe.data.images import RESIZES

    resize = meta.get("resize", "stretch")
    if resize not in RESIZES:
        raise PredictError(f"the model's metadata asks for resize {resize!r}; this kdpipe knows {', '.join(RESIZES)}")
    return resize


def check_external_data(path: Path) -> dict[str, str]:
    """Refuse a model whose tensors take their data from a file outside the model's folder (an absolute
    path, or ../ out of it), before onnxruntime opens anything: a crafted model could make it read any file.
    Returns the model's metadata."""
    import onnx

    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf and onnx raise several types for a corrupt file
        raise PredictError(f"{path}: not a readable ONNX model ({reason(e)}); re-export the model or download "
                           "it again") from None
    folder = path.parent.resolve()
    for tensor in graph_tensors(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "")
        if Path(location).is_absolute() or not (folder / location).resolve().is_relative_to(folder):
            raise PredictError(f"{path}: tensor {tensor.name!r} takes its data from {location!r}, outside the "
                               "model's folder; refusing to load it (only use models you trust)")
    return {p.key: p.value for p in proto.metadata_props}


def graph_tensors(graph):
    """Every tensor a graph holds: initializers and node-attribute constants, subgraphs included."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from graph_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from graph_tensors(subgraph)


def input_shape(meta: dict[str, str], session) -> tuple[int, int, int]:
    """(C, H, W) from the "input_size" metadata ("1x8x8"), else from the graph's input."""
    if "input_size" in meta:
        c, h, w = (int(v) for v in meta["input_size"].split("x"))
        return c, h, w
    dims = session.get_inputs()[0].shape[1:]
    if len(dims) != 3 or not all(isinstance(d, int) for d in dims):
        raise PredictError("the model has no input_size metadata and no fixed (C, H, W) input")
    return tuple(dims)


def image_files(paths: list[str]) -> list[Path]:
    """The images to classify: files as given, each folder replaced by the image files directly inside it
    (sorted by name). A folder without any is an error."""
    files = []
    for path in map(Path, paths):
        if not path.is_dir():
            files.append(path)
            continue
        found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not found:
            raise PredictError(f"{path}: folder holds no images ({' '.join(IMAGE_EXTENSIONS)}); pass image "
                               "files or a folder of them")
        files += found
    return files


def read_image(path: str | Path, shape: tuple[int, int, int], resize: str = "stretch") -> np.ndarray:
    """One image as float32 (C, H, W) in [0, 1]: grey (L) or RGB by the model's channels (alpha dropped, as
    the prepare stage does), 16-bit grey scaled to 8 bits, resized to H×W by `resize` (kdpipe.data.images)."""
    from PIL import Image, UnidentifiedImageError

    from kdpipe.data.images import load_image

    c, h, w = shape
    if c not in (1, 3):
        raise PredictError(f"the model takes {c} channels; only 1 (grey) and 3 (RGB) images are supported")
    try:
        pixels = load_image(path, "L" if c == 1 else "RGB", (w, h), resize).astype(np.float32) / 255.0  # (H, W[, 3])
    except FileNotFoundError:
        raise PredictError(f"{path}: image not found") from None
    except UnidentifiedImageError:
        raise PredictError(f"{path}: not an image Pillow can identify; pass PNG, JPEG, BMP, GIF or WebP "
                           "files") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise PredictError(f"{path}: unreadable image ({reason(e)}); re-save or replace the file") from None
    return pixels[None] if c == 1 else pixels.transpose(2, 0, 1)  # (1, H, W), or (H, W, 3) -> (3, H, W)


def predict(model: str, images: list[str], top: int = 3, tracking_uri: str | None = None) -> list[dict]:
    """[{image, top: [(class, probability), ...]}] for each image (folders expanded), best first."""
    import tempfile

    if top < 1:
        raise PredictError(f"--top: must be >= 1 (how many classes to show per image), got {top}")
    local = None if model.startswith("models:/") else model_path(model, tracking_uri, "")
    files = None if local is not None and is_text(local) else image_files(images)  # before any download
    with tempfile.TemporaryDirectory(prefix="kdpipe-predict-") as tmp:
        path = local or model_path(model, tracking_uri, tmp)
        if files is None or is_text(path):
            return predict_texts(path, images, top)
        session, classes, shape, resize = load(path)  # the session holds the model
    batch = np.stack([read_image(p, shape, resize) for p in files])  # (N, C, H, W) float32
    logits = session.run(None, {session.get_inputs()[0].name: batch})[0]  # (N, K)
    probs = softmax(logits.astype(np.float64))
    classes = classes or [str(i) for i in range(probs.shape[1])]
    k = min(top, probs.shape[1])
    return [{"image": str(p), "top": [(classes[j], float(row[j])) for j in np.argsort(-row)[:k]]}
            for p, row in zip(files, probs, strict=True)]


def is_text(path: Path) -> bool:
    return check_external_data(path).get("modality") == "text"


def predict_texts(path: Path, texts: list[str], top: int) -> list[dict]:
    """[{text, top: [(class, probability), ...]}] for each text, best first (kdpipe.ship.text_runtime)."""
    from kdpipe.ship.text_runtime import TextClassifier, TextModelError  # numpy only; tokenizers when used

    try:
        model = TextClassifier(path)
        probs = model.probabilities(texts)  # (N, K)
    except ModuleNotFoundError as e:
        raise PredictError(f"{path}: a text model needs the {e.name} package: pip install 'kdpipe[text]'") from None
    except TextModelError as e:
        raise PredictError(str(e)) from None
    k = min(top, probs.shape[1])
    return [{"text": t, "top": [(model.classes[j], float(row[j])) for j in np.argsort(-row)[:k]]}
            for t, row in zip(texts, probs, strict=True)]


def format_results(results: list[dict]) -> str:
    lines = []
    for r in results:
        lines.append(r["image"] if "image" in r else json.dumps(r["text"][:80], ensure_ascii=False))
        lines += [f"  {rank}. {name}  {prob:.4f}" for rank, (name, prob) in enumerate(r["top"], 1)]
    return "\n".join(lines)


def main(args) -> int:
    """`kdpipe predict` (args from cli.py): prints the results, or one error line and exit 2."""
    try:
        print(format_results(predict(args.model, args.images, args.top, args.tracking_uri)))
    except PredictError as e:
        print(f"kdpipe predict: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0
