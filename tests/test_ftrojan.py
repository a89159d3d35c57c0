"""FTrojan: the trigger lives only in the chosen block-DCT coefficients of the chroma
channels, and the digits record holds exactly the triggered images."""

from __future__ import annotations

import pytest
import torch

import attack
from attack.frequency import NO_OFFSET, YCRCB, block_dct, to_colour
from attack.ftrojan import FTrojan
from utils.datasets import load_dataset
from utils.errors import UserError
from utils.poison import to_uint8
from utils.records import load_record


def test_rgb_residual_sits_only_in_the_chosen_chroma_coefficients():
    x = 0.45 + 0.1 * torch.rand(2, 3, 64, 64, dtype=torch.float64)  # mid-range: nothing is clipped
    residual = FTrojan().apply(x) - x  # before uint8 quantisation
    spectrum = block_dct(to_colour(residual, YCRCB, NO_OFFSET), 32)  # the colour transform is linear
    expected = torch.zeros_like(spectrum)
    for row, col in ((15, 15), (31, 31)):
        expected[:, 1:, row::32, col::32] = 30 / 255  # Cr and Cb, every 32x32 block (2 x 2 of them)
    assert torch.allclose(spectrum, expected, atol=1e-9)
    assert residual.abs().max() > 1 / 255  # the trigger is there in RGB


def test_gray_residual_sits_in_the_one_channel():
    x = 0.45 + 0.1 * torch.rand(3, 1, 8, 8, dtype=torch.float64)
    residual = FTrojan(magnitude=20, window_size=4, pos_list=[1, 2, 3, 3]).apply(x) - x
    spectrum = block_dct(residual, 4)
    expected = torch.zeros_like(spectrum)
    expected[:, 0, 1::4, 2::4] = expected[:, 0, 3::4, 3::4] = 20 / 255
    assert torch.allclose(spectrum, expected, atol=1e-9)


def test_a_window_that_does_not_tile_the_image_is_one_line():
    with pytest.raises(UserError, match="window_size 32 does not tile the 8x8 images"):
        FTrojan().apply(torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="pairs"):
        FTrojan(pos_list=[1, 2, 3])


def test_digits_record_holds_the_triggered_images(tmp_path):
    attack.run("ftrojan", dataset="digits", epochs=1, device="cpu", record_root=str(tmp_path), save_folder_name="f")
    record, data = load_record(tmp_path / "f"), load_dataset("digits")
    trojan = FTrojan(**record.attack_params)
    assert record.attack_params["window_size"] == 8  # config/attack/ftrojan/digits.yaml
    assert len(record.poison_indices) == round(0.1 * len(data.train)) and torch.all(record.bd_train.labels == 0)
    for bd, clean in ((record.bd_train, data.train), (record.bd_test, data.test)):
        assert torch.equal(bd.images, to_uint8(trojan.apply(clean.images[bd.indices].float() / 255)))
    assert torch.equal(record.extras["frequency_trigger"], trojan.mask.float())
