"""LF: the perturbation has (almost) no energy above the low-pass filter's cut-off, lies
in [0, magnitude], and is added to the poisoned images."""

from __future__ import annotations

import math

import torch

import attack
from attack.lf import low_pass
from utils.datasets import load_dataset
from utils.records import load_record


def energy_above(v: torch.Tensor, cutoff: float) -> float:
    """Share of the non-DC spectral energy of (C, H, W) above ``cutoff`` cycles per pixel,
    measured on the mirror extension (no wrap-around edges)."""
    v = v - v.mean(dim=(-2, -1), keepdim=True)
    v = torch.cat([v, v.flip(-1)], -1)
    v = torch.cat([v, v.flip(-2)], -2)
    power = torch.fft.fft2(v.double()).abs().pow(2).sum(0)
    fy, fx = torch.fft.fftfreq(v.shape[-2])[:, None], torch.fft.fftfreq(v.shape[-1])[None, :]
    high = (fy**2 + fx**2).sqrt() > cutoff
    return float(power[high].sum() / power.sum().clamp_min(1e-30))


def cutoff(sigma: float, gain: float = 1e-2) -> float:
    """The frequency where the Gaussian filter's gain falls to ``gain``."""
    return math.sqrt(math.log(1 / gain) / (2 * math.pi**2 * sigma**2))


def test_low_pass_filter_removes_what_lies_above_its_cutoff():
    noise = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert energy_above(noise, cutoff(2.0)) > 0.5
    assert energy_above(low_pass(noise, 2.0), cutoff(2.0)) < 1e-4
    assert torch.allclose(low_pass(noise, 0.0), noise, atol=1e-5)  # sigma 0: no filtering
    flat = torch.full((1, 8, 8), 0.3)
    assert torch.allclose(low_pass(flat, 6.0), flat, atol=1e-6)  # mirror boundaries: no darkened edges


def test_lf_perturbation_is_low_frequency_and_added_to_the_images(tmp_path):
    attack.run(
        "lf", dataset="digits", epochs=1, max_iter_uni=5, device="cpu", record_root=str(tmp_path), save_folder_name="lf"
    )
    record, data = load_record(tmp_path / "lf"), load_dataset("digits")
    v, params = record.extras["perturbation"], record.attack_params
    assert v.shape == (1, 8, 8) and 0 <= record.extras["fooling_rate"] <= 1
    assert v.min() >= 0 and abs(v.max().item() - params["magnitude"]) < 1e-5  # rescaled to [0, magnitude]
    assert energy_above(v, cutoff(params["sigma"])) < 1e-3
    for bd, clean in ((record.bd_test, data.test), (record.bd_train, data.train)):
        expected = (clean.images[bd.indices].double() + 255 * v.double()).clamp(0, 255)
        assert (bd.images.double() - expected).abs().max() <= 0.5 + 1e-4
