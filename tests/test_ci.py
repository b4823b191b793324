"""`.ci/run`'s verdict, with `make`, `apt-get` and `chromium` stubbed (the suite itself is what `make test` and
`make test-e2e` run): both tiers run natively and under CPU_PROFILE=avx2, all four always, and CI fails when any
run fails, passes no test or skips a test whose dependency CI installed."""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# What the stub `make <target> CPU_PROFILE=<p>` prints and exits with, by profile (both targets) or by
# "<profile> <target>" (that one).
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
    answers = {f"{target} CPU_PROFILE={key.split()[0]}": outcome for key, outcome in outcomes.items() if " " not in key
               for target in ("test", "test-e2e")}
    answers.update({f"{key.split()[1]} CPU_PROFILE={key.split()[0]}": o for key, o in outcomes.items() if " " in key})
    cases = "".join(f"  {shlex.quote(args)}) printf '%s\\n' {shlex.quote(text)}; exit {code};;\n"
                    for args, (text, code) in answers.items())
    stub(bin_dir, "make", f'echo "make $*" >> {tmp_path / "made"}\ncase "$*" in\n{cases}  *) exit 99;;\nesac\n')
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(["bash", str(root / ".ci/run")], cwd=root, env=env, capture_output=True, text=True,
                         timeout=60)
    made = (tmp_path / "made").read_text().splitlines() if (tmp_path / "made").exists() else []
    return out, made


@pytest.mark.parametrize(("native", "avx2", "passes", "says"), [
    (PASSED, PASSED, True, None),
    (PASSED, FAILED, False, "CI (avx2, make test): exited 1"),
    (FAILED, PASSED, False, "CI (native, make test): exited 1"),
    (SKIPPED_CHROMIUM, PASSED, False, "CI (native, make test): the offline plots test was skipped although chromium"),
    (PASSED, NOTHING, False, "CI (avx2, make test): no test passed"),
], ids=["both pass", "avx2 fails", "native fails", "a skip CI forbids", "none passed"])
def test_ci_fails_when_either_run_fails(tmp_path, native, avx2, passes, says):
    out, made = ci(tmp_path, {"native": native, "avx2": avx2})
    # both tiers under both profiles, always
    assert made == [f"make {target} CPU_PROFILE={profile}" for profile in ("native", "avx2")
                    for target in ("test", "test-e2e")], (made, out.stderr)
    assert (out.returncode == 0) == passes, (out.returncode, out.stdout[-2000:], out.stderr[-2000:])
    if says:
        assert says in out.stderr and out.stderr.strip().splitlines()[-1].startswith("CI: failed under CPU_PROFILE="), \
            out.stderr


def test_ci_fails_when_only_the_e2e_tier_fails(tmp_path):
    out, made = ci(tmp_path, {"native": PASSED, "avx2": PASSED, "avx2 test-e2e": FAILED})
    assert made[-1] == "make test-e2e CPU_PROFILE=avx2" and len(made) == 4, made
    assert out.returncode != 0 and "CI (avx2, make test-e2e): exited 1" in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1] == "CI: failed under CPU_PROFILE=avx2 (make test-e2e)", out.stderr
