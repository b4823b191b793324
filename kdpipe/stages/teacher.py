"""teacher: train the teacher on the prepared train split (early stopping on val), or bring one.

`teacher.source: train` trains `teacher.model` with the teacher recipe; `teacher.source: checkpoint` loads
`teacher.checkpoint` (a kdpipe checkpoint, or a bare state dict of `teacher.model`) and only evaluates it;
`teacher.source: registry` fetches the kdpipe checkpoint that the export stage logged beside a registered
teacher version (`teacher.registry_uri`, e.g. models:/kdpipe-teacher@champion) and goes on as `checkpoint`;
`teacher.source: torchvision` builds `teacher.model` tv:<name> with torchvision's pretrained `teacher.weights`,
read from the torch hub cache (TORCH_HOME), with a new head for the dataset's classes. `teacher.finetune: true`
trains any brought teacher further with the teacher recipe. `teacher.ensemble: N` trains N teachers with seeds
seed, seed+1, ...: the first is "the teacher" (scored, exported), the others ride along in its checkpoint, and
distillation, the cached logits and the curriculum see their averaged logits.
Outputs: models/teacher.pt (weights + params, weights_only-loadable), models/teacher_outputs.pt,
metrics/teacher.json, plots/teacher.csv.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from kdpipe.config import Config

STAGE = "teacher"
OUTPUTS = ("models", "metrics", "plots")  # the paths.* folders it writes, checked before any work


def new_teacher(cfg: Config, prepared: dict, rt):
    """teacher.model, freshly initialised for this dataset, on the device."""
    from kdpipe.models.text_nets import build_text_for
    from kdpipe.models.zoo import build_model

    if prepared.get("modality") == "text":
        from kdpipe.config import TextNetParams

        return rt.prepare(build_text_for(cfg.teacher.model, cfg.teacher.text or TextNetParams(), prepared))
    c = prepared["image_shape"][0]
    return rt.prepare(build_model(cfg.teacher.model, c, len(prepared["classes"]), mean=prepared["mean"],
                                  std=prepared["std"], input_size=cfg.teacher.input_size))


def train_teacher(cfg: Config, prepared: dict, rt, splits, on_epoch=None, resume=None, model=None, seed=None):
    """Worker: build and fit the teacher (with `seed`, default the params' seed), or fine-tune `model` (a brought
    teacher), from where an interrupted run left it with `resume` (a kdpipe.train.resume.Resume); (model, FitResult)."""
    from kdpipe.train.engine import fit
    from kdpipe.train.guards import check_learned

    seed, brought = cfg.seed if seed is None else seed, model is not None
    if model is None:  # a brought teacher is prepared already (run() scores it whether or not it trains)
        model = new_teacher(cfg, prepared, rt)
    train, val, _ = splits
    if resume:
        resume.announce(seed)
    desc = STAGE if seed == cfg.seed else f"{STAGE} seed {seed}"
    result = fit(model, train, val, cfg.teacher, rt, seed=seed, on_epoch=on_epoch, desc=desc,
                 state=resume.current(seed) if resume else None,
                 on_state=(lambda state: resume.save_epoch(seed, state)) if resume else None)
    if cfg.teacher.chance_guard:  # before anything is written: a collapsed teacher never replaces the last one
        check_learned(result, val.y, cfg.teacher, stage=STAGE, seed=seed, section="teacher", from_scratch=not brought)
    return model, result


def train_ensemble(cfg: Config, ctx, resume, log_epoch) -> list[tuple]:
    """teacher.ensemble N > 1: N teachers, seeds seed .. seed+N−1, as [(seed, model, FitResult)]. The first starts
    from the stage's own seeding, as a single teacher does; each finished member is kept by `resume`, so a rerun
    after a kill trains only what is left."""
    import dataclasses

    from kdpipe.run.runtime import seed_everything
    from kdpipe.train.engine import FitResult

    members = []
    for k in range(cfg.teacher.ensemble):
        seed = cfg.seed + k
        if k:
            seed_everything(seed)
        done = resume.done(seed) if resume else None
        if done is not None:
            model = new_teacher(cfg, ctx.prepared, ctx.rt)
            model.load_state_dict(done["model"])
            members.append((seed, model, FitResult(**done["result"])))
            continue
        on_epoch = log_epoch if k == 0 else (lambda row, k=k: log_epoch(row, prefix=f"member{k}/"))
        model, result = train_teacher(cfg, ctx.prepared, ctx.rt, ctx.splits, on_epoch=on_epoch, resume=resume,
                                      seed=seed)
        if resume:
            resume.save_done(seed, {"model": model.state_dict(), "result": dataclasses.asdict(result)})
        members.append((seed, model, result))
    return members


def bring_teacher(cfg: Config, prepared: dict, path: str | Path | None = None, where: str | None = None):
    """Load a user's teacher (`path`, default teacher.checkpoint) and check it fits this dataset (classes,
    channels) before any work. `where` names it in errors (default "teacher.checkpoint: <path>")."""
    from kdpipe.models.checkpoint import CheckpointError, build_from_checkpoint

    c, n = prepared["image_shape"][0], len(prepared["classes"])
    path = path or cfg.teacher.checkpoint
    prefix = where or "teacher.checkpoint"  # the loader's own errors name the file already
    where = where or f"teacher.checkpoint: {path}"
    fix = (f"bring a teacher made for this dataset ({n} classes, {c} channel(s)), as a kdpipe checkpoint or a "
           f"state dict of teacher.model ({cfg.teacher.model}), or set teacher.source: train")
    try:
        model, ckpt = build_from_checkpoint(path, fallback_model=cfg.teacher.model, in_channels=c, num_classes=n,
                                            mean=prepared["mean"], std=prepared["std"], finetune=cfg.teacher.finetune)
    except CheckpointError as e:
        raise CheckpointError(f"{prefix}: {e}; {fix}") from None
    if model.num_classes != n:
        raise CheckpointError(f"{where} has {model.num_classes} classes, the dataset has {n}; {fix}")
    if model.in_channels != c:
        raise CheckpointError(f"{where} takes {model.in_channels} channels, the dataset has {c}; {fix}")
    if cfg.teacher.input_size is not None:  # the param wins over what the checkpoint was trained at
        model.input_size = cfg.teacher.input_size
    if "classes" in ckpt and list(ckpt["classes"]) != list(prepared["classes"]):
        raise CheckpointError(f"{where} was trained on classes {ckpt['classes'][:3]}..., "
                              f"not this dataset's {prepared['classes'][:3]}...; {fix}")
    return model


def torchvision_teacher(cfg: Config, prepared: dict):
    """teacher.model tv:<name> with torchvision's pretrained teacher.weights, from the torch hub cache; its head
    is new for this dataset's classes, so it must be fine-tuned (teacher.finetune) unless the classes match."""
    from kdpipe.models.zoo import WeightsError, pretrained_torchvision, torchvision_weights

    arch, n = cfg.teacher.model.removeprefix("tv:"), len(prepared["classes"])
    trained_on = len(torchvision_weights(arch, cfg.teacher.weights).meta["categories"])
    if trained_on != n and not cfg.teacher.finetune:
        raise WeightsError(f"teacher.finetune: {cfg.teacher.weights} predicts {trained_on} classes, the dataset has "
                           f"{n}: set teacher.finetune: true to train a new head (with the teacher recipe)")
    return pretrained_torchvision(arch, cfg.teacher.weights, prepared["image_shape"][0], n, cfg.teacher.input_size)


