"""Two at once: two pipelines logging to one new sqlite store; two exports racing for the champion alias, with
a sqlite store's file lock and with the registry lease a server store gets; a second `make run` in a checkout
where DVC is already running."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from conftest import REPO, dvc_status, subprocess_env, tiny_params, write_params

from kdpipe import store as mlflow_store
from kdpipe.ship import gate, lease

NAME = "m"

# Every racer signals it is ready, then waits for the test's "go": interpreter start-up (seconds, unequal)
# must not decide who runs first.
BARRIER = """
import os as _os, pathlib as _pathlib, time as _time
_pathlib.Path(_os.environ["READY_FILE"]).touch()
while not _os.path.exists(_os.environ["GO_FILE"]):
    _time.sleep(0.01)
"""


def race(scripts: list[tuple[str, list[str], Path, dict]], folder: Path) -> list[tuple[int, str, str]]:
    """Run (python code with BARRIER in it, argv, cwd, env) processes, release them together, and return
    (exit code, stdout, stderr) of each."""
    procs = []
    for i, (code, argv, cwd, env) in enumerate(scripts):
        env = {**env, "READY_FILE": str(folder / f"ready{i}"), "GO_FILE": str(folder / "go")}
        procs.append(subprocess.Popen([sys.executable, "-c", code, *argv], cwd=cwd, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    deadline = time.monotonic() + 60
    while not all((folder / f"ready{i}").exists() for i in range(len(procs))):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a racer died before the start"
        time.sleep(0.02)
    (folder / "go").touch()
    outputs = [p.communicate(timeout=120) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs, strict=True)]


# --------------------------------------------------------------------------------- two pipelines, one store

PIPELINE = BARRIER + """
import importlib, sys
for stage in ("prepare", "teacher", "scratch", "distill", "evaluate", "export"):  # dvc.yaml's order
    if importlib.import_module(f"kdpipe.stages.{stage}").main([]) != 0:
        sys.exit(f"{stage} failed")
