"""prepare: raw dataset → seeded stratified train/val(/test) split as uint8 arrays on disk, stats and a digest.

Outputs (paths.prepared): train_x.npy, val_x.npy, test_x.npy (uint8 (N, C, H, W) images, read lazily by the
training stages when they do not fit in memory), dataset.pt (labels, classes, mean/std from train only, digest,
params) and meta.json (the same minus tensors, for people). An image folder is decoded in parallel, a chunk at a
time, straight into its arrays.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from kdpipe.config import Config

STAGE = "prepare"
OUTPUTS = ("prepared",)  # the paths.* folder it writes, checked before any work


def dataset_root(cfg: Config) -> Path:
    """Where load_raw looks: the user's image folder, or the raw-data folder of a named dataset."""
    if cfg.data.dataset in ("imagefolder", "textfolder"):
        return Path(cfg.data.folder)
    if cfg.data.dataset == "textfile":
        return Path(cfg.data.text_params.file)
    return Path(cfg.paths.raw)


def prepare_text(cfg: Config) -> dict:
    """Worker for a text corpus: read (checked UTF-8), split, tokenize; nothing is written."""
    from kdpipe.data import text

    root, params = dataset_root(cfg), cfg.data.text_params
    corpus = (text.load_textfolder(root) if cfg.data.dataset == "textfolder"
              else text.load_textfile(root, params.text_column, params.label_column))
    return text.prepare_text(corpus, params, where=str(root), val_fraction=cfg.data.val_fraction,
                             test_fraction=cfg.data.test_fraction, seed=cfg.seed)


def prepare(cfg: Config, path: Path) -> dict:
    """Worker: load, split and summarise the configured dataset. Files are written only for an image folder,
    whose split arrays are streamed to temporary names beside `path` (Paths.dataset) for save_prepared."""
    import os

    from kdpipe.data.datasets import load_raw
    from kdpipe.data.splits import prepare_dataset, subset

    if cfg.data.is_text:
        return prepare_text(cfg)
    if cfg.data.dataset == "imagefolder":
        from kdpipe.data.imagefolder import prepare_to_disk

        return prepare_to_disk(dataset_root(cfg), cfg.data.image_size, path, val_fraction=cfg.data.val_fraction,
                               test_fraction=cfg.data.test_fraction, seed=cfg.seed,
                               train_subset=cfg.data.train_subset, workers=cfg.data.workers or os.cpu_count() or 1,
                               resize=cfg.data.resize)
    raw = load_raw(cfg.data.dataset, dataset_root(cfg), image_size=cfg.data.image_size,
                   download=cfg.data.download)
    if cfg.data.train_subset:
        raw = subset(raw, cfg.data.train_subset, cfg.seed)
    return prepare_dataset(raw, cfg.data.val_fraction, cfg.data.test_fraction, cfg.seed)


def summary(prepared: dict, cfg: Config) -> dict:
    """meta.json: what a person (or the next stage) needs to know without loading tensors."""
    if cfg.data.is_text:
        return {"dataset": cfg.data.dataset, "modality": "text", "digest": prepared["digest"],
                "classes": prepared["classes"], **{k: prepared[k] for k in ("pad_id", "max_length", "vocab_size")},
                "sizes": {s: len(prepared[f"{s}_y"]) for s in ("train", "val", "test")},
                "class_counts": prepared["class_counts"], "found": prepared["found"],
                "mean_tokens": {s: round(float(prepared[f"{s}_lengths"].float().mean()), 2) for s in ("train", "val", "test")},
                "params": {"seed": cfg.seed, "data": cfg.data.model_dump(mode="json")}}
    return {
        "dataset": cfg.data.dataset,
        "digest": prepared["digest"],
        "classes": prepared["classes"],
        "image_shape": prepared["image_shape"],
        "sizes": {s: len(prepared[f"{s}_y"]) for s in ("train", "val", "test")},
        "class_counts": prepared["class_counts"],
        "mean": prepared["mean"],
        "std": prepared["std"],
        "params": {"seed": cfg.seed, "data": cfg.data.model_dump(mode="json")},
    }


def run(cfg: Config) -> dict:
    from kdpipe import tracking
    from kdpipe.data.prepared import IMAGE_SPLITS, save_prepared
    from kdpipe.files import write_json
    from kdpipe.paths import Paths
    from kdpipe.run import stage

    stage.preflight(cfg, OUTPUTS)
    t0 = time.perf_counter()
    paths = Paths(cfg.paths)
    prepared = prepare(cfg, paths.dataset)
    meta = summary(prepared, cfg)
    try:
        with tracking.stage_run(STAGE, cfg, tags={"dataset": cfg.data.dataset, "dataset_digest": meta["digest"]}) as run:
            save_prepared(paths.dataset, {**prepared, "params": meta["params"]})
            write_json(paths.dataset_meta, meta)
            run.log_metrics({f"{s}_size": n for s, n in meta["sizes"].items()})
            run.log_metrics({"num_classes": len(meta["classes"]), "seconds": time.perf_counter() - t0})
            run.log_artifact(paths.dataset_meta)
    finally:  # an image folder's arrays not moved into place by save_prepared (a failure on the way)
        for key in IMAGE_SPLITS:
            staged = getattr(prepared[key], "path", None)
            if staged is not None and staged.name.startswith("."):
                staged.unlink(missing_ok=True)
    print(f"prepare: {cfg.data.dataset} {meta['sizes']} digest {meta['digest'][:12]}", file=sys.stderr)
    return meta


def main(argv: list[str] | None = None) -> int:
    from kdpipe.run.stage import run_stage

    return run_stage(STAGE, run, argv)


if __name__ == "__main__":
    from kdpipe.run.stage import exit_now

    exit_now(main())
