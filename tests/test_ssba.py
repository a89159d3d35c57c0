"""SSBA: the string's bits, the encoder/decoder trained on digits (the decoder reads the
fixed string back from the stored encoded images; the residual is bounded and differs
between images), and the record the harness writes."""

from __future__ import annotations

import torch

import attack
from attack.ssba import SSBA, bit_accuracy, secret_bits
from utils.datasets import load_dataset
from utils.poison import to_uint8
from utils.records import load_record

TINY = {
    "fingerprint_length": 8,
    "max_residual": 64,
    "width": 16,
    "encoder_epochs": 10,
    "encoder_lr": 1e-3,
    "l2_loss_await": 10_000,
}


def test_secret_bits_are_the_utf8_bits_padded_with_spaces():
    expected = [0, 1, 1, 0, 0, 0, 0, 1, 0, 1, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0]  # 'a' 0x61, 'b' 0x62, ' ' 0x20...
    assert secret_bits("ab", 20).tolist() == expected
    assert secret_bits("abcd", 16).tolist() == expected[:16]


def test_fidelity_weight_waits_then_ramps():
    ssba = SSBA(l2_loss_weight=10, l2_loss_await=100, l2_loss_ramp=50)
    assert [ssba.l2_weight(t) for t in (0, 100, 125, 150, 400)] == [0.0, 0.0, 5.0, 10.0, 10.0]


def test_decoder_reads_the_string_from_encoded_digits_and_the_residual_is_sample_specific():
    data = load_dataset("digits")
    torch.manual_seed(0)
    ssba = SSBA(**TINY)
    ssba.fit(data.train.images, torch.device("cpu"), torch.Generator().manual_seed(0))
    x = data.test.images.float() / 255  # images the networks never saw
    encoded = to_uint8(ssba.apply(x)).float() / 255  # as stored in the record
    bits = ssba.bits.expand(len(x), -1)
    assert bit_accuracy(ssba.decode(encoded), bits) >= 0.95
    assert bit_accuracy(ssba.decode(x), bits) < 0.9  # clean images do not carry it
    residual = encoded - x
    assert residual.abs().max() <= 64 / 255 + 0.5 / 255 + 1e-6  # bounded (uint8 rounding)
    inside = ((x > 0.3) & (x < 0.7)).float()  # pixels where clipping cannot shape the residual
    spread = ((residual - residual.mean(0)) * inside).abs().sum() / inside.sum()
    assert spread > 1 / 255  # the residual at a pixel differs from image to image


def test_digits_record_keeps_the_encoded_images_with_the_attackers_label(tmp_path):
    attack.run(
        "ssba",
        dataset="digits",
        epochs=1,
        device="cpu",
        record_root=str(tmp_path),
        save_folder_name="s",
        **{**TINY, "encoder_epochs": 2},
    )
    record, data = load_record(tmp_path / "s"), load_dataset("digits")
    assert len(record.poison_indices) == round(0.1 * len(data.train))
    assert torch.all(record.bd_train.labels == 0)
    assert torch.equal(record.extras["secret_bits"], secret_bits("abcd", 8))
    for bd, clean in (
        (record.bd_train, data.train.images[record.poison_indices]),
        (record.bd_test, data.test.images[record.bd_test.indices]),
    ):
        change = (bd.images.int() - clean.int()).abs()
        assert change.max() <= record.attack_params["max_residual"] == 64 and (change > 0).flatten(1).any(1).all()
