"""ABL (defense/abl.py): the bounded isolation loss, the isolation of the lowest losses, the
phases, and that unlearning ascends the isolated samples' loss."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from defense.abl import ABL, bounded_loss, isolate
from defense.training import delivered_set
from utils.datasets import load_dataset
from utils.records import load_record


@pytest.fixture(scope="module")
def delivered(digits_record_root):
    return delivered_set(load_record(digits_record_root / "badnet_digits"), load_dataset("digits"), torch.device("cpu"))


def test_bounded_loss_values_and_the_same_gradient_for_lga_and_flooding():
    assert float(bounded_loss(torch.tensor(0.3), "LGA", 0.5, 0.5)) == pytest.approx(-0.3)
    assert float(bounded_loss(torch.tensor(0.7), "LGA", 0.5, 0.5)) == pytest.approx(0.7)
    assert float(bounded_loss(torch.tensor(0.3), "Flooding", 0.5, 0.5)) == pytest.approx(0.7)
    assert float(bounded_loss(torch.tensor(0.9), "Flooding", 0.5, 0.5)) == pytest.approx(0.9)
    for value in (0.2, 0.8):
        grads = []
        for kind in ("LGA", "Flooding"):
            w = torch.tensor([1.0, -2.0], requires_grad=True)
            loss = F.cross_entropy((w * value).unsqueeze(0), torch.tensor([0]))
            bounded_loss(loss, kind, 0.5, 0.5).backward()
            grads.append(w.grad)
        assert torch.allclose(*grads)


def test_isolate_takes_the_lowest_losses_by_backdoorbenchs_count():
    losses = torch.tensor([0.5, 0.1, 0.9, 0.05, 0.3, 0.7, 0.2])
    assert isolate(losses, 0.3).tolist() == [1, 3]  # int(7 * 0.3) = 2
    assert isolate(losses, 0.1).tolist() == []


def test_phases_follow_the_schedule():
    abl = ABL(tuning_epochs=2, finetuning_epochs=3, unlearning_epochs=1)
    assert [abl.phases().of(e) for e in range(6)] == [
        ("isolate", 0),
        ("isolate", 1),
        ("finetune", 0),
        ("finetune", 1),
        ("finetune", 2),
        ("unlearn", 0),
    ]
    skip = ABL(tuning_epochs=2, finetuning_ascent_model=False, finetuning_epochs=3, unlearning_epochs=1)
    assert skip.total_epochs(None) == 3 and skip.phases().of(2) == ("unlearn", 0)


def test_unlearning_raises_the_isolated_samples_loss(delivered):
    torch.manual_seed(0)
    before = ABL(tuning_epochs=2, finetuning_epochs=1, unlearning_epochs=0, batch_size=128)
    model = before.train(held := dataclasses.replace(delivered))  # its own outputs (what the method hands over)
    isolated = held.outputs.extras["isolated"]
    assert len(isolated) == int(len(delivered) * 0.01) == held.outputs.summary["isolated"]
    torch.manual_seed(0)
    after = ABL(tuning_epochs=2, finetuning_epochs=1, unlearning_epochs=5, lr_unlearning=0.05, batch_size=128)
    unlearnt = after.train(held := dataclasses.replace(delivered))
    assert torch.equal(held.outputs.extras["isolated"], isolated)  # same seed, same isolation
    loss_before = delivered.losses(model)[isolated].mean()
    loss_after = delivered.losses(unlearnt)[isolated].mean()
    assert loss_after > 10 * loss_before + 0.1
