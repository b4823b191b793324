"""The params sections that check nothing beyond their own fields (evaluate, export, tracking, runtime, paths),
and the base every section shares. kdpipe/config.py, the only reader of params.yaml, re-exports them: import
them from there.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)  # strict: no true → 1, no "0.05" → 0.05


class EvaluateConfig(_Section):
    """How the evaluate stage (and the export gate) weigh differences: the paired bootstrap and calibration bins."""

    confidence: float = Field(default=0.95, gt=0.5, lt=1)  # level of every interval (kdpipe/evidence.py)
    bootstrap_samples: int = Field(default=10_000, ge=1_000, le=1_000_000)  # replicates per interval
    bootstrap_seed: int = Field(default=0, ge=0, lt=2**32)  # same seed, same intervals, bit for bit
    calibration_bins: int = Field(default=15, ge=2, le=100)  # equal-width confidence bins of ECE (Guo et al.)


class ExportConfig(_Section):
    """ONNX export, its checks, int8, and the MLflow registry gate."""

    opset: int = Field(default=17, ge=17, le=23)
    parity_atol: float = Field(default=1e-4, gt=0)  # max |Δlogit| onnxruntime vs PyTorch on the test split
    parity_min_agreement: float = Field(default=0.999, gt=0, le=1)  # argmax agreement required
    latency_repeats: int = Field(default=30, ge=3)
    latency_threads: int = Field(default=1, ge=1)  # onnxruntime intra-op threads for the latency figures
    int8: bool = True
    int8_max_accuracy_drop: float = Field(default=0.01, ge=0, le=1)  # register int8 only within this val drop
    calibration_images: int = Field(default=256, ge=8)  # int8 calibration sample from the train split
    registry: bool = True  # register versions in the MLflow model registry
    registered_model: str = Field(default="kdpipe-student", min_length=1)
    teacher_registered_model: str = Field(default="kdpipe-teacher", min_length=1)
    promote: bool | Literal["auto"] = "auto"  # may move champion; auto: not in a `dvc exp run` (ship/gate.py)
    # evidence: champion moves only to a version better beyond noise (paired interval above 0), and a version
    # is refused for losing to scratch only when it loses beyond noise; point: compare the two accuracies
    promote_rule: Literal["evidence", "point"] = "evidence"
    # true: the shipped student's logits divided by the temperature evaluate fitted on validation (calibration;
    # argmax, so accuracy and the gate, unchanged); false: exported as trained, the temperature only reported
    temperature_scale: bool = False


class TrackingConfig(_Section):
    experiment: str = Field(default="kdpipe", min_length=1)
    uri: str | None = None  # None: sqlite mlflow.db in the repo root; MLFLOW_TRACKING_URI overrides both
    system_metrics: bool = True


class RuntimeConfig(_Section):
    """How the training stages compute: the numbers they give depend on it, so it is a params section."""

    # auto: bf16 autocast on GPUs and CPUs with native bf16, fp16 + loss scaling on older GPUs, else fp32
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool = True  # NHWC memory layout for convolutional models and their inputs
    compile: bool = False  # torch.compile the models (pays only on long runs: compile time is minutes)
    # teacher, scratch and distill as N data-parallel processes (torch.distributed: gloo on CPU, NCCL on GPUs)
    processes: int = Field(default=1, ge=1, le=1024)
    sync_batchnorm: bool = False  # with processes > 1: BatchNorm statistics over the global batch (SyncBatchNorm)
    reproducible: bool = False  # CPU kernels pinned to AVX2 (kdpipe/run/kernels.py), fp32, eager: the same bits on x86-64


class PathsConfig(_Section):
    raw: str = "data/raw"
    downloads: str = "data/downloads"
    prepared: str = "data/prepared"
    models: str = "models"
    metrics: str = "metrics"
    plots: str = "plots"
    reports: str = "reports"
    resume: str = ".kdpipe/resume"  # interrupted training stages' state: git-ignored, never a DVC output
