"""SCALE-UP (defense/scaleup.py): the scaled prediction consistency of a hand-made model
whose label is a brightness threshold, and the standardisation by the clean subset."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from defense.base import DefenseData
from defense.scaleup import ScaleUp, scaled_consistency
from utils.datasets import DatasetInfo, ImageData


class Brightness(nn.Module):
    """Class 1 when the mean pixel value exceeds 0.3, else class 0."""

    def forward(self, x):
        m = x.mean((1, 2, 3))
        return torch.stack([0.3 - m, m - 0.3], 1)


def test_consistency_of_a_brightness_model_by_hand():
    x = torch.stack([torch.full((1, 4, 4), 0.05), torch.full((1, 4, 4), 0.5), torch.full((1, 4, 4), 0.02)])
    # 0.05: label 0; scaled by 3, 5: 0.15, 0.25 (label 0); by 7, 9, 11: 0.35, 0.45, 0.55 (label 1) -> 2 of 5
    # 0.5: label 1 at every scale (clipped to 1) -> 5 of 5;  0.02: 0.06 ... 0.22, label 0 throughout -> 5 of 5
    spc = scaled_consistency(Brightness(), x, [3, 5, 7, 9, 11])
    assert spc.tolist() == pytest.approx([0.4, 1.0, 1.0])
    assert scaled_consistency(Brightness(), x[:1], [2]).item() == 1.0  # 0.10: still label 0


def test_the_detector_standardises_with_the_clean_subset():
    values = [0.05, 0.05, 0.5, 0.02]  # consistencies 0.4, 0.4, 1, 1: mean 0.7, std 0.3
    images = torch.stack([torch.full((1, 4, 4), round(v * 255)) for v in values]).to(torch.uint8)
    info = DatasetInfo(name="toy", num_classes=2, channels=1, size=(4, 4), mean=(0.5,), std=(0.5,))
    data = DefenseData(ImageData(images, torch.zeros(4)), info, torch.device("cpu"))
    up = ScaleUp(threshold=0.5)
    detector = up.fit(Brightness(), data)
    clean_values = scaled_consistency(Brightness(), images.float() / 255, up.scales)
    mean, std = float(clean_values.mean()), float(clean_values.std(unbiased=False))
    assert data.outputs.summary["clean_consistency_mean"] == pytest.approx(mean)
    assert data.outputs.summary["clean_consistency_std"] == pytest.approx(std)
    out = detector(torch.stack([torch.full((1, 4, 4), 0.05), torch.full((1, 4, 4), 0.5)]))
    assert out.scores.tolist() == pytest.approx([(0.4 - mean) / std, (1.0 - mean) / std], rel=1e-5)
    assert out.flagged.tolist() == [False, True]
    raw = ScaleUp(standardize=False).fit(Brightness(), data)(torch.full((1, 1, 4, 4), 0.05))
    assert raw.scores.tolist() == pytest.approx([0.4]) and raw.flagged.tolist() == [False]
