"""ReFool: the three reflection models against hand-computed values and an independent
NumPy/OpenCV re-computation of BackdoorBench's blend_images; the record poisons only
target-class images, keeps their labels, and keeps the reflection pool (other-class images)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attack
from attack.refool import Refool, focal_blur, ghost, in_focus, vignette
from utils.datasets import load_dataset
from utils.records import load_record


def test_in_focus_and_ghost_of_a_flat_reflection_by_hand():
    t = torch.full((1, 4, 4), 0.5, dtype=torch.float64)
    r = torch.full((1, 4, 4), 0.25, dtype=torch.float64)
    expected = (0.4 * 0.5**2.2 + 0.6 * 0.25**2.2) ** (1 / 2.2)  # alpha_t 0.4, in linear light
    assert torch.allclose(in_focus(t, r, 0.4), torch.full_like(t, expected), atol=1e-12)
    # a flat reflection stays flat where the shifted copies overlap (the crop), whatever the mix
    assert torch.allclose(ghost(t, r, 0.4, (1, 2), 0.3), torch.full_like(t, expected), atol=1e-12)
    assert torch.equal(in_focus(t, r, 1.0), t) or torch.allclose(in_focus(t, r, 1.0), t, atol=1e-12)


def test_vignette_peaks_in_the_middle_and_falls_to_the_border():
    v = vignette(32, 32, dtype=torch.float64)
    assert v.max() == 1 and torch.allclose(v, v.T) and torch.allclose(v, v.flip(0))
    assert v[0, 0] < 0.02 and v[16, 16] > 0.99  # three standard deviations to the border


def blend_like_backdoorbench(
    t: np.ndarray,
    r: np.ndarray,
    *,
    ghost_model: bool,
    alpha_t: float,
    offset=(0, 0),
    ghost_alpha=0.0,
    sigma=1.0,
    att=1.1,
) -> np.ndarray:
    """BackdoorBench's blend_images (attack/refool.py) with its random draws fixed, on
    float HWC images of the output size (no resizing), written again with NumPy and OpenCV."""
    import cv2
    import scipy.stats as st

    h, w, _ = t.shape
    t, r = np.power(t, 2.2), np.power(r, 2.2)
    if ghost_model:
        r_1 = np.pad(r, ((0, offset[0]), (0, offset[1]), (0, 0)))
        r_2 = np.pad(r, ((offset[0], 0), (offset[1], 0), (0, 0)))
        ghost_r = r_1 * ghost_alpha + r_2 * (1 - ghost_alpha)
        ghost_r = cv2.resize(
            ghost_r[offset[0] : -offset[0], offset[1] : -offset[1], :], (w, h), interpolation=cv2.INTER_CUBIC
        ).reshape(h, w, -1)
        ghost_r = np.clip(ghost_r, 0, 1)  # the declared deviation: BackdoorBench's power gives NaN below 0
        return np.clip(np.power(ghost_r * (1 - alpha_t) + t * alpha_t, 1 / 2.2), 0, 1)
    sz = int(2 * np.ceil(2 * sigma) + 1)
    r_blur = cv2.GaussianBlur(r, (sz, sz), sigma, sigma, 0).reshape(h, w, -1)
    blend = r_blur + t
    for i in range(t.shape[2]):
        mask = blend[:, :, i] > 1
        mean_i = max(1.0, np.sum(blend[:, :, i] * mask) / (mask.sum() + 1e-6))
        r_blur[:, :, i] = r_blur[:, :, i] - (mean_i - 1) * att
    r_blur = np.clip(r_blur, 0, 1)
    x = np.linspace(-3 - (7 / w) / 2, 3 + (7 / w) / 2, w + 1)
    kern1d = np.diff(st.norm.cdf(x))
    g_mask = np.sqrt(np.outer(kern1d, kern1d))
    g_mask = g_mask / g_mask.max()
    alpha_r = g_mask[:, :, None] * (1 - alpha_t / 2)
    return np.clip(np.power(r_blur * alpha_r + t * alpha_t, 1 / 2.2), 0, 1)


def test_ghost_and_focal_blur_match_backdoorbench_recomputed():
    pytest.importorskip("cv2")
    pytest.importorskip("scipy")
    gen = torch.Generator().manual_seed(0)
    t = torch.rand(3, 32, 32, generator=gen, dtype=torch.float64)
    r = torch.zeros(3, 32, 32, dtype=torch.float64)  # a reflection away from the border (OpenCV pads otherwise)
    r[:, 10:22, 8:24] = torch.rand(3, 12, 16, generator=gen, dtype=torch.float64)
    r[:, 12:16, 12:16] = 1.0  # bright enough to over-expose T + R somewhere
    hwc = lambda a: a.permute(1, 2, 0).numpy()  # noqa: E731
    ours = ghost(t, r, 0.6, (3, 5), 0.7)
    theirs = blend_like_backdoorbench(hwc(t), hwc(r), ghost_model=True, alpha_t=0.6, offset=(3, 5), ghost_alpha=0.7)
    assert np.abs(hwc(ours) - theirs).max() < 1e-6
    ours = focal_blur(t, r, 0.6, 1.5, 1.12)
    theirs = blend_like_backdoorbench(hwc(t), hwc(r), ghost_model=False, alpha_t=0.6, sigma=1.5, att=1.12)
    assert np.abs(hwc(ours) - theirs).max() < 1e-6


def test_models_are_drawn_with_their_rates():
    x = torch.rand(200, 1, 8, 8)
    refool = Refool(ghost_rate=0.0, in_focus_rate=1.0, alpha_t=0.4)
    refool.reflections = torch.full((3, 1, 8, 8), 64, dtype=torch.uint8)
    expected = in_focus(x, torch.full_like(x, 64 / 255), 0.4)
    assert torch.allclose(refool.apply(x), expected, atol=1e-6)
    with pytest.raises(ValueError, match="at most 1"):
        Refool(ghost_rate=0.6, in_focus_rate=0.5)


def test_digits_record_poisons_only_target_class_images_with_other_class_reflections(tmp_path):
    attack.run("refool", dataset="digits", epochs=1, device="cpu", record_root=str(tmp_path), save_folder_name="r")
    record, data = load_record(tmp_path / "r"), load_dataset("digits")
    assert torch.all(data.train.labels[record.poison_indices] == 0)  # clean-label (tests/test_attack.py: all of it)
    pool = record.extras["reflection_indices"]
    assert len(pool) == 200 and torch.all(data.train.labels[pool] != 0)  # reflections: other classes
    assert torch.equal(record.extras["reflections"], data.train.images[pool])
    changed = (record.bd_train.images.int() - data.train.images[record.poison_indices].int()).abs()
    assert changed.flatten(1).amax(1).min() > 0  # every poisoned image carries a reflection
    assert torch.all(data.test.labels[record.bd_test.indices] != 0)