def transformers_teacher(cfg: Config, prepared: dict):
    """teacher.model, a transformers folder or hub id in the local cache, with a head for these classes."""
    from kdpipe.models.hf_teacher import teacher_for

    return teacher_for(cfg.teacher.model, prepared, cfg.teacher.finetune)


def registry_teacher(cfg: Config, prepared: dict):
    """The teacher registered at teacher.registry_uri: its logged kdpipe checkpoint, then as bring_teacher.
    A missing model, alias, version or checkpoint is a user error naming the URI."""
    import tempfile

    from kdpipe import store
    from kdpipe.models.checkpoint import CheckpointError
    from kdpipe.ship import registry

    uri = cfg.teacher.registry_uri
    with tempfile.TemporaryDirectory(prefix="kdpipe-teacher-") as tmp:
        try:
            path = registry.download_teacher_checkpoint(uri, store.tracking_uri(cfg.tracking), tmp)
        except registry.RegistryError as e:
            raise CheckpointError(f"teacher.registry_uri: {e}") from None
        return bring_teacher(cfg, prepared, path, where=f"teacher.registry_uri: {uri}")


def save_teacher_outputs(path: Path, model, train, rt, digest: str) -> None:
    """The teacher's logits over the un-augmented train split and its per-sample difficulty (its loss on the
    true label), computed once: distillation without augmentation and the curriculum read them here."""
    from kdpipe.distill.curriculum import difficulty_from_teacher
    from kdpipe.files import save_torch
    from kdpipe.train.inference import predict

    logits = predict(model, train.x, rt)  # (N_train, K) fp32
    save_torch(path, {"train_logits": logits, "difficulty": difficulty_from_teacher(logits, train.y.cpu()),
                      "dataset_digest": digest})


