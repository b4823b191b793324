"""The registered text model: an MLflow pyfunc that takes raw strings, tokenizes them with the logged
tokenizer.json and runs the logged ONNX file (text_runtime.TextClassifier), so `mlflow models serve` answers
text. It is logged as MLflow "models from code" (MODEL_SCRIPT, a three-line script, not a pickle: loading it runs
only that script), with this file, text_runtime.py and the two package __init__ files as its code (`code_paths`),
and needs only mlflow, numpy, pandas, onnxruntime and tokenizers where it is served.

Input: a DataFrame with a `text` column (or one column of strings), a list of strings, or one string. Output: a
DataFrame, one row per text: `label` (the class name), `label_index`, `probabilities` (one per class, in the
order of the model's classes, which its registered model's `classes` tag lists).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import mlflow.pyfunc

from kdpipe.ship.text_runtime import TextClassifier, as_texts

ONNX_ARTIFACT, TOKENIZER_ARTIFACT = "model.onnx", "tokenizer.json"  # the artifacts' keys and file names
MODEL_SCRIPT = '''# kdpipe's registered text model (MLflow models from code): TextPyfunc of kdpipe/ship/text_pyfunc.py
import mlflow.models

from kdpipe.ship.text_pyfunc import TextPyfunc

mlflow.models.set_model(TextPyfunc())
'''


with warnings.catch_warnings():  # MLflow suggests type hints; this model checks its input itself (as_texts)
    warnings.simplefilter("ignore", UserWarning)

    class TextPyfunc(mlflow.pyfunc.PythonModel):
        def load_context(self, context) -> None:
            self.model = TextClassifier(context.artifacts[ONNX_ARTIFACT], context.artifacts[TOKENIZER_ARTIFACT])

        def predict(self, context, model_input, params=None):
            import pandas as pd

            probs = self.model.probabilities(as_texts(model_input))  # (N, K)
            best = probs.argmax(1)
            return pd.DataFrame({"label": [self.model.classes[i] for i in best], "label_index": best.astype(int),
                                 "probabilities": [row.tolist() for row in probs]})


def code_paths(folder: Path) -> list[str]:
    """The package files the logged model needs, copied as kdpipe/ship/... under `folder`: MLflow puts them on the
    server's path, so MODEL_SCRIPT's import works where kdpipe is not installed."""
    import shutil

    here = Path(__file__).parent
    package = folder / "kdpipe"
    (package / "ship").mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text('"""kdpipe: the files a registered text model needs."""\n')
    shutil.copy(here / "__init__.py", package / "ship" / "__init__.py")
    for name in ("text_runtime.py", "text_pyfunc.py"):
        shutil.copy(here / name, package / "ship" / name)
    return [str(package)]


def log_model(entry, texts: list[str], tokenizer: Path, requirements: list[str]):
    """TextPyfunc logged into the active run and registered as `entry.name` (a registrations.Registration), with
    the ONNX file and tokenizer.json as its artifacts and `requirements` plus tokenizers and pandas pinned. Its
    input schema is one unnamed string column, so a list of strings, a one-column DataFrame (e.g. `text`), REST
    `{"inputs": [...]}` and `dataframe_records` all reach it."""
    import shutil
    import tempfile
    from importlib.metadata import version

    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types import ColSpec, Schema

    model = TextPyfunc()
    model.model = TextClassifier(entry.onnx_path, tokenizer)
    with warnings.catch_warnings():  # "integer columns cannot represent missing values": label_index never is
        warnings.simplefilter("ignore", UserWarning)
        outputs = infer_signature(texts, model.predict(None, texts)).outputs
    requirements = [*requirements, *(f"{name}=={version(name)}" for name in ("tokenizers", "pandas"))]
    with tempfile.TemporaryDirectory(prefix="kdpipe-pyfunc-") as tmp:
        artifacts = {ONNX_ARTIFACT: Path(tmp, ONNX_ARTIFACT), TOKENIZER_ARTIFACT: Path(tmp, TOKENIZER_ARTIFACT)}
        for source, copy in zip((entry.onnx_path, tokenizer), artifacts.values(), strict=True):
            shutil.copyfile(source, copy)  # logged under artifacts/ by these names, whatever the files are called
        script = Path(tmp, "text_model.py")
        script.write_text(MODEL_SCRIPT)
        return mlflow.pyfunc.log_model(
            name=entry.artifact_name, python_model=str(script), registered_model_name=entry.name,
            artifacts={key: str(path) for key, path in artifacts.items()},
            code_paths=code_paths(Path(tmp, "code")), input_example=texts, pip_requirements=requirements,
            signature=ModelSignature(inputs=Schema([ColSpec("string")]), outputs=outputs))
