"""NPD: the inserted polarizer is the identity at initialisation and travels with the
model's weights (state_dict, deep copy); the L2 projection, the complement loss and the
four-term objective match hand computations; the targeted perturbation stays in its ball;
a run trains the polarizer only, and NPD refuses a model without a declared layer."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from defense import create_defense
from defense.npd import POLARIZER_LAYERS, complement_nll, npd_loss, runner_up, targeted_perturbation
from defense.sae import project
from utils.errors import UserError
from utils.models import create_model, load_weights


def small_cnn(seed: int = 0):
    torch.manual_seed(seed)
    model = create_model("cnn", num_classes=10, in_channels=1, img_size=(8, 8)).eval()
    for m in model.modules():  # non-trivial BN statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


def test_polarizer_at_identity_init_leaves_the_outputs_unchanged():
    model = small_cnn()
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        before = model(x)
        polarizer = model.insert_polarizer(POLARIZER_LAYERS["cnn"], 64).eval()
        after = model(x)
    assert torch.equal(polarizer.conv.weight[:, :, 0, 0], torch.eye(64))
    assert torch.allclose(before, after, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        polarizer.bn.weight.mul_(0.0)  # and it is in the forward pass
        assert not torch.allclose(model(x), before, atol=1e-3)


def test_polarizer_travels_with_the_state_dict_and_deep_copies():
    model = small_cnn()
    polarizer = model.insert_polarizer("layer3.0", 64)
    with torch.no_grad():
        polarizer.conv.weight.add_(0.05 * torch.randn_like(polarizer.conv.weight))
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        expected = model(x)
        fresh = load_weights(
            create_model("cnn", num_classes=10, in_channels=1, img_size=(8, 8)).eval(), model.state_dict()
        )
        assert torch.allclose(fresh(x), expected)
        twin = copy.deepcopy(model)
        twin.polarizer("layer3.0").conv.weight.zero_()  # the copy applies its own polarizer
        assert torch.allclose(model(x), expected)
        assert not torch.allclose(twin(x), expected)
    bad = {
        k: (v[:32, :32] if k.endswith("conv.weight") and k.startswith("polarizers.") else v)
        for k, v in model.state_dict().items()
    }
    with pytest.raises(UserError, match="takes 64 channels"):
        load_weights(create_model("cnn", num_classes=10, in_channels=1, img_size=(8, 8)), bad)


def test_projection_onto_the_l2_ball():
    delta = torch.zeros(2, 1, 2, 2)
    delta[0, 0, 0, 0], delta[0, 0, 1, 1] = 3.0, 4.0  # norm 5: scaled to 2
    delta[1, 0, 0, 1] = 1.0  # norm 1: kept
    out = project(delta, "L2", 2.0)
    assert torch.allclose(out[0, 0], torch.tensor([[1.2, 0.0], [0.0, 1.6]]))
    assert torch.equal(out[1], delta[1])


def test_complement_loss_and_objective_by_hand():
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 0.0]])
    logits_adv = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 0.0]])
    y, y_hat, target = torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([2, 0])
    p = F.softmax(logits_adv, 1)
    assert torch.equal(runner_up(logits_adv, y), torch.tensor([2, 0]))  # row 0: 2 beats 1; row 1: 0 (y is 1)
    by_hand = -(math.log(1.0001 - p[0, 2].item() + 1e-12) + math.log(1.0001 - p[1, 0].item() + 1e-12)) / 2
    assert complement_nll(p, torch.tensor([2, 0])).item() == pytest.approx(by_hand, rel=1e-6)
    lmd = (1.0, 0.4, 0.3, 0.2)
    expected = (
        F.cross_entropy(logits, y) + 0.4 * F.cross_entropy(logits_adv, y_hat) + 0.3 * by_hand + 0.2 * by_hand
    ).item()  # k' = target here
    assert npd_loss(logits, logits_adv, y, y_hat, target, lmd).item() == pytest.approx(expected, rel=1e-6)
    only_clean = npd_loss(logits, logits_adv, y, y_hat, target, (1.0, 0.0, 0.0, 0.0))
    assert only_clean.item() == pytest.approx(F.cross_entropy(logits, y).item())


def test_targeted_perturbation_stays_in_its_ball_and_moves_toward_the_target(digits_defender):
    record, data = digits_defender
    model = record.build_model().eval()
    x, y = next(data.batches(64, shuffle=False))
    target = runner_up(model(x).detach(), y)
    delta = targeted_perturbation(model, x, target, eps=0.43, steps=2, data=data)
    assert bool((delta.flatten(1).norm(dim=1) <= 0.43 + 1e-5).all())
    before = F.cross_entropy(model(x), target)
    after = F.cross_entropy(model((x + delta).clamp(0, 1)), target)
    assert after < before


def test_npd_trains_the_polarizer_only(digits_defender):
    record, data = digits_defender
    model = record.build_model().eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    purified = create_defense("npd", epochs=2, warm_epochs=1, trigger_norm=0.43).mitigate(model, data)
    state = purified.state_dict()
    for k, v in original.items():
        assert torch.equal(state[k], v), k
    polarizer = purified.polarizer("layer3.0")
    assert not torch.equal(polarizer.conv.weight[:, :, 0, 0], torch.eye(64))
    assert all(p.requires_grad for p in purified.parameters())


def test_npd_does_not_apply_to_a_model_without_a_declared_layer():
    with pytest.raises(UserError, match="does not apply"):
        create_defense("npd").layer_name(SimpleNamespace(name="vit_b_16"))
