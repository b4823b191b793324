"""Every file the stages exchange, named once. Folders come from params (`paths.*`); file names live here.

dvc.yaml spells the same files for DVC (it cannot import Python); tests/test_dvc_deps.py checks the two agree.
"""

from __future__ import annotations

from pathlib import Path

from kdpipe.config import PathsConfig

ONNX_FILES = {"teacher": "teacher.onnx", "student": "student.onnx",
              # int8 has a folder of its own: a DVC output that exists (maybe empty) whether int8 is on or off
              "int8": "int8/student.int8.onnx"}


class Paths:
    def __init__(self, folders: PathsConfig):
        self.folders = folders
        prepared, self._models = Path(folders.prepared), Path(folders.models)
        self.dataset = prepared / "dataset.pt"  # split tensors, classes, stats, digest (weights_only-loadable)
        self.dataset_meta = prepared / "meta.json"  # the same without tensors, for people
        self.teacher = self._models / "teacher.pt"
        self.teacher_outputs = self._models / "teacher_outputs.pt"  # teacher logits + difficulty over train
        self.predictions = self._models / "predictions.npz"  # evaluate: every model's test and val logits

    def students(self, stage: str) -> Path:
        """The folder of a student stage's per-seed checkpoints."""
        return self._models / stage

    def student(self, stage: str, seed: int) -> Path:
        return self.students(stage) / f"seed{seed}.pt"

    def alongside(self, stage: str, seed: int) -> Path:
        """What trained with student `seed` (a FitNets adapter, a CRD head and its memory banks), beside it."""
        return self.students(stage) / f"seed{seed}_alongside.pt"

    def onnx(self, role: str) -> Path:
        """role: teacher | student | int8."""
        return self._models / ONNX_FILES[role]

    def metrics(self, stage: str) -> Path:
        return Path(self.folders.metrics) / f"{stage}.json"

    def curves(self, stage: str) -> Path:
        """Per-epoch curves, declared as DVC plots."""
        return Path(self.folders.plots) / f"{stage}.csv"

    def reports(self, stage: str) -> Path:
        return Path(self.folders.reports) / stage
