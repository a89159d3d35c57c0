"""Blended: the poisoned pixels are (1 - alpha) * x + alpha * pattern, for the seeded
noise pattern and for a pattern read from a file."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

import attack
from attack.blended import Blended, noise_pattern
from utils.datasets import load_dataset
from utils.errors import UserError
from utils.records import load_record


def test_blended_pixels_follow_the_formula(tmp_path):
    attack.run("blended", dataset="digits", epochs=1, device="cpu", record_root=str(tmp_path), save_folder_name="b")
    record, data = load_record(tmp_path / "b"), load_dataset("digits")
    alpha, pattern = record.attack_params["alpha"], record.extras["pattern"]
    assert alpha == 0.2 and pattern.dtype == torch.uint8 and pattern.shape == (1, 8, 8)
    assert torch.equal(pattern, noise_pattern(1, (8, 8), seed=0))  # fixed by pattern_seed, not by the run
    for bd, clean in ((record.bd_test, data.test), (record.bd_train, data.train)):
        x = clean.images[bd.indices].double() / 255
        blended = ((1 - alpha) * x + alpha * pattern.double() / 255) * 255
        assert (bd.images.double() - blended).abs().max() <= 0.5 + 1e-4  # the formula, rounded to uint8


def test_noise_pattern_is_seeded_uniform_noise():
    a, b = noise_pattern(3, (32, 32), seed=0), noise_pattern(3, (32, 32), seed=1)
    assert torch.equal(a, noise_pattern(3, (32, 32), seed=0)) and not torch.equal(a, b)
    assert a.shape == (3, 32, 32) and abs(a.float().mean().item() - 127.5) < 8 and a.min() < 10 and a.max() > 245


def test_pattern_from_a_file_is_resized_to_the_input(tmp_path):
    image = np.tile(np.linspace(0, 255, 20, dtype=np.uint8), (12, 1))  # a 12x20 grey ramp
    path = tmp_path / "ramp.png"
    cv2.imwrite(str(path), image)
    blend = Blended(alpha=0.5, pattern_path=str(path))
    pattern = blend.make_pattern(1, (8, 8))
    expected = cv2.resize(image, (8, 8), interpolation=cv2.INTER_LINEAR)
    assert torch.equal(pattern[0], torch.from_numpy(expected))
    x = torch.zeros(2, 1, 8, 8)
    assert torch.allclose(blend.apply(x), 0.5 * torch.from_numpy(expected).float() / 255, atol=1e-6)
    assert blend.make_pattern(3, (8, 8)).shape == (3, 8, 8)


def test_missing_pattern_file_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="attack blended: pattern_path .*nope.png: no such file"):
        attack.run("blended", dataset="digits", pattern_path=str(tmp_path / "nope.png"), record_root=str(tmp_path))
    assert list(tmp_path.iterdir()) == []
