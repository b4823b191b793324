"""DVC as the flows use it: its stage graph, stage processes that stream their output, `dvc exp show`.

No Prefect here: these are plain subprocess helpers, so the flows stay short and the helpers testable.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flows import QUIET_ENV

TAIL_LINES = 12  # how much of a failed command's output its error message quotes


@dataclass(frozen=True)
class Output:
    returncode: int
    lines: list[str]

    @property
    def tail(self) -> str:
        return "\n".join(self.lines[-TAIL_LINES:])


def dvc() -> str:
    """The dvc next to this interpreter (the venv's), else whatever `dvc` is on PATH."""
    local = Path(sys.executable).parent / "dvc"
    return str(local) if local.exists() else "dvc"


def environment(**extra: str) -> dict[str, str]:
    """This process's environment with the interpreter's bin first on PATH, so a stage's `python` is the
    venv's even when a worker was started without it, telemetry off unless set, and `extra` on top."""
    env = {**QUIET_ENV, **os.environ}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def run(args: list[str], root: Path, env: dict[str, str], on_line: Callable[[str], None]) -> Output:
    """Run `dvc <args>` in `root`, handing each output line to `on_line` as it comes.

    DVC and the stage it starts stay in this process's group on purpose: whoever stops the flow run stops
    that group (Ctrl-C, a worker cancelling the run, a test timeout), and no training is left behind.
    """
    proc = subprocess.Popen([dvc(), *args], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines: list[str] = []
    try:
        for line in proc.stdout:
            if line := line.rstrip():
                lines.append(line)
                on_line(line)
        return Output(proc.wait(), lines)
    except BaseException:
        kill_tree(proc.pid)
        proc.wait()
        raise


def kill_tree(pid: int) -> None:
    """Kill a process and its descendants: DVC does not pass a SIGTERM on, so the stage would live on."""
    import psutil  # a DVC dependency

    try:
        parent = psutil.Process(pid)
        tree = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        return
    for proc in tree:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def stage_graph(root: Path, env: dict[str, str]) -> tuple[list[str], dict[str, set[str]]]:
    """Pipeline stages in dependency order (ties keep dvc.yaml's order) and each stage's direct upstream,
    from `dvc dag --dot`. Data sources tracked by `.dvc` files are not stages and are left out."""
    out = subprocess.run([dvc(), "dag", "--dot"], cwd=root, env=env, capture_output=True, text=True, check=True)
    nodes = [n for n in re.findall(r'^"([^"]+)";$', out.stdout, re.M) if not n.endswith(".dvc")]
    upstream: dict[str, set[str]] = {n: set() for n in nodes}
    for src, dst in re.findall(r'^"([^"]+)" -> "([^"]+)";$', out.stdout, re.M):
        if src in upstream and dst in upstream:
            upstream[dst].add(src)
    order: list[str] = []
    while len(order) < len(nodes):
        order.append(next(n for n in nodes if n not in order and upstream[n] <= set(order)))
    return order, upstream


def stale_stages(root: Path, env: dict[str, str]) -> set[str]:
    """Stages whose deps, params or outputs changed, per `dvc status` (it does not yet see what running an
    upstream stage will change; the caller accounts for that)."""
    out = subprocess.run([dvc(), "status", "--json"], cwd=root, env=env, capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout or "{}"))


def with_upstream(selected: list[str], upstream: dict[str, set[str]]) -> set[str]:
    """The selected stages and everything they depend on, as `dvc repro <stage>` would consider."""
    unknown = sorted(set(selected) - set(upstream))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; dvc.yaml has {sorted(upstream)}")
    todo, seen = list(selected), set()
    while todo:
        stage = todo.pop()
        if stage not in seen:
            seen.add(stage)
            todo.extend(upstream[stage])
    return seen


def set_args(overrides: dict) -> list[str]:
    """{"teacher.lr": 0.1} → ["-S", "teacher.lr=0.1"]; non-strings as JSON (True → true, None → null),
    which DVC reads back as YAML."""
    args: list[str] = []
    for key, value in overrides.items():
        args += ["-S", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    return args


def lock_digest(root: Path) -> str:
    """sha256 of dvc.lock: names exactly which data, code and params a run left in the workspace."""
    lock = root / "dvc.lock"
    return hashlib.sha256(lock.read_bytes()).hexdigest() if lock.exists() else "none"


def default_remote(root: Path, env: dict[str, str]) -> str | None:
    """The name of the default DVC remote (`dvc remote add -d`, `make remote`), or None when none is set."""
    out = subprocess.run([dvc(), "remote", "default"], cwd=root, env=env, capture_output=True, text=True)
    name = out.stdout.strip() if out.returncode == 0 else ""  # exit 1 and "No default remote set" when none
    return name or None


def remote_url(root: Path, env: dict[str, str], name: str) -> str:
    """The URL (or path) of DVC remote `name`, as its config holds it."""
    out = subprocess.run([dvc(), "config", f"remote.{name}.url"], cwd=root, env=env, capture_output=True, text=True)
    return out.stdout.strip() or "?"


# The one-machine default: `make deploy` in a checkout with no DVC remote adds this one, a folder outside the
# checkout, to .dvc/config.local (a path on one machine means nothing on another, so never to the committed
# .dvc/config); the deployments hand its location to their runs' clones in REMOTE_ENV (flows/source.py).
EMBEDDED_REMOTE = "kdpipe-local"
REMOTE_ENV = "KDPIPE_DVC_REMOTE"


def project_default_remote(root: Path, env: dict[str, str]) -> str | None:
    """The default remote of the committed .dvc/config alone (what every clone has), or None."""
    out = subprocess.run([dvc(), "config", "--project", "core.remote"], cwd=root, env=env, capture_output=True,
                         text=True)
    return out.stdout.strip() or None


def is_folder(url: str) -> bool:
    """A remote given as a path (no scheme such as s3:// or ssh://): DVC's local-folder remote."""
    return "://" not in url


def add_local_remote(root: Path, env: dict[str, str], url: str, name: str = EMBEDDED_REMOTE) -> str:
    """`dvc remote add --local --default --force name url`: this checkout's default remote, in .dvc/config.local
    only; `name`, or RuntimeError with DVC's last line."""
    out = subprocess.run([dvc(), "remote", "add", "--local", "--default", "--force", name, url], cwd=root, env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"dvc remote add --local {name} {url} failed: {(out.stderr or out.stdout).strip()}")
    return name


def pull_args(stages: list[str] | None, allow_missing: bool = False) -> list[str]:
    """`dvc pull` of what the run needs: the stages' outputs and their upstream's, or every output in dvc.lock.
    No --allow-missing by default: with it, an unreachable remote reads as "missing" and the run silently
    retrains. `allow_missing` is for a remote that cannot be unreachable (an existing folder on this machine)."""
    args = ["pull", "--with-deps", *stages] if stages else ["pull"]
    return [*args, "--allow-missing"] if allow_missing else args


def error_summary(lines: list[str]) -> str:
    """A failed DVC command's error as one line: its ERROR line and the paths listed under it, else its last line."""
    for i, line in enumerate(lines):
        if line.startswith("ERROR:"):
            listed = [s.strip() for s in lines[i + 1:] if s.strip() and not s.startswith(("Is your", "<http"))]
            return " ".join([line.removeprefix("ERROR:").strip(), ", ".join(listed)]).strip()
    return lines[-1] if lines else "no output"


def is_shallow(root: Path) -> bool:
    """Whether `root` is a shallow git clone (Prefect's git_clone step makes one: `--depth 1`)."""
    out = subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=root, capture_output=True, text=True)
    return out.stdout.strip() == "true"


def experiment_metrics(root: Path, env: dict[str, str], metric_file: str, metric: str) -> dict[str, float | None]:
    """`dvc exp show --json` reduced to {experiment name: metric value} for the experiments of HEAD."""
    out = subprocess.run([dvc(), "exp", "show", "--json"], cwd=root, env=env, capture_output=True, text=True,
                         check=True)
    values: dict[str, float | None] = {}
    for baseline in json.loads(out.stdout):
        for exp in baseline.get("experiments") or []:
            data = exp["revs"][0].get("data") or {}
            metrics = (data.get("metrics") or {}).get(metric_file, {}).get("data", {})
            values[exp["name"]] = metrics.get(metric)
    return values
