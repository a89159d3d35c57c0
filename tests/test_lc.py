"""LC: only target-class training images are poisoned and keep their labels; they carry a
bounded adversarial perturbation and the corner trigger, test images the trigger only."""

from __future__ import annotations

import pytest
import torch

import attack
from attack.lc import corner_trigger, stamp
from utils.datasets import load_dataset
from utils.errors import UserError
from utils.poison import to_uint8
from utils.records import load_record


def test_corner_trigger_is_four_3x3_patches():
    pattern = corner_trigger((8, 10))
    assert torch.equal(pattern[:3, :3], torch.tensor([[1.0, -1, -1], [-1, 1, -1], [1, -1, 1]]))
    assert torch.equal(pattern[-3:, -3:], torch.tensor([[-1.0, -1, 1], [-1, 1, -1], [1, -1, 1]]))
    assert (pattern != 0).sum() == 36 and pattern[3:-3].abs().sum() == 0 and pattern[:, 3:-3].abs().sum() == 0
    x = torch.full((1, 2, 8, 10), 0.5)
    assert set(stamp(x, pattern, 1.0).unique().tolist()) == {0.0, 0.5, 1.0}
    with pytest.raises(UserError, match="at least 6x6"):
        corner_trigger((5, 8))


def test_digits_record_poisons_only_target_class_images_and_keeps_labels(tmp_path):
    attack.run(
        "lc", dataset="digits", epochs=1, pgd_steps=3, device="cpu", record_root=str(tmp_path), save_folder_name="l"
    )
    record, data = load_record(tmp_path / "l"), load_dataset("digits")
    assert len(record.poison_indices) == round(0.05 * len(data.train))
    assert torch.all(data.train.labels[record.poison_indices] == 0)  # the target class only
    assert torch.all(record.bd_train.labels == 0) and torch.all(record.bd_train.original_labels == 0)
    pattern, eps = record.extras["pattern"], record.attack_params["eps"]
    triggered = to_uint8(stamp(data.test.images[record.bd_test.indices].float() / 255, pattern, 1.0))
    assert torch.equal(record.bd_test.images, triggered)  # test images: the trigger only
    clean = data.train.images[record.poison_indices]
    trigger_only = to_uint8(stamp(clean.float() / 255, pattern, 1.0))
    inside = pattern == 0
    diff = (record.bd_train.images.int() - clean.int())[..., inside]
    assert diff.abs().max() <= eps + 1  # the PGD perturbation stays in the ball (uint8 rounding)
    assert (record.bd_train.images != trigger_only).flatten(1).any(1).float().mean() > 0.5  # and is there
    assert torch.equal(record.bd_train.images[..., ~inside], trigger_only[..., ~inside])  # corners: the trigger
