"""Where the workers get the code: the git repository and ref that `prefect deploy` writes into the pull steps.

prefect.yaml's build steps run `python -m flows.source repository` and `python -m flows.source ref` when the
deployments are registered; their output fills the `git_clone` pull step, so every worker, on any machine,
clones the same repository at the same ref for each run.

    KDPIPE_GIT_URL   the repository the workers clone (default: this checkout's git remote `origin`)
    KDPIPE_GIT_REF   the branch or tag they check out (default: this checkout's current branch)

The workers run what that ref holds on the remote, not this checkout: push your commits before a run.
"""

from __future__ import annotations

import os
import subprocess
import sys


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


def main(argv: list[str] | None = None) -> int:
    what = (argv if argv is not None else sys.argv[1:]) or [""]
    if what[0] not in ("repository", "ref"):
        raise SystemExit("usage: python -m flows.source repository|ref")
    print(repository() if what[0] == "repository" else ref())
    return 0


if __name__ == "__main__":
    sys.exit(main())
