"""`kdpipe` command line: check-params, list, predict, verify, store, resolve, outcome, exps."""

from __future__ import annotations

import argparse
import os
import sys

from kdpipe.errors import EXIT_USER_ERROR

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader went away


def check_params(path: str | None) -> int:
    from kdpipe.config import DEFAULT_PARAMS, ConfigError, load

    path = path or DEFAULT_PARAMS
    try:
        cfg = load(path)
    except ConfigError as e:
        print(f"kdpipe check-params: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(f"{path}: ok (dataset {cfg.data.dataset}, teacher {cfg.teacher.model}, student {cfg.student.model})")
    return 0


def list_models(in_channels: int = 3, num_classes: int = 10) -> int:
    from kdpipe.models.zoo import MODEL_NAMES, build_model, count_parameters

    print(f"{'model':<16}{'parameters':>12}   (for {in_channels} channels, {num_classes} classes)")
    for name in MODEL_NAMES:
        n = count_parameters(build_model(name, in_channels, num_classes))
        print(f"{name:<16}{n:>12,}")
    print("tv:<name>       any torchvision classification model, e.g. tv:resnet18")
    return 0


def list_losses() -> int:
    from kdpipe.distill.methods import LOSSES, PRESETS

    print("loss terms (weights in distill.weights):")
    for name, text in LOSSES.items():
        print(f"  {name:<6} {text}")
    print("presets (distill.method):")
    for name, weights in PRESETS.items():
        print(f"  {name:<8} " + " + ".join(f"{w:g}·{k}" for k, w in weights.items()))
    return 0


def store(tracking_uri: str | None) -> int:
    """Name the MLflow store this checkout uses and, when its sqlite file was moved or copied here from another
    folder, point its artifact locations here (store.follow_move): what `make ui` and `make serve` run first."""
    from kdpipe.config import TrackingConfig
    from kdpipe.errors import UserError
    from kdpipe.store import check_sqlite, sqlite_path
    from kdpipe.store import tracking_uri as default_uri
    from kdpipe.store_moves import follow_move

    uri = tracking_uri or default_uri(TrackingConfig())
    path = sqlite_path(uri)
    try:
        if path is not None:
            check_sqlite(path)
            moved, count = follow_move(path)
            if moved:
                print(f"kdpipe store: {path} was moved from {', '.join(map(str, moved))}: {count} artifact "
                      f"locations now point under {path.resolve().parent}", file=sys.stderr)
    except UserError as e:
        print(f"kdpipe store: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(uri if path is None or path.is_file() else f"{uri} (not made yet: the first stage run makes it)")
    return 0


def resolve(uri: str, tracking_uri: str | None) -> int:
    """Print the version a models:/ URI names, or one line saying why none does (exit 2): what `make serve` asks
    before it starts MLflow's server, whose own error is a 30-line traceback."""
    from kdpipe.predict import default_tracking_uri
    from kdpipe.ship.registry import RegistryError
    from kdpipe.ship.registry import resolve as resolve_uri

    try:
        version = resolve_uri(uri, tracking_uri or default_tracking_uri())
    except RegistryError as e:
        hint = f"; serve it with make serve ALIAS={e.instead}" if e.instead else ""
        print(f"kdpipe resolve: {e}{hint}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(f"{uri}: {version.name} v{version.version}")
    return 0


def outcome(params: str | None) -> int:
    """What the last export did with the champion alias, in one line from metrics/export.json: the end of
    `make run`, so a user knows whether `make serve` has a champion to serve and, if not, why and what instead."""
    import json

    from kdpipe.config import DEFAULT_PARAMS, ConfigError, load
    from kdpipe.paths import Paths

    try:
        cfg = load(params or DEFAULT_PARAMS)
    except ConfigError as e:
        print(f"kdpipe outcome: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    path = Paths(cfg.paths).metrics("export")
    if not path.is_file():
        print(f"kdpipe outcome: {path} not found: the export stage has not run", file=sys.stderr)
        return EXIT_USER_ERROR
    print(outcome_line(json.loads(path.read_text()), cfg.export.registered_model))
    return 0


def outcome_line(metrics: dict, name: str) -> str:
    """The champion sentence of an export.json dict (see `outcome`)."""
    student = (metrics.get("registry") or {}).get("student")
    if student is None:
        return "export: nothing registered (export.registry: false); the ONNX files are under models/"
    version, reason = student["version"], student["reason"]
    if student["champion"]:
        return f"export: {name} v{version} crowned champion ({reason}); make serve serves it"
    return (f"export: no new champion: {name} v{version} is the candidate ({reason}); serve it with "
            f"make serve ALIAS=candidate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdpipe", description="Knowledge-distillation pipeline tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-params", help="validate a params file (exit 2 and one line if bad)")
    check.add_argument("file", nargs="?", default=None, help="params file (default params.yaml)")
    lst = sub.add_parser("list", help="list models or losses")
    lst.add_argument("what", choices=["models", "losses"])
    lst.add_argument("--in-channels", type=int, default=3)
    lst.add_argument("--num-classes", type=int, default=10)
    pred = sub.add_parser("predict", help="top classes of images, or of texts for a text model, with an exported "
                                          "ONNX model (no torch needed)")
    pred.add_argument("--model", required=True, help="an .onnx file or a registry URI, e.g. models:/kdpipe-student@champion")
    pred.add_argument("images", nargs="+", metavar="IMAGE_OR_TEXT",
                      help="image files or folders; with a text model, the texts to classify")
    pred.add_argument("--top", type=int, default=3, help="how many classes to show per image (default 3)")
    pred.add_argument("--tracking-uri", default=None,
                      help="MLflow store for models:/ URIs (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")
    ver = sub.add_parser("verify", help="re-hash the pipeline's outputs against dvc.lock (exit 1 and one line "
                                        "per mismatch if any differ)")
    ver.add_argument("repo", nargs="?", default=".", help="the checkout holding dvc.lock (default .)")
    ver.add_argument("--lock-only", action="store_true",
                     help="only check that dvc.lock is readable (no hashing; `make run` does this before dvc repro)")
    st = sub.add_parser("store", help="the MLflow store in use; a moved or copied checkout's store follows it")
    st.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI, else ./mlflow.db")
    res = sub.add_parser("resolve", help="the registry version a models:/ URI names, or one line why none (exit 2)")
    res.add_argument("uri", help="e.g. models:/kdpipe-student@champion")
    res.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI, else ./mlflow.db")
    out = sub.add_parser("outcome", help="whether the last export crowned a champion, and why not (one line)")
    out.add_argument("--params", default=None, help="params file (default params.yaml)")
    exps = sub.add_parser("exps", help="DVC experiments in 80 columns: test accuracies, gap recovered, changed params")
    exps.add_argument("repo", nargs="?", default=".", help="the DVC repo (default .)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. A reader that stops early (`kdpipe list models | head -1`) ends it quietly with
    EXIT_BROKEN_PIPE, as SIGPIPE ends coreutils: the output was cut, so not 0, and no traceback."""
    try:
        try:
            return run(build_parser().parse_args(argv))
        finally:
            sys.stdout.flush()  # a closed pipe shows here (after --help too), not in the flush at exit
    except BrokenPipeError:
        # Python's recipe (docs: signal, "Note on SIGPIPE"): stdout to devnull, so the flush at exit is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def run(args: argparse.Namespace) -> int:
    if args.command == "check-params":
        return check_params(args.file)
    if args.command == "predict":
        from kdpipe import predict

        return predict.main(args)
    if args.command == "exps":
        from kdpipe import experiments

        return experiments.main(args.repo)
    if args.command == "store":
        return store(args.tracking_uri)
    if args.command == "resolve":
        return resolve(args.uri, args.tracking_uri)
    if args.command == "outcome":
        return outcome(args.params)
    if args.command == "verify":
        from kdpipe import verify

        return verify.main(args.repo, lock_only=args.lock_only)
    if args.what == "models":
        return list_models(args.in_channels, args.num_classes)
    return list_losses()


if __name__ == "__main__":
    sys.exit(main())
