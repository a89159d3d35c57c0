"""BTI-DBF(U): the decoupling and inversion losses match hand computations, the generator
stays in its L2 ball, and a run returns the model unlearned, trainable, with inverted images."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from defense import create_defense
from defense.bti_dbf import ResidualGenerator, decoupling_loss, inversion_loss


def test_decoupling_loss_by_hand():
    head = nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
        head.bias.zero_()
    f, y, m = torch.tensor([[2.0, 0.0]]), torch.tensor([0]), torch.tensor([1.0, 0.0])
    # masked: logits (2, 0), CE = log(1 + e^-2); the rest: logits (0, 0), CE = log 2
    expected = math.log(1 + math.exp(-2)) - math.log(2)
    assert decoupling_loss(head, f, y, m).item() == pytest.approx(expected, rel=1e-6)


def test_inversion_loss_weighs_each_part_by_its_own_mask_mass():
    f_clean = torch.zeros(2, 3)
    f_generated = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    m = torch.tensor([1.0, 0.0, 0.5])
    # change^2 = [[1, 4, 0], [9, 0, 0]]; benign: (1 + 9 + 0) / (2 * 1.5); the rest: (4 + 0) / (2 * 1.5)
    expected = 10 / 3 - 4 / 3
    assert inversion_loss(f_generated, f_clean, m).item() == pytest.approx(expected, rel=1e-6)


def test_generator_stays_in_its_ball():
    gen = ResidualGenerator(1, (8, 8), tau=0.1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in gen.parameters():
            p.normal_(0, 3.0)
        x = torch.rand(6, 1, 8, 8)
        out = gen(x)
    assert bool(((out - x).flatten(1).norm(dim=1) <= 0.1 * 8 + 1e-5).all())  # tau * sqrt(C H W) = 0.8
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0


def test_a_run_unlearns_keeps_the_model_trainable_and_keeps_inverted_images(digits_defender):
    record, data = digits_defender
    model = record.build_model().eval()
    original = copy.deepcopy(model.state_dict())
    torch.manual_seed(0)
    defense = create_defense("bti_dbf", mask_epochs=2, gen_epochs=2, epochs=1)
    purified = defense.mitigate(model, data)
    assert any(not torch.equal(v, original[k]) for k, v in purified.state_dict().items())
    assert all(p.requires_grad for p in purified.parameters())
    inverted = defense.extras()["inverted"]
    assert inverted.shape == (8, 1, 8, 8) and 0.0 <= float(inverted.min()) and float(inverted.max()) <= 1.0
