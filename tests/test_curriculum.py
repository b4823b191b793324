"""Curriculum: pacing shapes, orderings, subsets and difficulty scores."""

import math

import pytest
import torch

from kdpipe.distill import curriculum, methods


@pytest.mark.parametrize("kind", methods.PACINGS)
@pytest.mark.parametrize("start", [0.1, 0.25, 1.0])
def test_pacing_endpoints_and_monotone(kind, start):
    full = 10
    values = [curriculum.pacing(e, kind=kind, start_fraction=start, full_epoch=full) for e in range(25)]
    assert values[0] == pytest.approx(start)
    assert all(v == 1.0 for v in values[full:])
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))
    assert all(start <= v <= 1.0 for v in values)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("linear", 0.2 + 0.8 * 0.5),
        ("root", 0.2 + 0.8 * math.sqrt(0.5)),
        ("geometric", 0.2**0.5),
        ("step", 0.2 + 0.8 * 1 / 3),  # steps = 4 levels: ⌊3 · 0.5⌋ = 1 of 3 increments
    ],
)
def test_pacing_midpoint_values(kind, expected):
    assert curriculum.pacing(5, kind=kind, start_fraction=0.2, full_epoch=10) == pytest.approx(expected)


@pytest.mark.parametrize("steps", [2, 4, 5])
def test_step_pacing_takes_steps_distinct_values(steps):
    values = {curriculum.pacing(e, kind="step", start_fraction=0.2, full_epoch=20, steps=steps) for e in range(30)}
    assert len(values) == steps
    assert min(values) == pytest.approx(0.2) and max(values) == 1.0


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        (dict(kind="cosine", start_fraction=0.5, full_epoch=5), "pacing"),
        (dict(kind="linear", start_fraction=0.0, full_epoch=5), "start_fraction"),
        (dict(kind="linear", start_fraction=1.5, full_epoch=5), "start_fraction"),
        (dict(kind="linear", start_fraction=0.5, full_epoch=0), "full_epoch"),
        (dict(kind="step", start_fraction=0.5, full_epoch=5, steps=1), "steps"),
    ],
)
def test_pacing_bad_args(kwargs, key):
    with pytest.raises(ValueError, match=f"^{key}"):
        curriculum.pacing(0, **kwargs)


def test_pacing_rejects_negative_epoch():
    with pytest.raises(ValueError, match="^epoch"):
        curriculum.pacing(-1, kind="linear", start_fraction=0.5, full_epoch=5)


def test_orderings():
    difficulty = torch.tensor([0.5, 0.1, 2.0, 0.3, 1.0])
    easy = curriculum.order(difficulty, "easy_to_hard", seed=0)
    assert easy.tolist() == [1, 3, 0, 4, 2]
    assert easy.dtype == torch.long
    assert curriculum.order(difficulty, "hard_to_easy", seed=0).tolist() == easy.flip(0).tolist()


def test_orderings_are_stable_on_ties():
    difficulty = torch.tensor([1.0, 0.0, 1.0, 0.0])
    assert curriculum.order(difficulty, "easy_to_hard", seed=0).tolist() == [1, 3, 0, 2]
    assert curriculum.order(difficulty, "hard_to_easy", seed=0).tolist() == [0, 2, 1, 3]


def test_random_ordering_is_seeded_permutation():
    difficulty = torch.rand(50)
    first = curriculum.order(difficulty, "random", seed=3)
    assert sorted(first.tolist()) == list(range(50))
    assert torch.equal(first, curriculum.order(difficulty, "random", seed=3))
    assert not torch.equal(first, curriculum.order(difficulty, "random", seed=4))


def test_order_rejects_unknown():
    with pytest.raises(ValueError, match="^ordering"):
        curriculum.order(torch.rand(3), "shortest_first", seed=0)


@pytest.mark.parametrize(("fraction", "size"), [(1.0, 10), (0.3, 3), (0.25, 3), (0.01, 1), (0.999, 10)])
def test_epoch_subset_sizes(fraction, size):
    ordered = torch.arange(10).flip(0)
    subset = curriculum.epoch_subset(ordered, fraction)
    assert len(subset) == size
    assert torch.equal(subset, ordered[:size])


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.1])
def test_epoch_subset_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="^fraction"):
        curriculum.epoch_subset(torch.arange(10), fraction)


def test_difficulty_is_teacher_cross_entropy_per_sample():
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0], [0.0, math.log(9.0)]])
    labels = torch.tensor([0, 1, 0])
    expected = [-math.log(0.75), -math.log(0.5), -math.log(0.1)]
    assert curriculum.difficulty_from_teacher(logits, labels).tolist() == pytest.approx(expected, rel=1e-6)
    logits = torch.randn(8, 5)
    labels = torch.randint(0, 5, (8,))
    by_hand = -torch.log_softmax(logits, dim=1)[torch.arange(8), labels]
    assert torch.allclose(curriculum.difficulty_from_teacher(logits, labels), by_hand)
