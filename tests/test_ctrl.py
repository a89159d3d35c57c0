"""CTRL: the trigger leaves the luminance alone and sits at the chosen frequencies of U
and V; only target-class training images are poisoned and they keep their labels."""

from __future__ import annotations

import torch

import attack
from attack.ctrl import CTRL
from attack.frequency import NO_OFFSET, YUV, block_dct, to_colour
from utils.datasets import load_dataset
from utils.poison import to_uint8
from utils.records import load_record


def test_luminance_is_unchanged_and_the_chroma_spectrum_sits_at_the_chosen_frequencies():
    x = 0.3 + 0.4 * torch.rand(2, 3, 32, 32, dtype=torch.float64)  # nothing is clipped
    poisoned = CTRL().apply(x)
    before, after = to_colour(x, YUV, NO_OFFSET), to_colour(poisoned, YUV, NO_OFFSET)
    assert torch.allclose(after[:, 0], before[:, 0], atol=1e-12)  # Y
    spectrum = block_dct(after - before, 32)  # the whole image is one DCT window
    expected = torch.zeros_like(spectrum)
    expected[:, 1:, 15, 15] = expected[:, 1:, 31, 31] = 100 / 255  # U and V
    assert torch.allclose(spectrum, expected, atol=1e-9)
    assert (poisoned - x).abs().max() > 1 / 255


def test_gray_trigger_goes_into_the_one_channel():
    x = torch.full((1, 1, 8, 8), 0.5, dtype=torch.float64)
    spectrum = block_dct(CTRL(magnitude=10, pos_list=[2]).apply(x) - x, 8)
    expected = torch.zeros_like(spectrum)
    expected[0, 0, 2, 2] = 10 / 255
    assert torch.allclose(spectrum, expected, atol=1e-9)


def test_digits_record_poisons_only_target_class_images_and_keeps_labels(tmp_path):
    attack.run("ctrl", dataset="digits", epochs=1, device="cpu", record_root=str(tmp_path), save_folder_name="c")
    record, data = load_record(tmp_path / "c"), load_dataset("digits")
    assert len(record.poison_indices) == round(0.05 * len(data.train))
    assert torch.all(data.train.labels[record.poison_indices] == 0)  # clean-label: the target class only
    assert torch.all(record.bd_train.labels == 0) and torch.all(record.bd_train.original_labels == 0)
    ctrl = CTRL(**record.attack_params)
    for bd, clean in ((record.bd_train, data.train), (record.bd_test, data.test)):
        assert torch.equal(bd.images, to_uint8(ctrl.apply(clean.images[bd.indices].float() / 255)))
    assert torch.all(record.bd_test.original_labels != 0) and torch.all(record.bd_test.labels == 0)
