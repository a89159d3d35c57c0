"""SIG: only target-class training images are poisoned (clean-label), and the added
signal is delta / 255 * sin(2 pi j f / W) down every column."""

from __future__ import annotations

import math

import torch

import attack
from attack.sig import SIG
from utils.datasets import load_dataset
from utils.records import load_record


def test_sig_touches_only_the_target_class_and_adds_the_sinusoid(tmp_path):
    attack.run("sig", dataset="digits", epochs=1, device="cpu", record_root=str(tmp_path), save_folder_name="s")
    record, data = load_record(tmp_path / "s"), load_dataset("digits")
    in_target = int((data.train.labels == 0).sum())
    assert len(record.poison_indices) == min(round(0.1 * len(data.train)), in_target)
    assert torch.all(data.train.labels[record.poison_indices] == 0)  # target class only
    assert torch.all(record.bd_train.labels == 0) and torch.all(record.bd_train.original_labels == 0)
    assert torch.all(record.bd_test.original_labels != 0) and torch.all(record.bd_test.labels == 0)
    delta, f = record.attack_params["delta"], record.attack_params["f"]
    signal = 255 * delta / 255 * torch.sin(2 * math.pi * torch.arange(8, dtype=torch.float64) * f / 8)
    for bd, clean in ((record.bd_train, data.train), (record.bd_test, data.test)):
        x = clean.images[bd.indices].double()
        expected = (x + signal).clamp(0, 255)  # broadcast over rows: the same value down each column
        assert (bd.images.double() - expected).abs().max() <= 0.5 + 1e-4


def test_sig_signal_is_horizontal_and_clipped():
    sig = SIG(delta=40, f=6)
    x = torch.full((1, 3, 32, 32), 0.5)
    y = sig.apply(x) - x
    assert torch.allclose(y, y[:, :, :1, :].expand_as(y))  # constant down each column, every channel
    assert torch.isclose(y.max(), torch.tensor(40 / 255), atol=1e-3) and torch.isclose(y[0, 0, 0, 0], torch.tensor(0.0))
    assert sig.apply(torch.ones(1, 1, 32, 32)).max() == 1 and sig.apply(torch.zeros(1, 1, 32, 32)).min() == 0
