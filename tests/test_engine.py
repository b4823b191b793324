"""The training loop: schedules, early stopping with best-weights restore, determinism, never touching test."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from kdpipe.config import StudentConfig
from kdpipe.data.batches import Split
from kdpipe.models.zoo import build_model
from kdpipe.run import runtime
from kdpipe.train.engine import fit, lr_factor
from kdpipe.train.inference import score
from kdpipe.train.objective import Objective


def _cfg(**kw) -> StudentConfig:
    base = dict(model="small_cnn", epochs=6, batch_size=32, lr=0.05, warmup_epochs=0, patience=0, weight_decay=0.0)
    return StudentConfig(**{**base, **kw})


def _toy_data(n: int = 256, seed: int = 0) -> tuple[Split, Split]:
    """Class = which half (top/bottom) of an 8×8 image is brighter: learnable in a few epochs."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randint(0, 100, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    x[y == 0, :, :4] += 120
    x[y == 1, :, 4:] += 120
    return Split(x[: n // 2], y[: n // 2]), Split(x[n // 2 :], y[n // 2 :])


@pytest.fixture
def rt():
    return runtime.setup(0, device="cpu")


def test_lr_factor_warmup_cosine_step():
    cfg = _cfg(epochs=10, warmup_epochs=2, schedule="cosine")
    assert lr_factor(0.0, cfg) == pytest.approx(1e-3 / 2)
    assert lr_factor(1.0, cfg) == pytest.approx((1 + 1e-3) / 2)
    assert lr_factor(2.0, cfg) == pytest.approx(1.0)
    assert lr_factor(6.0, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(10.0, cfg) == pytest.approx(0.0, abs=1e-12)
    step = _cfg(epochs=10, warmup_epochs=0, schedule="step", step_milestones=(0.5, 0.8), step_gamma=0.1)
    assert [lr_factor(e, step) for e in (0, 4.9, 5, 7.9, 8)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    assert lr_factor(3.3, _cfg(schedule="constant")) == 1.0


def test_fit_learns_and_is_deterministic_on_cpu(rt):
    train, val = _toy_data()
    runs = []
    for _ in range(2):
        runtime.seed_everything(0)
        model = build_model("small_cnn", 1, 2)
        result = fit(model, train, val, _cfg(), rt, seed=0)
        runs.append((result.history, score(model, val, rt)))
    (hist_a, val_a), (hist_b, val_b) = runs
    assert val_a["accuracy"] > 0.9
    assert [r["train_loss"] for r in hist_a] == [r["train_loss"] for r in hist_b]
    assert val_a == val_b
    assert [r["epoch"] for r in hist_a] == list(range(1, 7))
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds"} <= set(hist_a[0])


def test_early_stopping_stops_after_patience_when_nothing_improves(rt):
    train, val = _toy_data()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))  # no BatchNorm statistics to drift

    def no_signal(model, x, y, idx):  # zero gradient: weights never move, val accuracy never improves
        logits = model(x)
        return logits, {"loss": logits.sum() * 0.0}

    result = fit(model, train, val, _cfg(epochs=20, patience=3, momentum=0.0, nesterov=False), rt, seed=0,
                 objective=Objective(no_signal))
    assert result.best_epoch == 1
    assert result.epochs_run == 4 and result.stopped_early


def test_best_weights_are_restored(rt):
    """Epoch 1 learns; later epochs ascend the loss. The model handed back is epoch 1's."""
    train, val = _toy_data()
    runtime.seed_everything(0)
    model = build_model("small_cnn", 1, 2)
    calls = {"epoch": 0, "seen": 0}

    def learn_then_sabotage(model, x, y, idx):
        calls["seen"] += len(idx)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        sabotage = calls["seen"] > len(train)  # after the first epoch
        return logits, {"loss": -10 * loss if sabotage else loss}

    result = fit(model, train, val, _cfg(epochs=4, lr=0.1), rt, seed=0, objective=Objective(learn_then_sabotage))
    best = result.history[result.best_epoch - 1]
    assert result.history[-1]["val_accuracy"] < best["val_accuracy"]
    assert score(model, val, rt)["accuracy"] == pytest.approx(best["val_accuracy"])


def test_epoch_pool_limits_samples_and_trains_extra_modules(rt):
    train, val = _toy_data()
    model = build_model("small_cnn", 1, 2)
    extra = torch.nn.Linear(2, 2)
    before = extra.weight.detach().clone()

    def with_extra(model, x, y, idx):
        assert idx.max() < 40  # only the pool's positions are drawn
        logits = extra(model(x))
        return logits, {"loss": F.cross_entropy(logits, y)}

    objective = Objective(with_extra, extra_modules=[extra], epoch_pool=lambda epoch: torch.arange(40))
    result = fit(model, train, val, _cfg(epochs=2), rt, seed=0, objective=objective)
    assert [r["train_samples"] for r in result.history] == [40, 40]
    assert not torch.equal(before, extra.weight)


def test_cpu_runtime_is_deterministic_without_importing_inductor():
    """setup() turns on deterministic kernels (warn-only) without torch.use_deterministic_algorithms' import of
    torch._inductor, which costs every stage process ~1.4 s and only matters to torch.compile."""
    code = ("import sys, torch; from kdpipe.run import runtime; runtime.setup(0, 'cpu'); "
            "print(torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(), "
            "'torch._inductor' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True", "False"]