def ensemble_metrics(ctx, members: list[tuple]) -> dict:
    """Each member and the ensemble (the mean of their logits, as models.Ensemble computes it) scored on val and
    test, in fp32: one forward pass per member and split."""
    import torch

    from kdpipe.train.inference import predict

    _, val, test = ctx.splits
    exact = ctx.rt.exact()
    logits = {name: [predict(model, split.x, exact) for _, model, _ in members]
              for name, split in (("val", val), ("test", test))}
    labels = {"val": val.y.cpu(), "test": test.y.cpu()}

    def accuracies(pick) -> dict:
        return {f"{name}_accuracy": (pick(z).argmax(1) == labels[name]).float().mean().item()
                for name, z in logits.items()}

    return {"size": len(members), **accuracies(lambda z: torch.stack(z).mean(0)),
            "members": [{"seed": seed, **accuracies(lambda z, i=i: z[i]), "epochs_run": result.epochs_run}
                        for i, (seed, _, result) in enumerate(members)]}


def teacher_metrics(ctx, model, result, train_seconds: float, params: dict) -> dict:
    """metrics/teacher.json: the restored best teacher scored on val and test, and how it was obtained."""
    from kdpipe.models.zoo import count_parameters
    from kdpipe.train.inference import score

    _, val, test = ctx.splits
    exact = ctx.rt.exact()  # reported scores: the fp32 weights that are saved, as evaluate and export see them
    val_m, test_m = score(model, val, exact), score(model, test, exact)
    return {
        "val_accuracy": val_m["accuracy"], "test_accuracy": test_m["accuracy"],
        "val_loss": val_m["loss"], "test_loss": test_m["loss"],
        "epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early, "train_seconds": round(train_seconds, 2),
        "num_parameters": count_parameters(model), "model": model.name, "source": ctx.cfg.teacher.source,
        "precision": ctx.rt.precision, "reproducible": ctx.rt.reproducible, "dataset_digest": ctx.digest,
        "params": params,
    }


