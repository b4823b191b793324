"""Data-parallel training (runtime.processes: 2): the distill stage as two gloo ranks on the CPU, launched as
torchrun launches them, against the same stage in one process; and a rank that fails ends both."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlflow
import pytest
from conftest import subprocess_env, write_params

from kdpipe import config
from kdpipe.run.runtime import Runtime
from kdpipe.train import engine

pytestmark = pytest.mark.slow

# One seed, fp32 (a rerun gives the same numbers), the same global batch, enough epochs for the digits student
# to settle (params.yaml's 30). The runs differ in BatchNorm statistics (per rank's half batch: torch's SyncBatchNorm is
# CUDA-only) and in reduction order.
SETTINGS = dict(runtime__precision="fp32", student__model="small_cnn", student__seeds=[0], student__epochs=30,
                student__batch_size=128,
                student__patience=0)


def _distill(tiny_pipeline, root, processes: int, env: dict | None = None) -> subprocess.CompletedProcess:
    params = tiny_pipeline.workspace(root, runtime__processes=processes, **SETTINGS)
    path = write_params(root / "params.yaml", params)
    return subprocess.run([sys.executable, "-m", "kdpipe.stages.distill", "--params", str(path)], cwd=root,
                          env=env or subprocess_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.e2e
def test_two_ranks_train_one_student_with_one_run_and_one_set_of_outputs(tiny_pipeline, tmp_path):
    one = _distill(tiny_pipeline, tmp_path / "one", 1)
    (tmp_path / "tmp").mkdir()
    two = _distill(tiny_pipeline, tmp_path / "two", 2, env=subprocess_env(TMPDIR=str(tmp_path / "tmp")))
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / run / "metrics/distill.json").read_text()) for run in ("one", "two"))
    assert abs(a["test_accuracy"] - b["test_accuracy"]) <= 0.01, (a["test_accuracy"], b["test_accuracy"])
    assert b["params"]["runtime"]["processes"] == 2
    assert sorted(p.name for p in (tmp_path / "two/models/distill").iterdir()) == ["seed0.pt"]
    assert two.stderr.count("distill seed 0 epoch 30/30") == 1  # progress from rank 0 only
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'two' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(config.from_dict({}).tracking.experiment)
    runs = client.search_runs([experiment.experiment_id], "tags.stage = 'distill'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert not list((tmp_path / "tmp").glob("kdpipe-distill-ranks-*"))  # the ranks' log folder is gone


@pytest.mark.e2e
def test_a_failing_rank_ends_every_rank_with_its_error(tiny_pipeline, tmp_path):
    """Rank 1 raises a user error as it starts training (injected through sitecustomize, which every rank's
    interpreter imports): both ranks end, the stage exits 2 with rank 1's message on one line, nothing written."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import kdpipe.train.engine\n"
        "    from kdpipe.errors import UserError\n"
        "    def fit(*args, **kwargs):\n"
        "        raise UserError('injected failure on rank 1')\n"
        "    kdpipe.train.engine.fit = fit\n")
    env = subprocess_env(PYTHONPATH=os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")])))
    out = _distill(tiny_pipeline, tmp_path / "run", 2, env=env)
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if "error" in line.lower()]
    assert errors == ["kdpipe distill: error: rank 1: injected failure on rank 1"], out.stderr[-3000:]
    assert not (tmp_path / "run/models/distill").exists()


def test_one_process_is_untouched_by_the_data_parallel_hooks():
    """Outside torchrun the shard is the whole batch and the model is not wrapped."""
    from kdpipe.models.zoo import build_model
    from kdpipe.run import distributed

    model = build_model("tiny_cnn", 1, 10)
    assert not distributed.active() and distributed.wrap(model, Runtime(engine.torch.device("cpu")).device, False) is model
    x = engine.torch.arange(6)
    assert engine.torch.equal(distributed.shard(x), x)


def test_crd_refuses_several_processes():
    with pytest.raises(config.ConfigError, match="runtime.processes: CRD's memory banks"):
        config.from_dict({"runtime": {"processes": 2}, "distill": {"method": "crd"}})
