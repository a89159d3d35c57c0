"""FST: the penalty is the inner product with the backdoored head (value and gradient by
hand), the projection keeps the norm, and a run re-initialises the head and moves it away
from the backdoored one with its norm kept."""

from __future__ import annotations

import copy

import torch

from defense import create_defense
from defense.fst import feature_shift_penalty, project_to_norm


def test_penalty_is_the_inner_product_with_the_original_head():
    w_ori = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    w = torch.tensor([[2.0, 1.0], [-4.0, 1.0]], requires_grad=True)
    penalty = feature_shift_penalty(w, w_ori)
    assert penalty.item() == 2.0 - 2.0 - 2.0 + 3.0  # = 1
    penalty.backward()
    assert torch.equal(w.grad, w_ori)  # d<w, w_ori>/dw = w_ori: a step moves w against w_ori


def test_projection_sets_the_norm_and_keeps_the_direction():
    w = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    project_to_norm(w, 10.0)
    assert torch.allclose(w, torch.tensor([[6.0, 0.0], [0.0, 8.0]]))


def test_fst_moves_the_head_away_from_the_backdoored_one_with_its_norm_kept(digits_defender):
    record, data = digits_defender
    model = record.build_model().eval()
    w_ori = model.classifier_layer().weight.detach().clone()
    torch.manual_seed(0)
    purified = create_defense("fst", epochs=2).mitigate(copy.deepcopy(model), data)
    w = purified.classifier_layer().weight.detach()
    assert torch.allclose(w.norm(), w_ori.norm(), rtol=1e-4)
    cosine = feature_shift_penalty(w, w_ori) / (w.norm() * w_ori.norm())
    assert cosine < 0.2  # the backdoored head with itself: 1
    torch.manual_seed(0)
    plain = create_defense("fst", epochs=2, alpha=0.0).mitigate(copy.deepcopy(model), data)
    assert feature_shift_penalty(w, w_ori) < feature_shift_penalty(plain.classifier_layer().weight.detach(), w_ori)