def write_outputs(ctx, model, result, metrics: dict, members: list[tuple] = ()) -> None:
    """models/teacher.pt (with the other ensemble members inside), models/teacher_outputs.pt (the ensemble's
    logits when there is one), metrics/teacher.json, plots/teacher.csv."""
    from kdpipe.files import write_csv, write_json
    from kdpipe.models.checkpoint import save_checkpoint
    from kdpipe.models.zoo import Ensemble

    paths = ctx.paths
    others = [{"seed": seed, "state_dict": {k: v.detach().cpu() for k, v in m.state_dict().items()}}
              for seed, m, _ in members[1:]]
    save_checkpoint(paths.teacher, model, classes=ctx.prepared["classes"], params=metrics["params"],
                    extra={"dataset_digest": ctx.digest, **({"ensemble": others} if others else {}),
                           "metrics": {k: metrics[k] for k in ("val_accuracy", "test_accuracy")}})
    teacher = Ensemble([m for _, m, _ in members]) if members else model
    save_teacher_outputs(paths.teacher_outputs, teacher, ctx.splits[0], ctx.rt, ctx.digest)
    write_json(paths.metrics(STAGE), metrics)
    write_csv(paths.curves(STAGE), result.history or [{"epoch": 0}])


def run(cfg: Config) -> dict:
    from kdpipe import tracking
    from kdpipe.run import stage
    from kdpipe.train.engine import FitResult
    from kdpipe.train.resume import Resume, run_key

    ctx = stage.start(cfg, OUTPUTS)
    bring = {"checkpoint": bring_teacher, "registry": registry_teacher,
             "torchvision": torchvision_teacher, "transformers": transformers_teacher}.get(cfg.teacher.source)
    brought = ctx.rt.prepare(bring(cfg, ctx.prepared)) if bring else None
    params = {"seed": cfg.seed, "data": cfg.data.model_dump(mode="json"), "teacher": cfg.teacher.model_dump(mode="json"),
              "runtime": cfg.runtime.model_dump(mode="json")}
    tags = ctx.tags(teacher_source=cfg.teacher.source, model=cfg.teacher.model)
    trains = brought is None or cfg.teacher.finetune
    resume = None
    if trains:  # the brought weights are hashed only when a run from them could be resumed
        key = run_key(STAGE, params, ctx.digest, state_digest(brought) if brought is not None else "")
        resume = Resume.open(STAGE, cfg.paths.resume, key)
    with tracking.stage_run(STAGE, cfg, tags=tags) as run:
        t0 = time.perf_counter()
        members = []
        if cfg.teacher.ensemble > 1:
            members = train_ensemble(cfg, ctx, resume, run.log_epoch)
            _, model, result = members[0]
        elif trains:
            model, result = train_teacher(cfg, ctx.prepared, ctx.rt, ctx.splits, on_epoch=run.log_epoch,
                                          resume=resume, model=brought)
        else:
            model, result = brought, FitResult()
        metrics = teacher_metrics(ctx, model, result, time.perf_counter() - t0, params)
        if members:
            metrics["ensemble"] = ensemble_metrics(ctx, members)
            run.log_metrics({f"ensemble_{k}": metrics["ensemble"][k] for k in ("val_accuracy", "test_accuracy")})
        write_outputs(ctx, model, result, metrics, members)
        if resume:
            resume.remove()  # the outputs are written: nothing left to resume
        # Per-epoch curves own the plain names (val_accuracy, ...); the restored best model's are `final_*`.
        run.log_metrics({f"final_{k}": metrics[k] for k in ("val_accuracy", "val_loss")})
        run.log_metrics({k: metrics[k] for k in ("test_accuracy", "test_loss", "epochs_run", "best_epoch",
                                                  "train_seconds", "num_parameters")})
        run.log_artifact(ctx.paths.curves(STAGE))
        run.log_artifact(ctx.paths.metrics(STAGE))
    tracking.record_checkpoints([ctx.paths.teacher])  # lineage: export names this run by the file's md5
    print(f"teacher: {model.name} val_acc {metrics['val_accuracy']:.4f} test_acc {metrics['test_accuracy']:.4f} "
          f"({result.epochs_run} epochs, {metrics['train_seconds']:.0f}s)", file=sys.stderr)
    return metrics


def state_digest(model) -> str:
    """sha256 over a model's tensors: which brought teacher a resumable fine-tuning run started from."""
    import hashlib

    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    from kdpipe.run.stage import run_stage

    return run_stage(STAGE, run, argv)


if __name__ == "__main__":
    from kdpipe.run.stage import exit_now

    exit_now(main())
