"""Where the workers get the code: the git repository and ref that `prefect deploy` writes into the pull steps.

prefect.yaml's build steps run `python -m flows.source repository` and `python -m flows.source ref` when the
deployments are registered; their output fills the `git_clone` pull step, so every worker, on any machine,
clones the same repository at the same ref for each run.

    KDPIPE_GIT_URL   the repository the workers clone (default: this checkout's git remote `origin`)
    KDPIPE_GIT_REF   the branch or tag they check out (default: this checkout's current branch)

The workers run what that ref holds on the remote, not this checkout: push your commits before a run.

Two more commands: `check-remote` (make deploy: deployments that pull from or push to the DVC remote are refused
while this checkout has no default remote, instead of failing every scheduled run ~40 s in) and `install` (the
pull step: the clone's dependencies into the worker's Python, never the package itself).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def git(*args: str) -> str:
    """Output of a git command in the current directory, or "" when it fails."""
    out = subprocess.run(["git", *args], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else ""


def repository() -> str:
    """KDPIPE_GIT_URL, else the URL of the remote `origin`."""
    url = os.environ.get("KDPIPE_GIT_URL") or git("remote", "get-url", "origin")
    if not url:
        raise SystemExit("prefect deploy: the workers clone KDPIPE_GIT_URL or the git remote 'origin', and this "
                         "checkout has neither; add origin, or KDPIPE_GIT_URL=file://$PWD for workers on this machine")
    return url


def ref() -> str:
    """KDPIPE_GIT_REF, else the current branch (a detached HEAD has none: refused)."""
    name = os.environ.get("KDPIPE_GIT_REF") or git("symbolic-ref", "--short", "-q", "HEAD")
    if not name:
        raise SystemExit("prefect deploy: HEAD is detached; set KDPIPE_GIT_REF to the branch or tag the workers "
                         "should run")
    return name


def remote_users(prefect_file: Path) -> list[str]:
    """The deployments of `prefect_file` whose parameters pull from or push to the DVC remote."""
    import yaml

    deployments = yaml.safe_load(prefect_file.read_text()).get("deployments") or []
    return [d["name"] for d in deployments
            if any((d.get("parameters") or {}).get(key) for key in ("pull", "push"))]


def check_remote(root: Path = Path("."), prefect_file: str = "prefect.yaml") -> None:
    """SystemExit with one line when a deployment pulls or pushes and `dvc remote default` names no remote."""
    from flows import _dvc

    users = remote_users(root / prefect_file)
    if users and not _dvc.default_remote(root, _dvc.environment()):
        raise SystemExit(f"make deploy: deployments {', '.join(users)} pull from / push to the DVC remote, and this "
                         f"checkout has none (`dvc remote default` is empty); set one with `make remote "
                         f"REMOTE=<url or folder>`, commit .dvc/config and push it")


def install(root: Path = Path(".")) -> list[str]:
    """pip install of the dependencies in `root`'s pyproject.toml into this Python; the pip command run.

    Not `pip install -e .`: a worker started from a checkout runs in that checkout's venv, and an editable
    install from the throwaway clone re-pointed the checkout's `kdpipe` at the clone (gone after the run). The
    package itself needs no install: the flow and its stages (`python -m kdpipe.stages.<name>` in the clone)
    import the clone's code from the working directory, which comes first on sys.path."""
    import tomllib

    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    cmd = [sys.executable, "-m", "pip", "install", "-q", *deps]
    print(f"flows.source install: {len(deps)} dependencies of {root / 'pyproject.toml'} into {sys.executable}",
          flush=True)  # in the worker's log: the step ran, and into which Python
    subprocess.run(cmd, check=True)
    return cmd


def main(argv: list[str] | None = None) -> int:
    what = (argv if argv is not None else sys.argv[1:]) or [""]
    commands = {"repository": lambda: print(repository()), "ref": lambda: print(ref()),
                "check-remote": check_remote, "install": install}
    if what[0] not in commands:
        raise SystemExit("usage: python -m flows.source repository|ref|check-remote|install")
    commands[what[0]]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