"""


@pytest.mark.e2e
@pytest.mark.slow
def test_two_pipelines_create_and_share_one_new_store(tmp_path):
    """Two workspaces run the whole pipeline (all six stages, each stage's main() as DVC would call it, in one
    process to spare five interpreter start-ups) at the same moment against one sqlite store that does not
    exist yet (two processes creating one store at once corrupted it): both exit 0, all twelve runs FINISHED,
    and both exports' registry versions are there."""
    store = tmp_path / "shared" / "mlflow.db"
    racers = []
    for name in ("a", "b"):
        work = tmp_path / name
        work.mkdir()
        params = tiny_params(work, tracking__uri=f"sqlite:///{store}", tracking__system_metrics=False)
        # About concurrency, not learning: one epoch, no chance guards.
        params["student"].update(seeds=[0], model="tiny_cnn", chance_guard=False, epochs=1, warmup_epochs=0)
        params["teacher"].update(chance_guard=False, epochs=1, warmup_epochs=0)
        params["export"].update(latency_repeats=3, calibration_images=16)
        path = write_params(work / "params.yaml", params)
        racers.append((PIPELINE, [], work, subprocess_env(KDPIPE_PARAMS=str(path))))
    for code, out, err in race(racers, tmp_path):
        assert code == 0, f"{out[-2000:]}\n{err[-3000:]}"
    client = mlflow.MlflowClient(f"sqlite:///{store}")
    runs = client.search_runs([client.get_experiment_by_name("kdpipe").experiment_id])
    stages = ["prepare", "teacher", "scratch", "distill", "evaluate", "export"]
    assert sorted((r.info.run_name, r.info.status) for r in runs) == sorted((s, "FINISHED") for s in stages * 2)
    versions = client.search_model_versions("name = 'kdpipe-student'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert Path(f"{store}{mlflow_store.LOCK_SUFFIX}").is_file()  # created under the lock beside it


# ------------------------------------------------------------------------ two exports, one champion alias

GATES = """
import json, sys, time
import mlflow
from kdpipe.ship import gate, lease

uri, lock, accuracies = sys.argv[1], sys.argv[2], [float(a) for a in sys.argv[3].split(",")]
if lock == "lease":  # the lock a server store gets, exercised here on sqlite
    gate.gate_lock = lease.registry_lease
read = gate.current_champion


def slow_read(*args, **kwargs):  # a slow store: a wide window between reading the aliases and moving them
    holder = read(*args, **kwargs)
    time.sleep(0.05)
    return holder


gate.current_champion = slow_read
client = mlflow.MlflowClient(uri, registry_uri=uri)
""" + BARRIER + """
for accuracy in accuracies:
    tags = {"val_accuracy": str(accuracy), "test_accuracy": str(accuracy), "dataset_digest": "d1"}
    version = client.create_model_version("m", source=sys.argv[4], tags=tags)
    print(json.dumps(gate.apply_gate(client, "m", version.version)))
"""


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("lock", ["file", "lease"])
def test_racing_exports_keep_every_version_and_crown_the_best(tmp_path, lock):
    """Two processes register and gate 5 versions each, at once, accuracies interleaved so that most gates
    take champion: every version is there, champion ends on the best, candidate on the newest, and the
    gates ran one at a time (each champion move started from the previous one: no two from the same)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow_store.prepare_store(uri)
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    client.create_registered_model(NAME)
    accuracies = {"a": [0.50, 0.60, 0.70, 0.80, 0.90], "b": [0.55, 0.65, 0.75, 0.85, 0.95]}
    racers = [(GATES, [uri, lock, ",".join(map(str, accs)), str(tmp_path)], tmp_path, subprocess_env())
              for accs in accuracies.values()]
    gates = []
    for code, out, err in race(racers, tmp_path):
        assert code == 0, err[-3000:]
        gates += [json.loads(line) for line in out.splitlines()]
    versions = {str(v.version): float(v.tags["test_accuracy"])
                for v in client.search_model_versions(f"name = '{NAME}'")}
    assert sorted(versions.values()) == sorted(accuracies["a"] + accuracies["b"]) and len(gates) == 10
    assert {int(v) for v in versions} == set(range(1, 11))
    best = max(versions, key=versions.get)
    aliases = {alias: str(version) for alias, version in client.get_registered_model(NAME).aliases.items()}
    assert aliases == {"champion": best, "candidate": "10"}
    moves = {g["previous_champion"]: g["version"] for g in gates if g["champion"]}
    assert len(moves) == sum(g["champion"] for g in gates), f"two gates took champion from the same one: {gates}"
    holder, chain = None, []
    while holder in moves:
        holder = moves[holder]
        chain.append(holder)
    assert holder == best and len(chain) == len(moves), (chain, gates)
    assert [m.name for m in client.search_registered_models()] == [NAME]  # no lease left behind


def test_a_racer_older_than_the_champion_needs_to_be_strictly_better():
    """Gated after a newer version (the two raced): ties and changed data stay with the newer champion."""
    decide, champion = gate.champion_decision, {"val_accuracy": "0.9", "dataset_digest": "d1"}
    assert decide(0.9, "d1", champion)[0] and not decide(0.9, "d1", champion, newer_champion=True)[0]
    assert decide(0.91, "d1", champion, newer_champion=True)[0]
    assert decide(0.5, "d2", champion)[0] and not decide(0.99, "d2", champion, newer_champion=True)[0]


def test_a_lease_left_by_a_crashed_export_is_broken(tmp_path, monkeypatch):
    """A lease nobody releases (its holder died) is deleted once seen unchanged for LEASE_STALE_S; then the
    gate takes and releases its own."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    client.create_registered_model(f"{NAME}{lease.LEASE_SUFFIX}")
    monkeypatch.setattr(lease, "LEASE_STALE_S", 0.3)
    t0 = time.monotonic()
    with lease.registry_lease(client, NAME):
        waited = time.monotonic() - t0
        assert [m.name for m in client.search_registered_models()] == [f"{NAME}{lease.LEASE_SUFFIX}"]
    assert 0.3 <= waited < 5 and client.search_registered_models() == []


# -------------------------------------------------------------------------- a second `make run` in a checkout

REFUSED = "kdpipe: another dvc command is running in this checkout (.dvc/tmp/lock); wait for it or stop it"

@pytest.mark.e2e
@pytest.mark.slow
def test_second_make_run_is_refused_in_one_line_and_the_first_completes(dvc_repo, tmp_path):
    """While `dvc repro --force prepare` runs its stage, the Makefile's `run` target (its `venv` prerequisite
    skipped) exits non-zero with one plain line last; the first run finishes and leaves dvc.lock consistent."""
    root, rwlock = dvc_repo.root, dvc_repo.root / ".dvc/tmp/rwlock"
    env = subprocess_env()
    first = subprocess.Popen([str(Path(sys.executable).parent / "dvc"), "repro", "--force", "prepare"], cwd=root,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30  # until the stage's command runs (DVC holds its rwlock on the outputs)
        while "data/prepared" not in (rwlock.read_text() if rwlock.exists() else "") and first.poll() is None:
            assert time.monotonic() < deadline, "dvc repro never started the stage"
            time.sleep(0.05)
        second = subprocess.run(["make", "-f", str(REPO / "Makefile"), "-o", "venv", "run"], cwd=root, env=env,
                                capture_output=True, text=True, timeout=60)
        out, _ = first.communicate(timeout=60)
        assert first.returncode == 0, out
        assert second.returncode != 0, second.stdout + second.stderr
        ours = [line for line in second.stderr.splitlines() if not line.startswith("make")]  # make's own last
        assert ours[-1] == REFUSED, second.stderr
        assert dvc_status(root) == {}  # dvc.lock matches the workspace: the first run recorded what it made
    finally:
        if first.poll() is None:
            first.kill()
        dvc_repo.restore()
