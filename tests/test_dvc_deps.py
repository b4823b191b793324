"""dvc.yaml declares what each stage really reads: its code (the stage module's import closure inside kdpipe/,
computed from the AST, imports inside functions included), its files (as kdpipe.paths.Paths names them), and
its params; then, on a real DVC repo, an edit to each module or param reruns exactly the stages that use it.

DVC decides what reruns from the declared deps only: a module a stage imports but does not list is invisible
(an edit reruns nothing and the outputs go stale); a listed module it does not import reruns it for nothing.
"""

from __future__ import annotations

import ast
import contextlib
import re
from functools import cache
from pathlib import Path

import pytest
import yaml
from conftest import REPO, dvc, dvc_status, stages_run

PACKAGE = "kdpipe"

# Modules a stage may import without listing them as deps, because no edit to them can change what the stage
# writes. Each is checked to be imported by some stage (no stale entries) and listed by none.
NOT_OUTPUT_CHANGING: dict[str, str] = {
    "kdpipe/tracking.py": "where runs are logged (store URI, run names, tags, system metrics); nothing it "
    "returns is written into a DVC output, and the tracking.* params are not deps either. (With teacher.source: "
    "registry its store URI also says where the teacher is fetched from: an input DVC cannot see anyway, since "
    "an alias can move while no file changes.)",
    "kdpipe/store.py": "which MLflow store runs are logged to and how it is made ready (created once, locked, "
    "probed); like kdpipe/tracking.py, nothing it returns is written into a DVC output",
    "kdpipe/store_moves.py": "points a moved store's artifact locations at its new folder (kdpipe/store.py makes "
    "the store ready with it); where MLflow finds artifacts, never what a stage writes",
    "kdpipe/env.py": "which rank this process is, where a failing rank leaves its error (RANK_ERRORS_ENV: how a "
    "failure is reported, never a number), and defaults for telemetry, analytics and log-level environment variables of MLflow, "
    "Prefect and DVC: quiet or chatty, never different numbers",
    "kdpipe/errors.py": "the user-error type and its exit code: how a failed run is reported, not what a "
    "successful one writes (test_errors_module_holds_only_error_types keeps it that way)",
}


# ------------------------------------------------------------------------------------------ dvc.yaml, params


def dvc_yaml() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())


def stages() -> dict[str, dict]:
    return dvc_yaml()["stages"]


def interpolate(text: str, params: dict) -> str:
    """dvc.yaml's ${a.b} templating, resolved from params (DVC does the same from params.yaml)."""

    def value(match: re.Match) -> str:
        node = params
        for key in match.group(1).split("."):
            node = node[key]
        return str(node)

    return re.sub(r"\$\{([^}]+)\}", value, text)


def entries(stage: dict, kind: str) -> list[str]:
    """The paths of one list (deps, outs, metrics, plots) of a stage; list items may be `{path: options}`."""
    return [next(iter(item)) if isinstance(item, dict) else item for item in stage.get(kind, [])]


def code_deps(stage: dict) -> set[str]:
    """The code deps as listed: files, and folders (ending in "/")."""
    return {d for d in entries(stage, "deps") if d.startswith(f"{PACKAGE}/")}


def folder_files(folder: str, root: Path = REPO) -> set[str]:
    """Every .py file under a listed folder (what DVC hashes, bytecode being in .dvcignore)."""
    return {str(p.relative_to(root)) for p in (root / folder).rglob("*.py") if "__pycache__" not in p.parts}


def expand(listed: set[str], root: Path = REPO) -> set[str]:
    """Listed code deps as files: a folder stands for every .py file under it."""
    return set().union(*({d} if not d.endswith("/") else folder_files(d, root) for d in listed))


def wanted_code_deps(stage: str) -> set[str]:
    """What dvc.yaml should list: a folder where the stage needs every module in it (its code-free __init__.py
    aside), each file otherwise. Folders are taken from the top down, so kdpipe/ itself is never one."""
    needed = needed_code_deps(stage)
    wanted: set[str] = set()
    folders = sorted({str(Path(m).parent) for m in needed if Path(m).parent != Path(PACKAGE)}, key=len)
    for folder in folders:
        if any(folder.startswith(w) for w in wanted):
            continue
        inside = {f for f in folder_files(folder) if not runs_no_code(f)}
        if inside <= needed:
            wanted.add(folder + "/")
    return wanted | {m for m in needed if not any(m.startswith(w) for w in wanted)}


