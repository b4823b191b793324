"""Resume a training stage after a crash, from its last complete epoch.

DVC deletes a stage's outputs before it reruns the stage, so the state lives outside them, in
`paths.resume/<stage>.pt` (git-ignored, never a DVC output). It is written atomically at the end of every
epoch and holds everything the rest of the run depends on: the models, the optimizer, the generators' states,
early stopping and the best weights so far, and the seeds already finished. It is keyed by a digest of the
stage's params, the data and (for distill) the teacher: a rerun with other params or data starts fresh and
says so. The stage removes it once its outputs are written.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kdpipe.env import is_main


def run_key(*parts: object) -> str:
    """sha256 over JSON-serialisable parts (params dicts, digests): what a resumed run must share."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Resume:
    """One stage's resume file: what a previous, interrupted run of the same key left (`state`), and saving."""

    stage: str
    path: Path
    key: str
    state: dict = field(default_factory=dict)  # {"done": [per finished seed], "current": engine state or None}

    @classmethod
    def open(cls, stage: str, folder: str | Path, key: str) -> Resume:
        """The state left for `key`, or a fresh start (said on stderr when a state for another key is dropped)."""
        path = Path(folder) / f"{stage}.pt"
        state = {"done": [], "current": None}
        if path.exists():
            try:
                loaded = torch.load(path, weights_only=True)
            except Exception as e:  # truncated or foreign: a resume file is a cache, never worth failing for
                loaded = None
                print(f"{stage}: resume state {path} is unreadable ({type(e).__name__}); starting fresh",
                      file=sys.stderr)
            if isinstance(loaded, dict) and loaded.get("key") == key:
                state = loaded["state"]
            elif loaded is not None:
                print(f"{stage}: resume state {path} was made by other params or data; starting fresh",
                      file=sys.stderr)
        return cls(stage, path, key, state)

    def done(self, seed: int) -> dict | None:
        """The saved outcome of `seed` if it finished in an earlier run."""
        return next((d for d in self.state["done"] if d["seed"] == seed), None)

    def current(self, seed: int) -> dict | None:
        """The engine state of `seed` if an earlier run stopped inside it."""
        current = self.state["current"]
        return current if current is not None and current.get("seed") == seed else None

    def save_epoch(self, seed: int, engine_state: dict) -> None:
        self.state["current"] = {**engine_state, "seed": seed}
        self._write()

    def save_done(self, seed: int, outcome: dict) -> None:
        self.state["done"].append({**outcome, "seed": seed})
        self.state["current"] = None
        self._write()

    def announce(self, seed: int) -> None:
        """`<stage>: resumed at seed S, epoch E` when this seed continues an earlier run."""
        current = self.current(seed)
        if current is not None:
            print(f"{self.stage}: resumed at seed {seed}, epoch {current['epoch'] + 1}", file=sys.stderr, flush=True)

    def remove(self) -> None:
        if is_main():  # data-parallel: rank 0 owns the state, as it owns the outputs
            self.path.unlink(missing_ok=True)

    def _write(self) -> None:
        from kdpipe.files import save_torch

        self.path.parent.mkdir(parents=True, exist_ok=True)
        save_torch(self.path, {"key": self.key, "stage": self.stage, "state": self.state})
