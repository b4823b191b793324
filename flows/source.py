"""Where the workers get the code: the git repository and ref that `prefect deploy` writes into the pull steps.

prefect.yaml's build steps run `python -m flows.source repository` and `python -m flows.source ref` when the
deployments are registered; their output fills the `git_clone` pull step, so every worker, on any machine,
clones the same repository at the same ref for each run.

    KDPIPE_GIT_URL   the repository the workers clone (default: this checkout's git remote `origin`, else
                     this checkout itself as file://, for workers on this machine)
    KDPIPE_GIT_REF   the branch or tag they check out (default: this checkout's current branch)

The workers run what that ref holds on the remote, not this checkout: push your commits before a run (with the
file:// default, commit them).

More commands: `check-remote` (make deploy: when deployments pull from or push to the DVC remote and this
checkout has no default remote, add the one-machine default, a folder outside the checkout (KDPIPE_DVC_REMOTE,
else ~/.cache/kdpipe/dvc-remote/<name>-<hash of the checkout's path>), to .dvc/config.local, push what is
cached there and say so in one line), `dvc-remote` (a build step: that remote's location when only
.dvc/config.local has it, which the deployments hand to their runs' clones in KDPIPE_DVC_REMOTE; empty when the
committed .dvc/config names the remote, as every clone has it) and `install` (the pull step: the clone's
dependencies into the worker's Python, never the package itself).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path


def git(*args: str) -> str:
    """Output of a git command in the current directory, or "" when it fails."""
    out = subprocess.run(["git", *args], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else ""


def repository() -> str:
    """KDPIPE_GIT_URL, else the URL of the remote `origin`, else this checkout's top folder as a file:// URL."""
    url = os.environ.get("KDPIPE_GIT_URL") or git("remote", "get-url", "origin") or this_checkout()
    if not url:
        raise SystemExit("prefect deploy: the workers clone KDPIPE_GIT_URL, the git remote 'origin' or this "
                         "checkout, and this folder is not in a git repository; run make deploy in the checkout")
    return url


def this_checkout() -> str:
    """file:// URL of the git checkout around the current directory ("" outside one): what workers on this
    machine clone when there is no `origin`."""
    top = git("rev-parse", "--show-toplevel")
    return Path(top).resolve().as_uri() if top else ""


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


def embedded_remote(root: Path) -> str:
    """Where the one-machine DVC remote of checkout `root` goes: KDPIPE_DVC_REMOTE, else a folder of the user's
    cache ($XDG_CACHE_HOME or ~/.cache) named after the checkout and a hash of its path (two checkouts of one
    repository keep two remotes), outside the checkout: `git clean` or deleting the checkout keeps it."""
    from flows import _dvc

    if given := os.environ.get(_dvc.REMOTE_ENV, "").strip():
        return given
    top = root.resolve()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return str(cache / "kdpipe" / "dvc-remote" / f"{top.name}-{hashlib.sha256(str(top).encode()).hexdigest()[:8]}")


def check_remote(root: Path = Path("."), prefect_file: str = "prefect.yaml") -> str | None:
    """When a deployment pulls or pushes and `dvc remote default` names no remote: add the one-machine default
    (embedded_remote) to .dvc/config.local, push what the cache holds, and say so in one line; its location,
    or None when nothing was added. SystemExit with one line when the folder cannot be made or DVC refuses."""
    from flows import _dvc

    users, env = remote_users(root / prefect_file), _dvc.environment()
    if not users or _dvc.default_remote(root, env):
        return None
    url = embedded_remote(root)
    try:
        if _dvc.is_folder(url):
            Path(url).mkdir(parents=True, exist_ok=True)
        _dvc.add_local_remote(root, env, url)
        pushed = subprocess.run([_dvc.dvc(), "push"], cwd=root, env=env, capture_output=True, text=True)
        if pushed.returncode != 0:
            raise RuntimeError(f"dvc push: {_dvc.error_summary(pushed.stderr.splitlines() or pushed.stdout.splitlines())}")
    except (OSError, RuntimeError) as e:
        subprocess.run([_dvc.dvc(), "remote", "remove", "--local", _dvc.EMBEDDED_REMOTE], cwd=root, env=env,
                       capture_output=True)  # not half set up: the next make deploy tries again
        raise SystemExit(f"make deploy: this checkout has no DVC remote and the one-machine default {url} could not "
                         f"be set up ({e}); set KDPIPE_DVC_REMOTE to another folder, or a shared remote with "
                         "`make remote REMOTE=<url or folder>`") from None
    said = (pushed.stdout.strip().splitlines() or ["nothing to push"])[-1].rstrip(".")  # "3 files pushed"
    print(f"make deploy: no DVC remote, so deployments {', '.join(users)} use {_dvc.EMBEDDED_REMOTE} -> {url} "
          f"(in .dvc/config.local, for workers on this machine only; dvc push: {said})", flush=True)
    return url


def note_repository() -> None:
    """make deploy: one line when the workers will clone this checkout itself (no KDPIPE_GIT_URL, no origin)."""
    if not os.environ.get("KDPIPE_GIT_URL") and not git("remote", "get-url", "origin") and this_checkout():
        print(f"make deploy: no git remote 'origin', so workers clone this checkout ({this_checkout()}) at "
              f"{ref()}: they run what is committed there", flush=True)


def local_remote(root: Path = Path(".")) -> str:
    """The default remote's location when only .dvc/config.local names it (a clone will not have it), else ""."""
    from flows import _dvc

    env = _dvc.environment()
    name = _dvc.default_remote(root, env)
    if name is None or _dvc.project_default_remote(root, env) == name:
        return ""
    url = _dvc.remote_url(root, env, name)
    return str((root / ".dvc" / url).resolve()) if _dvc.is_folder(url) else url


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
                "check-remote": lambda: (check_remote(), note_repository()), "dvc-remote": lambda: print(local_remote()), "install": install}
    if what[0] not in commands:
        raise SystemExit(f"usage: python -m flows.source {'|'.join(commands)}")
    commands[what[0]]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
