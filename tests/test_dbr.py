"""D-BR (defense/dbr.py) and the feature-sensitivity split it shares with D-ST
(defense/sensitivity.py): the transformations, the FCT, the thresholds, the centre
separation loss, and a short run's split."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from defense.dbr import DBR
from defense.sensitivity import (
    affine_view,
    centre_separation_loss,
    feature_sensitivity,
    random_view,
    separate,
    thresholds,
)
from defense.training import delivered_set
from utils.datasets import load_dataset
from utils.models import create_model
from utils.records import load_record


@pytest.fixture(scope="module")
def delivered(digits_record_root):
    return delivered_set(load_record(digits_record_root / "badnet_digits"), load_dataset("digits"), torch.device("cpu"))


def test_translation_and_quarter_turns_are_exact():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    zero = torch.zeros(2)
    shifted = affine_view(x, zero, torch.ones(2), zero)
    assert torch.equal(shifted[..., 1:], x[..., :-1]) and torch.equal(shifted[..., 0], torch.zeros(2, 1, 4))
    down = affine_view(x, zero, zero, torch.full((2,), 2.0))
    assert torch.equal(down[..., 2:, :], x[..., :2, :]) and not down[..., :2, :].any()
    turned = affine_view(x, torch.full((2,), 90.0), zero, zero)
    assert torch.equal(turned, torch.rot90(x, 1, (2, 3))) or torch.equal(turned, torch.rot90(x, -1, (2, 3)))
    assert torch.equal(affine_view(x, zero, zero, zero, torch.ones(2, dtype=torch.bool)), x.flip(-1))
    assert torch.equal(affine_view(x, zero, zero, zero), x)


def test_random_views_stay_within_their_ranges():
    x = torch.zeros(64, 1, 10, 10)
    x[:, :, 4:6, 4:6] = 1.0  # a centred square: rotations keep it, shifts of up to 2 pixels move it
    view = random_view(x, ("affine",), torch.Generator().manual_seed(0))
    assert torch.equal(view.sum((1, 2, 3)), x.sum((1, 2, 3)))  # whole-pixel shifts of at most 2 lose nothing
    moved = (view != x).flatten(1).any(1)
    assert 0 < int(moved.sum()) < 64
    assert torch.equal(
        random_view(x, ("rotate", "affine"), torch.Generator().manual_seed(3)),
        random_view(x, ("rotate", "affine"), torch.Generator().manual_seed(3)),
    )


def test_thresholds_and_split_follow_backdoorbenchs_counts():
    fct = torch.tensor([0.5, 0.1, 0.9, 0.05, 0.3, 0.7, 0.2, 0.8, 0.6, 0.4])
    assert thresholds(fct, 0.2, 0.2) == (pytest.approx(0.2), pytest.approx(0.8))  # sorted[2], sorted[8]
    clean, poisoned = separate(fct, 0.2, 0.2)
    assert clean.tolist() == [1, 3, 6] and poisoned.tolist() == [2, 7]


def test_centre_separation_loss_by_hand():
    labels = torch.tensor([0, 0, 1, 1])
    orthogonal = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0]])
    assert float(centre_separation_loss(orthogonal, labels, 3)) == pytest.approx(0.0)
    same = torch.tensor([[1.0, 1.0], [1.0, 1.0], [2.0, 2.0], [2.0, 2.0]])
    assert float(centre_separation_loss(same, labels, 3)) == pytest.approx(0.5)  # [[0, 1], [1, 0]] / 4


def test_feature_sensitivity_recomputed_independently(delivered):
    model = create_model("cnn", 10, 1, (8, 8), (0.5,), (0.5,)).eval()
    fct = feature_sensitivity(model, delivered, ("rotate", "affine"), torch.Generator().manual_seed(5), batch_size=500)
    generator = torch.Generator().manual_seed(5)
    x = delivered.train.images.float() / 255
    expected = []
    with torch.no_grad():
        for start in range(0, len(x), 500):
            batch = x[start : start + 500]
            view = random_view(batch, ("rotate", "affine"), generator)
            expected.append(((model.penultimate(batch) - model.penultimate(view)) ** 2).mean(1))
    assert torch.allclose(fct, torch.cat(expected))


def test_a_short_run_splits_by_the_ratios_and_unlearns(delivered):
    torch.manual_seed(0)
    dbr = DBR(sd_epochs=1, sd_finetune_epochs=1, br_epochs=1, br_lr=0.05, epochs=2)
    dbr.train(held := dataclasses.replace(delivered))  # its own outputs (what the method hands over)
    clean, poisoned = held.outputs.extras["clean"], held.outputs.extras["poisoned"]
    n = len(delivered)
    assert len(clean) >= int(0.2 * n) and len(poisoned) >= int(0.05 * n)
    assert not set(clean.tolist()) & set(poisoned.tolist())
    assert held.outputs.summary == {"taken_as_clean": len(clean), "taken_as_poisoned": len(poisoned)}