# -------------------------------------------------------------------------------------- the import closure


def module_file(dotted: str, root: Path = REPO) -> Path | None:
    """kdpipe/a/b.py or kdpipe/a/b/__init__.py for `kdpipe.a.b`; None for a name that is not a module
    (e.g. a function in `from kdpipe.x import name`)."""
    base = root.joinpath(*dotted.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _type_checking_only(tree: ast.AST) -> set[ast.AST]:
    """Import nodes under `if TYPE_CHECKING:`: never executed."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(n for stmt in node.body for n in ast.walk(stmt))
    return skipped


def imported_names(path: Path, root: Path = REPO) -> set[str]:
    """Every dotted name an import statement anywhere in the file (functions included) can load: for
    `from a.b import c` both `a.b` and `a.b.c` (c may be a submodule); relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = path.relative_to(root).parent.parts
    skipped = _type_checking_only(tree)
    names: set[str] = set()
    for node in ast.walk(tree):
        if node in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            anchor = list(package[: len(package) - node.level + 1]) if node.level else []
            base = ".".join(anchor + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def loaded_files(dotted: str, root: Path = REPO) -> list[Path]:
    """What importing `kdpipe.a.b` executes: kdpipe/__init__.py, kdpipe/a/__init__.py, then the module."""
    parts = dotted.split(".")
    return [f for i in range(1, len(parts) + 1) if (f := module_file(".".join(parts[:i]), root))]


@cache
def closure(module: str, root: Path = REPO) -> frozenset[str]:
    """Repo-relative paths of every kdpipe file that running `python -m <module>` can execute."""
    todo, seen = loaded_files(module, root), set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_names(path, root):
            if name.split(".")[0] == PACKAGE:
                todo.extend(loaded_files(name, root))
    return frozenset(str(p.relative_to(root)) for p in seen)


def runs_no_code(path: str) -> bool:
    """A file with nothing but a docstring (an empty package __init__): it cannot change anything."""
    body = ast.parse((REPO / path).read_text()).body
    return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def needed_code_deps(stage: str) -> set[str]:
    """The code deps a stage must list: its import closure minus allow-listed and code-free files."""
    return {m for m in closure(f"{PACKAGE}.stages.{stage}") if m not in NOT_OUTPUT_CHANGING and not runs_no_code(m)}


STAGES = list(stages())
MODULES = sorted(str(p.relative_to(REPO)) for p in (REPO / PACKAGE).rglob("*.py") if "__pycache__" not in p.parts)


# ------------------------------------------------------------------------------------- the closure itself


def test_closure_follows_every_import_form(tmp_path):
    """import a.b / from a import b / from a.b import name / relative / inside a function / package
    __init__ / TYPE_CHECKING: checked on a throwaway package, so the helper cannot pass by finding nothing."""
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "stage.py": "import kdpipe.a\nfrom kdpipe import b\n\ndef f():\n    from kdpipe.c import thing\n",
        "a.py": "from . import d\n",
        "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from kdpipe import never\n",
        "c.py": "from kdpipe.sub import e\n",
        "d.py": "import os\n",
        "never.py": "",
        "unused.py": "",
        "sub/__init__.py": "x = 1\n",
        "sub/e.py": "from .. import d\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    got = closure(f"{PACKAGE}.stage", tmp_path)
    want = {"__init__.py", "stage.py", "a.py", "b.py", "c.py", "d.py", "sub/__init__.py", "sub/e.py"}
    assert got == {f"{PACKAGE}/{name}" for name in want}


# ------------------------------------------------------------------------------------ code deps, both ways


def test_one_stage_one_module_one_command():
    modules = {p.stem for p in (REPO / PACKAGE / "stages").glob("*.py") if p.stem != "__init__"}
    assert set(STAGES) == modules
    for name, stage in stages().items():
        assert stage["cmd"] == f"python -m {PACKAGE}.stages.{name}", name


@pytest.mark.parametrize("stage", STAGES)
def test_code_deps_cover_the_import_closure(stage):
    missing = needed_code_deps(stage) - expand(code_deps(stages()[stage]))
    assert not missing, (f"dvc.yaml: stage {stage!r} imports {sorted(missing)} but does not list them as deps, "
                         "so editing them reruns nothing; add them (or to NOT_OUTPUT_CHANGING, with the reason)")


@pytest.mark.parametrize("stage", STAGES)
def test_no_stale_code_deps(stage):
    listed = code_deps(stages()[stage])
    stale = {f for f in expand(listed) - needed_code_deps(stage) if not runs_no_code(f)}
    assert not stale, (f"dvc.yaml: stage {stage!r} lists {sorted(stale)}, which it does not import (or which "
                       "cannot change its outputs): an edit there reruns it for nothing")
    assert all((REPO / d).is_dir() if d.endswith("/") else (REPO / d).is_file() for d in listed)


@pytest.mark.parametrize("stage", STAGES)
def test_code_deps_are_folders_where_exact(stage):
    """A folder where the stage runs every module in it, files otherwise: the shortest list that is still exact."""
    assert code_deps(stages()[stage]) == wanted_code_deps(stage)


def test_folder_expansion_and_choice_can_fail(tmp_path):
    """expand() reads a folder as its .py files (bytecode aside), so a listed folder cannot hide a module."""
    (tmp_path / "kdpipe" / "x" / "__pycache__").mkdir(parents=True)
    for name in ("x/a.py", "x/b.py", "x/__pycache__/a.cpython-311.py", "c.py"):
        (tmp_path / "kdpipe" / name).write_text("")
    assert expand({"kdpipe/x/", "kdpipe/c.py"}, tmp_path) == {"kdpipe/x/a.py", "kdpipe/x/b.py", "kdpipe/c.py"}


def test_allow_list_entries_are_imported_and_never_listed():
    imported = set().union(*(closure(f"{PACKAGE}.stages.{s}") for s in STAGES))
    assert set(NOT_OUTPUT_CHANGING) <= imported, f"stale entries: {set(NOT_OUTPUT_CHANGING) - imported}"
    for name, stage in stages().items():
        assert not expand(code_deps(stage)) & set(NOT_OUTPUT_CHANGING), name


def test_errors_module_holds_only_error_types():
    """Its allow-list reason holds only while kdpipe/errors.py defines exception classes and constants."""
    body = ast.parse((REPO / PACKAGE / "errors.py").read_text()).body
    for node in body:
        docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        future = isinstance(node, ast.ImportFrom) and node.module == "__future__"
        constant = isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(node.value, ast.Constant)
        error_class = isinstance(node, ast.ClassDef) and all(
            isinstance(n, ast.Expr | ast.Pass) for n in node.body)  # a docstring, no methods
        assert docstring or future or constant or error_class, ast.unparse(node)


# ----------------------------------------------------------------------------- file names: Paths vs dvc.yaml


def declared_files() -> dict[str, dict[str, set[Path]]]:
    """Per stage and kind (deps, outs, metrics, plots): the data paths dvc.yaml declares, interpolated."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    return {name: {kind: {Path(interpolate(e, params)) for e in entries(stage, kind)
                          if not e.startswith(f"{PACKAGE}/")}
                   for kind in ("deps", "outs", "metrics", "plots")}
            for name, stage in stages().items()}


def expected_files() -> dict[str, dict[str, list[Path]]]:
    """What each stage reads and writes, named by kdpipe.paths.Paths built from params.yaml."""
    from kdpipe import config
    from kdpipe.paths import Paths

    cfg = config.load(REPO / "params.yaml")
    p = Paths(cfg.paths)

    def students(stage: str) -> list[Path]:
        return [p.student(stage, seed) for seed in cfg.student.seeds]

    def own(stage: str, curves: bool = True) -> dict[str, list[Path]]:
        return {"metrics": [p.metrics(stage)], "plots": [p.curves(stage)] if curves else []}

    return {
        "prepare": {"deps": [Path(cfg.paths.raw)], "outs": [p.dataset, p.dataset_meta], "metrics": [], "plots": []},
        "teacher": {"deps": [p.dataset], "outs": [p.teacher, p.teacher_outputs], **own("teacher")},
        "scratch": {"deps": [p.dataset], "outs": students("scratch"), **own("scratch")},
        "distill": {"deps": [p.dataset, p.teacher, p.teacher_outputs], "outs": students("distill"),
                    **own("distill")},
        "evaluate": {"deps": [p.dataset, p.teacher, *students("scratch"), *students("distill"),
                              p.curves("scratch"), p.curves("distill")],
                     "outs": [p.predictions, p.reports("evaluate")], **own("evaluate", curves=False)},
        "export": {"deps": [p.dataset, p.teacher, *students("scratch"), *students("distill"),
                            p.metrics("evaluate"), p.metrics("distill")],
                   "outs": [p.onnx("teacher"), p.onnx("student"), p.onnx("int8"), p.reports("export")],
                   **own("export", curves=False)},
    }


def covered(path: Path, declared: set[Path]) -> bool:
    """Declared itself, or inside a declared folder."""
    return any(path == d or d in path.parents for d in declared)


def test_dvc_yaml_file_names_agree_with_paths():
    declared, expected = declared_files(), expected_files()
    assert set(declared) == set(expected)
    for stage, kinds in expected.items():
        for kind, paths in kinds.items():
            have = declared[stage][kind]
            missing = [str(p) for p in paths if not covered(p, have)]
            assert not missing, f"dvc.yaml: {stage}.{kind} lacks {missing} (have {sorted(map(str, have))})"
            unknown = [str(d) for d in have if not any(covered(p, {d}) for p in paths)]
            assert not unknown, f"dvc.yaml: {stage}.{kind} names {unknown}, which kdpipe.paths does not"


# ------------------------------------------------------------------------ reruns, on a real DVC repo (slow)


def expected_stages(module: str) -> set[str]:
    """The stages an edit to `module` must rerun: those that run it, and those that list its folder (for a
    code-free __init__.py, the one edit a folder dep reruns for nothing)."""
    return {stage for stage in STAGES if module in needed_code_deps(stage)
            or (runs_no_code(module) and module in expand(code_deps(stages()[stage])))}


def stale_stages(root: Path) -> set[str]:
    """The stages `dvc status --json` names, from DVC's Repo.status() in-process (what the command prints):
    ~0.2 s a call instead of ~0.8 s for a new dvc process, and this runs once per module."""
    from dvc.repo import Repo

    with contextlib.chdir(root), Repo(str(root)) as repo:  # from elsewhere, stages read "<path>/dvc.yaml:<name>"
        return set(repo.status())


@pytest.mark.slow
@pytest.mark.parametrize("module", MODULES)
def test_editing_a_module_makes_exactly_its_importers_stale(dvc_repo, module):
    """A comment appended to the module: `dvc status` names every stage that imports it (and that can change
    its outputs), and no other; a module no stage imports names none."""
    path = dvc_repo.root / module
    original = path.read_bytes()
    path.write_bytes(original + b"\n# edited by test_dvc_deps\n")
    try:
        stale = stale_stages(dvc_repo.root)
    finally:
        path.write_bytes(original)
    assert stale == expected_stages(module)


def edit_params(root: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow
def test_editing_distill_temperature_makes_only_distill_stale(dvc_repo):
    params = yaml.safe_load((dvc_repo.root / "params.yaml").read_text())
    edit_params(dvc_repo.root, "distill", "temperature", params["distill"]["temperature"] * 2)
    try:
        assert set(dvc_status(dvc_repo.root)) == {"distill"}  # downstream stages follow once distill reruns
    finally:
        dvc_repo.restore()


@pytest.mark.slow
def test_a_new_distill_temperature_reruns_exactly_distill_evaluate_export(temperature_experiment):
    ran = stages_run(temperature_experiment.output)
    assert ran == ["distill", "evaluate", "export"], temperature_experiment.output[-3000:]


@pytest.mark.slow
def test_editing_tracking_params_reruns_nothing(dvc_repo):
    params = yaml.safe_load((dvc_repo.root / "params.yaml").read_text())
    for key, value in {"experiment": "elsewhere", "system_metrics": not params["tracking"]["system_metrics"],
                       "uri": f"sqlite:///{dvc_repo.root / 'other.db'}"}.items():
        edit_params(dvc_repo.root, "tracking", key, value)
    try:
        assert dvc_status(dvc_repo.root) == {}
        out = dvc("repro", cwd=dvc_repo.root).stdout
        assert stages_run(out) == [] and "Data and pipelines are up to date." in out, out
    finally:
        dvc_repo.restore()
    assert not (dvc_repo.root / "other.db").exists()
