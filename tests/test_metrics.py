"""The metric formulas on hand-checked cases."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from utils.datasets import ImageData
from utils.metrics import accuracy, der, evaluate
from utils.poison import PoisonedSet


@pytest.mark.parametrize(
    "asr_b,asr_a,acc_b,acc_a,expected",
    [
        (1.0, 0.0, 0.9, 0.9, 1.0),  # backdoor removed at no cost
        (1.0, 1.0, 0.9, 0.9, 0.5),  # nothing changed
        (0.9, 0.1, 0.9, 0.8, 0.85),  # (0.8 - 0.1 + 1) / 2
        (0.5, 0.6, 0.8, 0.9, 0.5),  # worse ASR, better accuracy: both clipped at 0
        (1.0, 0.0, 1.0, 0.0, 0.5),  # removed the backdoor and all accuracy
    ],
)
def test_der_formula(asr_b, asr_a, acc_b, acc_a, expected):
    assert der(asr_b, asr_a, acc_b, acc_a) == pytest.approx(expected)


def test_accuracy_counts_argmax_matches():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)


class Rule(nn.Module):
    """Predicts class 1 when the top-left pixel is bright, else the label written in pixel (0, 1)."""

    def forward(self, x):
        bright = x[:, 0, 0, 0] > 0.5
        label = (x[:, 0, 0, 1] * 255).round().long()
        out = torch.nn.functional.one_hot(torch.where(bright, torch.ones_like(label), label), 3).float()
        return out * 10


def test_evaluate_asr_against_attacker_labels_and_ra_against_true_labels():
    def image(bright: bool, label: int) -> torch.Tensor:
        img = torch.zeros(1, 2, 2, dtype=torch.uint8)
        img[0, 0, 0] = 255 if bright else 0
        img[0, 0, 1] = label
        return img

    clean = ImageData(
        torch.stack([image(False, 0), image(False, 2), image(False, 1), image(False, 0)]), torch.tensor([0, 2, 2, 0])
    )  # 3 of 4 right
    bd = PoisonedSet(
        torch.stack([image(True, 0), image(True, 2), image(False, 2)]),
        torch.tensor([1, 1, 1]),
        torch.tensor([0, 2, 2]),
        torch.tensor([0, 1, 2]),
    )  # two hit the target, one keeps its label
    m = evaluate(Rule(), clean, bd, device=torch.device("cpu"))
    assert m.clean_acc == pytest.approx(0.75)
    assert m.asr == pytest.approx(2 / 3)
    assert m.ra == pytest.approx(1 / 3)
    assert m.as_row()["test_asr"] == m.asr and set(m.headline()) == {"clean_acc", "asr", "ra"}
