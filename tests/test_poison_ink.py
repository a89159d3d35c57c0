"""Poison Ink: the trigger (Canny edges of the luminance in the ink colour, white elsewhere),
and the injected images stay close to the clean ones."""

from __future__ import annotations

import pytest
import torch

import attack
from attack.poison_ink import PoisonInk, edge_mask, ink_colour, watermark
from utils.datasets import load_dataset
from utils.poison import to_uint8
from utils.records import load_record


def step_image(height: int, channels: int = 1) -> torch.Tensor:
    """An 8x8 image, 0 in the left half and ``height`` / 255 in the right half."""
    x = torch.zeros(1, channels, 8, 8)
    x[..., 4:] = height / 255
    return x


def test_canny_edges_of_a_step_follow_the_hysteresis_thresholds():
    # Sobel across a step of height h: |G| = 4h (L1 norm); an edge when 4h > canny_high
    expected = torch.zeros(8, 8)
    expected[:, 3] = 1  # one pixel wide, on the boundary
    assert torch.equal(edge_mask(step_image(60), 100, 200)[0, 0], expected)  # 240 > 200
    assert edge_mask(step_image(40), 100, 200).sum() == 0  # 160: weak only, no strong edge to join
    assert torch.equal(edge_mask(step_image(40), 100, 150)[0, 0], expected)
    rgb = torch.zeros(1, 3, 8, 8)
    rgb[:, 1, :, 4:] = 100 / 255  # green only: luminance 0.587 * 100 = 58.7, 4 * 58.7 > 200
    assert torch.equal(edge_mask(rgb, 100, 200)[0, 0], expected)
    rgb[:, 1, :, 4:] = 80 / 255  # 4 * 47 < 200
    assert edge_mask(rgb, 100, 200).sum() == 0


def test_watermark_is_the_ink_on_edges_and_white_elsewhere():
    mask = edge_mask(step_image(255, 3), 100, 200)
    mark = watermark(mask, ink_colour((80, 160, 80), 3))
    assert torch.allclose(mark[0, :, 0, 3], torch.tensor([80, 160, 80]) / 255)
    assert torch.all(mark[0, :, :, [0, 1, 2, 4, 5, 6, 7]] == 1)
    gray = ink_colour((80, 160, 80), 1)  # the luminance of the ink
    assert gray.item() * 255 == pytest.approx(0.299 * 80 + 0.587 * 160 + 0.114 * 80)
    assert torch.allclose(PoisonInk().trigger(step_image(255))[1][0, 0, :, 3], gray.expand(8))


def test_injected_digits_stay_close_and_carry_the_ink():
    data = load_dataset("digits")
    torch.manual_seed(0)
    ink = PoisonInk(width=16, hiding_epochs=3, hiding_lr=1e-3)
    ink.fit(data.train.images, data.info, torch.device("cpu"), torch.Generator().manual_seed(0))
    x = data.test.images.float() / 255
    poisoned = to_uint8(ink.apply(x)).float() / 255
    change = (poisoned - x).abs()
    assert change.max() <= 16 / 255 + 0.5 / 255 + 1e-6
    psnr = 10 * torch.log10(1 / change.pow(2).mean())
    assert psnr > 25  # dB
    assert (change > 0).flatten(1).any(1).float().mean() > 0.5  # but most images are changed
    # the reveal network reads the ink back from injected images better than from clean ones
    mark = ink.trigger(x)[1]
    assert (ink.read(poisoned) - mark).pow(2).mean() < (ink.read(x) - mark).pow(2).mean()


def test_digits_record_keeps_the_injected_images(tmp_path):
    attack.run(
        "poison_ink",
        dataset="digits",
        epochs=1,
        device="cpu",
        record_root=str(tmp_path),
        save_folder_name="p",
        width=8,
        hiding_epochs=1,
    )
    record, data = load_record(tmp_path / "p"), load_dataset("digits")
    assert len(record.poison_indices) == round(0.1 * len(data.train)) and torch.all(record.bd_train.labels == 0)
    assert torch.equal(record.extras["ink"], torch.tensor([80.0, 160.0, 80.0]))
    change = (record.bd_test.images.int() - data.test.images[record.bd_test.indices].int()).abs()
    assert change.max() <= record.attack_params["max_residual"] and (change > 0).flatten(1).any(1).float().mean() > 0.5
