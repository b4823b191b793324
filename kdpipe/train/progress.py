"""Progress of a training run: a bar on a terminal, one line per epoch in logs."""

from __future__ import annotations

import sys
from collections.abc import Callable

from kdpipe.env import is_main


def progress_bar(total: int, desc: str) -> Callable[[dict], None]:
    """A tqdm bar on a terminal; one plain line per epoch in logs (DVC, Prefect, CI); nothing from data-parallel
    ranks other than 0."""
    if not is_main():
        return lambda row: None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, unit="epoch", leave=True)

        def update(row: dict) -> None:
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_acc=f"{row['val_accuracy']:.4f}")
            bar.update(1)
            if row["epoch"] == total:
                bar.close()

        return update

    def line(row: dict) -> None:
        print(
            f"{desc} epoch {row['epoch']}/{total} loss {row['train_loss']:.4f} "
            f"train_acc {row['train_accuracy']:.4f} val_acc {row['val_accuracy']:.4f} ({row['seconds']:.1f}s)",
            file=sys.stderr,
            flush=True,
        )

    return line
