"""`.ci/run`'s verdict, with `make`, `apt-get` and `chromium` stubbed (the suite itself is what `make test` runs):
the suite runs natively and under CPU_PROFILE=avx2, both always, and CI fails when either run fails, passes no
test or skips a test whose dependency CI installed."""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# What the stub `make test CPU_PROFILE=<p>` prints and exits with, by profile.
PASSED = ("679 passed, 3 skipped in 600.00s", 0)
FAILED = ("1 failed, 678 passed, 3 skipped in 600.00s", 1)
SKIPPED_CHROMIUM = ("SKIPPED [1] tests/test_offline_plots.py:52: no chromium on PATH\n679 passed, 3 skipped", 0)
NOTHING = ("no tests ran in 0.01s", 0)


def stub(bin_dir: Path, name: str, script: str) -> None:
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def ci(tmp_path: Path, outcomes: dict[str, tuple[str, int]]) -> tuple[subprocess.CompletedProcess, list[str]]:
    """.ci/run in a git checkout of its own, the stub `make` answering `outcomes[profile]`: its result and the
    make command lines it ran."""
    root = tmp_path / "checkout"
    (root / ".ci").mkdir(parents=True)
    shutil.copy2(REPO / ".ci/run", root / ".ci/run")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "config", "user.email", "t@kdpipe.invalid"], cwd=root, check=True)
    subprocess.run(["git", "config", "user.name", "t"], cwd=root, check=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub(bin_dir, "apt-get", "exit 0\n")
    stub(bin_dir, "chromium", "exit 0\n")
    cases = "".join(f"  CPU_PROFILE={p}) printf '%s\\n' {shlex.quote(text)}; exit {code};;\n"
                    for p, (text, code) in outcomes.items())
    stub(bin_dir, "make", f'echo "make $*" >> {tmp_path / "made"}\ncase "$2" in\n{cases}  *) exit 99;;\nesac\n')
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(["bash", str(root / ".ci/run")], cwd=root, env=env, capture_output=True, text=True,
                         timeout=60)
    made = (tmp_path / "made").read_text().splitlines() if (tmp_path / "made").exists() else []
    return out, made


@pytest.mark.parametrize(("native", "avx2", "passes", "says"), [
    (PASSED, PASSED, True, None),
    (PASSED, FAILED, False, "CI (avx2): make test exited 1"),
    (FAILED, PASSED, False, "CI (native): make test exited 1"),
    (SKIPPED_CHROMIUM, PASSED, False, "CI (native): the offline plots test was skipped although chromium"),
    (PASSED, NOTHING, False, "CI (avx2): no test passed"),
], ids=["both pass", "avx2 fails", "native fails", "a skip CI forbids", "none passed"])
def test_ci_fails_when_either_run_fails(tmp_path, native, avx2, passes, says):
    out, made = ci(tmp_path, {"native": native, "avx2": avx2})
    assert made == ["make test CPU_PROFILE=native", "make test CPU_PROFILE=avx2"], (made, out.stderr)  # both, always
    assert (out.returncode == 0) == passes, (out.returncode, out.stdout[-2000:], out.stderr[-2000:])
    if says:
        assert says in out.stderr and out.stderr.strip().splitlines()[-1].startswith("CI: failed under CPU_PROFILE="), \
            out.stderr
