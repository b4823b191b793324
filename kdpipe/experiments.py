"""`kdpipe exps`: DVC's experiments as one table that fits an 80-column terminal. `dvc exp show` has a column
per param and metric (hundreds here: it prints only `…`), and `--only-changed` still keeps the latency and
timing metrics, which differ on every run. This reads `dvc exp show --json` and keeps what a comparison needs:
the teacher's, the scratch and the distilled students' test accuracy (mean over seeds), the share of the
teacher-scratch gap the distilled student recovers, evaluate's verdict (did distillation help beyond noise?), and
the params that differ from the experiment's baseline.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from kdpipe.errors import EXIT_USER_ERROR, UserError
from kdpipe.params_file import flatten

WIDTH = 80
# (column, metrics file, key path): test accuracies as evaluate reports them, in percent
COLUMNS = (("teacher", "metrics/evaluate.json", ("teacher", "test_accuracy")),
           ("scratch", "metrics/evaluate.json", ("scratch", "test_accuracy")),
           ("distil", "metrics/evaluate.json", ("distilled", "test_accuracy")),
           ("gap", "metrics/evaluate.json", ("gap_recovered",)))
NAME_WIDTH = 14
GAP = " "  # between cells: six columns and the changed params share 80 characters
VERDICT = ("verdict", "metrics/evaluate.json", ("verdict",))  # evaluate's verdict: distilled vs scratch
VERDICT_CELLS = {"helped": "helped", "no evidence": "noise", "hurt": "hurt"}  # 6 characters at most


def cell_width(column: str) -> int:
    return max(len(column), len("100.00"))


CHANGES_AT = NAME_WIDTH + sum(cell_width(name) + len(GAP) for name, _, _ in (*COLUMNS, VERDICT)) + 2  # changes


class ExpsError(UserError):
    """`dvc exp show` could not be run or read: the message says why."""


def dvc_exp_show(repo: Path) -> list[dict]:
    """`dvc exp show --json` in `repo`, parsed."""
    cmd = [sys.executable, "-m", "dvc", "exp", "show", "--json"]
    done = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise ExpsError(f"dvc exp show in {repo} failed: {last}")
    return json.loads(done.stdout)


def params_of(state: dict) -> dict[str, object]:
    """Every param of an experiment state, file prefix dropped for params.yaml ("distill.temperature")."""
    out: dict[str, object] = {}
    for file, result in ((state.get("data") or {}).get("params") or {}).items():
        prefix = "" if file == "params.yaml" else f"{file}:"
        out.update(flatten((result or {}).get("data") or {}, prefix))
    return out


def metric(state: dict, file: str, keys: tuple[str, ...]) -> float | None:
    value = lookup(state, file, keys)
    return value if isinstance(value, int | float) else None


def lookup(state: dict, file: str, keys: tuple[str, ...]):
    """The value at `keys` in metrics `file` of an experiment state, or None."""
    value = (((state.get("data") or {}).get("metrics") or {}).get(file) or {}).get("data") or {}
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def verdict_cell(state: dict) -> str:
    """evaluate's verdict in a cell: helped, noise (no evidence of a difference), hurt; '-' before it existed."""
    return VERDICT_CELLS.get(lookup(state, VERDICT[1], VERDICT[2]), "-")


def changes(params: dict[str, object], baseline: dict[str, object]) -> list[str]:
    """`key=value` for each param that differs from the baseline's (added or removed ones too)."""
    keys = sorted(set(params) | set(baseline))
    return [f"{k}={json.dumps(params.get(k))}" for k in keys if params.get(k) != baseline.get(k)]


def row(name: str, state: dict, baseline: dict[str, object]) -> list[str]:
    """One experiment's lines: name and numbers, then its changed params, one per line past the first."""
    cells = [f"{name[:NAME_WIDTH - 1]:<{NAME_WIDTH}}"]
    for column, file, keys in COLUMNS:
        value = metric(state, file, keys)
        cells.append(f"{'-' if value is None else f'{100 * value:.2f}':>{cell_width(column)}}{GAP}")
    cells.append(f"{verdict_cell(state):>{cell_width(VERDICT[0])}}{GAP}")
    head = "".join(cells) + "  "
    changed = changes(params_of(state), baseline) if baseline else []  # a commit's own row: none
    lines = [head + fit(changed[0] if changed else "", WIDTH - len(head))]
    lines += [" " * CHANGES_AT + fit(c, WIDTH - CHANGES_AT) for c in changed[1:]]
    return [line.rstrip() for line in lines]


def fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def table(states: list[dict]) -> list[str]:
    """The lines of `kdpipe exps` for `dvc exp show --json` output: the workspace (its params against the
    commit it is on), then each commit and, indented under it, its experiments (params against that commit)."""
    header = f"{'experiment':<{NAME_WIDTH}}" + "".join(f"{c:>{cell_width(c)}}{GAP}" for c, _, _ in (*COLUMNS, VERDICT))
    header += "  changed params"
    lines = [header, " " * NAME_WIDTH + "test accuracy in %, mean over seeds; gap: % of it recovered",
             " " * NAME_WIDTH + "verdict: distilled vs scratch beyond noise (or within it: noise)"]
    commits = [s for s in states if s["rev"] != "workspace"]
    for state in states:
        if state["rev"] == "workspace":
            lines += row("workspace", state, params_of(commits[0]) if commits else {})
            continue
        baseline = params_of(state)
        lines += row(state.get("name") or state["rev"][:7], state, {})
        for exp_range in state.get("experiments") or []:
            tip = exp_range["revs"][0]
            lines += row("  " + (exp_range.get("name") or tip.get("name") or tip["rev"][:7]), tip, baseline)
    return lines


def main(repo: str = ".") -> int:
    try:
        states = dvc_exp_show(Path(repo))
    except ExpsError as e:
        print(f"kdpipe exps: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    print("\n".join(table(states)))
    return 0
