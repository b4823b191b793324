"""The suite's own scheduling: under `make test`'s `-n 2 --dist loadgroup` the groups conftest gives reach the
node ids that xdist schedules by. With pytest 9.2 and pytest-xdist 3.8 they did not (xdist writes the group into
a field pytest 9.2 no longer reads), so tests sharing a module fixture or the DVC repo ran on both workers and
each built it; pyproject.toml pins pytest below 9.2 for that."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_module_fixtures_tests_are_one_group_under_loadgroup():
    # test_text_data.py has a module-scoped fixture (rows): its tests form the group named after the file.
    out = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "1", "--dist", "loadgroup",
                          "-v", "tests/test_text_data.py", "-k", "textfile_gives and csv"],
                         cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    passed = [line for line in out.stdout.splitlines() if " PASSED " in line]
    assert passed and all(line.rstrip().endswith("@tests/test_text_data.py") for line in passed), passed
