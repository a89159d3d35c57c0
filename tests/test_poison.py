"""Trigger placement, poison-index selection, label transforms and poisoned views."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attack.badnet import BadNet, scaled_patch_size
from utils.datasets import ImageData
from utils.errors import UserError
from utils.poison import (
    apply_trigger,
    bd_test_indices,
    corner_patch,
    poisoned_set,
    poisoned_training_set,
    select_poison_indices,
    target_labels,
    to_float,
    to_uint8,
)

LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 1, 1, 2, 2, 0, 1, 2, 1])  # 20 samples, 5 of class 0


def test_corner_patch_whitens_exactly_the_bottom_right_square():
    x = torch.zeros(2, 3, 32, 32)
    y = corner_patch(x, 3)
    assert torch.all(y[..., 29:, 29:] == 1.0)
    assert y.sum() == 2 * 3 * 9  # nothing else changed
    assert x.sum() == 0  # input untouched


@pytest.mark.parametrize("height,size", [(32, 3), (28, 3), (8, 1), (64, 6), (224, 21)])
def test_badnet_patch_scales_with_the_image(height, size):
    assert scaled_patch_size(height) == size
    x = torch.zeros(1, 1, height, height)
    y = BadNet().apply(x)
    assert y.sum() == size * size and torch.all(y[..., -size:, -size:] == 1)


def test_uint8_round_trip_and_trigger_application():
    images = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    assert torch.equal(to_uint8(to_float(images)), images)
    out = apply_trigger(images, lambda x: corner_patch(x, 2), batch_size=2)
    assert torch.all(out[..., -2:, -2:] == 255)
    assert torch.equal(out[..., :-2, :], images[..., :-2, :])


def test_label_transforms():
    y = torch.tensor([0, 1, 2, 9])
    assert target_labels(y, "all2one", 3, 10).tolist() == [3, 3, 3, 3]
    assert target_labels(y, "all2all", 3, 10).tolist() == [1, 2, 3, 0]
    with pytest.raises(UserError):
        target_labels(y, "one2one", 0, 10)


def test_dirty_label_selection_draws_from_all_samples_by_default_and_is_seeded():
    """BackdoorBench: round(pratio * N) of all N samples, target class included."""
    idx = select_poison_indices(
        LABELS, 0.25, label_trans="all2one", target=0, clean_label=False, rng=np.random.default_rng(1)
    )
    assert len(idx) == 5 and len(set(idx.tolist())) == 5
    assert torch.equal(idx, idx.sort().values)
    again = select_poison_indices(
        LABELS, 0.25, label_trans="all2one", target=0, clean_label=False, rng=np.random.default_rng(1)
    )
    other = select_poison_indices(
        LABELS, 0.25, label_trans="all2one", target=0, clean_label=False, rng=np.random.default_rng(2)
    )
    assert torch.equal(idx, again) and not torch.equal(idx, other)
    hits = [
        bool(
            (
                LABELS[
                    select_poison_indices(
                        LABELS,
                        0.25,
                        label_trans="all2one",
                        target=0,
                        clean_label=False,
                        rng=np.random.default_rng(seed),
                    )
                ]
                == 0
            ).any()
        )
        for seed in range(10)
    ]
    assert any(hits)  # some draws poison a target-class sample
    everything = select_poison_indices(
        LABELS, 1.0, label_trans="all2one", target=0, clean_label=False, rng=np.random.default_rng(0)
    )
    assert everything.tolist() == list(range(20))


def test_dirty_label_selection_with_exclude_target_class_skips_the_target():
    for seed in range(10):
        idx = select_poison_indices(
            LABELS,
            0.25,
            label_trans="all2one",
            target=0,
            clean_label=False,
            rng=np.random.default_rng(seed),
            exclude_target_class=True,
        )
        assert len(idx) == 5 and torch.all(LABELS[idx] != 0)


def test_all2all_selection_may_take_any_class():
    idx = select_poison_indices(
        LABELS, 1.0, label_trans="all2all", target=0, clean_label=False, rng=np.random.default_rng(0)
    )
    assert idx.tolist() == list(range(20))


def test_clean_label_selection_takes_target_class_and_caps_with_a_warning(caplog):
    idx = select_poison_indices(
        LABELS, 0.5, label_trans="all2one", target=0, clean_label=True, rng=np.random.default_rng(0)
    )
    assert torch.all(LABELS[idx] == 0) and len(idx) == 5  # 10 asked, 5 in the class
    assert "only 5 are eligible" in caplog.text


def test_bd_test_set_holds_every_non_target_sample():
    assert bd_test_indices(LABELS, "all2one", 0).tolist() == [i for i, y in enumerate(LABELS.tolist()) if y != 0]
    assert len(bd_test_indices(LABELS, "all2all", 0)) == len(LABELS)


def test_poisoned_training_set_swaps_in_the_poisoned_samples():
    clean = ImageData(torch.zeros(6, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 1, 2, 1, 2, 1]))
    idx = torch.tensor([1, 4])
    bd = poisoned_set(clean, idx, lambda x: corner_patch(x, 1), torch.tensor([0, 0]))
    assert bd.original_labels.tolist() == [1, 2]
    data, indicator = poisoned_training_set(clean, bd)
    assert data.labels.tolist() == [0, 0, 2, 1, 0, 1]
    assert indicator.tolist() == [False, True, False, False, True, False]
    assert data.images[1, 0, 3, 3] == 255 and data.images[0].sum() == 0
    assert clean.labels.tolist() == [0, 1, 2, 1, 2, 1]  # the clean split is untouched
