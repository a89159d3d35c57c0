"""TeCo (defense/teco.py) and its corruptions (defense/corruptions.py): the flip severity
and the deviation by hand, the corruptions' definitions on hand cases, seeded noise, and
a model whose prediction rests on one bright pixel (a trigger) against one that reads the
whole image."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from defense.corruptions import CORRUPTIONS, LEVELS, corrupt
from defense.teco import TeCo, flip_severity


def test_flip_severity_by_hand():
    original = torch.tensor([1, 1, 2])
    predictions = torch.tensor(
        [
            [1, 1, 0, 0, 0],  # first change at severity 3
            [1, 1, 1, 1, 1],  # never: 5 + 1
            [0, 2, 2, 2, 2],
        ]
    )  # at once: 1
    assert flip_severity(predictions, original).tolist() == [3, 6, 1]


def test_corruptions_by_hand():
    x = torch.full((1, 1, 4, 4), 0.5)
    x[0, 0, 0, 0] = 0.1
    assert torch.allclose(corrupt(x, "brightness", 5), (x + 0.3).clamp(0, 1))
    mean = x.mean()
    assert torch.allclose(corrupt(x, "contrast", 2), (x - mean) * 0.5 + mean)
    assert torch.equal(corrupt(torch.full((2, 3, 8, 8), 0.25), "pixelate", 1), torch.full((2, 3, 8, 8), 0.25))
    assert corrupt(torch.full((1, 1, 8, 8), 0.6), "jpeg_compression", 5).sub(0.6).abs().max() < 0.01
    blurred = corrupt(torch.eye(8).view(1, 1, 8, 8), "gaussian_blur", 5)
    assert blurred.sum().item() == pytest.approx(8.0, rel=0.05) and blurred.max() < 0.6  # mass kept, spread
    g = torch.Generator().manual_seed(0)
    noisy = corrupt(torch.full((1, 1, 64, 64), 0.5), "gaussian_noise", 5, g)
    assert noisy.std().item() == pytest.approx(0.10, rel=0.1)
    salt = corrupt(torch.full((1, 1, 100, 100), 0.5), "impulse_noise", 5, torch.Generator().manual_seed(0))
    assert ((salt == 0) | (salt == 1)).float().mean().item() == pytest.approx(0.07, abs=0.01)
    for name in CORRUPTIONS:  # seeded: the same draw twice
        a = corrupt(
            torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)),
            name,
            3,
            torch.Generator().manual_seed(5),
        )
        b = corrupt(
            torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)),
            name,
            3,
            torch.Generator().manual_seed(5),
        )
        assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1 and len(LEVELS[name]) == 5
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(x, "fog", 1)


class Corner(nn.Module):
    """Class 1 when the bottom-right pixel is bright (a one-pixel trigger), else class 0."""

    def forward(self, x):
        v = x[:, 0, -1, -1]
        return torch.stack([0.75 - v, v - 0.75], 1)


def test_a_trigger_pixel_flips_at_inconsistent_severities():
    teco = TeCo(corruptions=["brightness", "contrast", "gaussian_blur"])
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, -1, -1] = 1.0  # the trigger: class 1
    g = torch.Generator().manual_seed(0)
    severities = teco.severities(Corner(), x, g)
    # brightness keeps the pixel bright: never flips (6). Contrast: 1/64 + c * 63/64 is 0.754 at c = 0.75
    # (class 1), 0.508 at c = 0.5: flips at 2. Blur (reflect padding, the neighbours dark): the pixel keeps
    # (1 / (1 + 2 e^(-1 / (2 sigma^2))))^2 = 0.845 at sigma 0.4, 0.44 at sigma 0.6: flips at 2
    assert severities.tolist() == [[6, 2, 2]]
    assert teco.deviation(Corner(), x, g).item() == pytest.approx(torch.tensor([6.0, 2, 2]).std(unbiased=False).item())
    dark = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.4  # class 0 throughout
    assert teco.severities(Corner(), dark, g).tolist() == [[6, 6, 6]] and teco.deviation(Corner(), dark, g) == 0
