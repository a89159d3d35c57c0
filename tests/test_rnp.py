"""RNP: the masked forward pass, unlearning that stops at the clean-accuracy threshold,
recovery that touches only the masks, pruning of the original model by mask value (BN
weights only, as BackdoorBench), and the refusal of a model without BatchNorm."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import defense
from defense import create_defense
from defense.bnprune import batchnorm_layers
from defense.rnp import masked_forward
from utils.errors import UserError
from utils.records import load_defense_result


def test_masked_forward_scales_the_bn_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 1), nn.BatchNorm2d(3))
    model.eval()
    layers = batchnorm_layers(model)
    masks = [torch.tensor([1.0, 0.0, 0.5, 0.2]), torch.tensor([0.3, 1.0, 0.0])]
    x = torch.randn(5, 2, 6, 6)
    by_hand = copy.deepcopy(model)
    with torch.no_grad():
        by_hand[1].weight.mul_(masks[0])
        by_hand[4].weight.mul_(masks[1])
    assert torch.allclose(masked_forward(model, layers, masks, x), by_hand(x), atol=1e-6)
    assert torch.equal(model[1].weight, copy.deepcopy(model)[1].weight)  # the model itself is unchanged


def test_unlearning_stops_at_the_clean_threshold(digits_defender):
    record, data = digits_defender
    rnp = create_defense("rnp", unlearning_epochs=3, recovering_epochs=0, clean_threshold=1.0, batch_size=64)
    assert rnp.unlearn(record.build_model(), data, data.generator()) == 1  # any accuracy is <= 1
    rnp = create_defense("rnp", unlearning_epochs=3, recovering_epochs=0, clean_threshold=0.0, batch_size=64)
    model = record.build_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert rnp.unlearn(model, data, data.generator()) == 3
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items() if k.endswith("weight"))


def test_recovery_trains_only_the_masks_and_keeps_them_in_the_unit_interval(digits_defender):
    record, data = digits_defender
    work = record.build_model()
    weights = {k: v.clone() for k, v in work.named_parameters()}
    rnp = create_defense("rnp", recovering_epochs=2, recovering_lr=5.0, batch_size=64)
    masks = rnp.recover(work, data, data.generator())
    values = torch.cat([m.detach() for m in masks])
    assert len(values) == 288 and values.min() >= 0 and values.max() <= 1 and values.min() < 1
    assert all(torch.equal(p, weights[k]) for k, p in work.named_parameters())


def test_pruning_zeroes_the_bn_weight_of_low_masks_in_the_original_model(digits_defender):
    record, data = digits_defender
    model = record.build_model().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rnp = create_defense(
        "rnp",
        unlearning_epochs=2,
        unlearning_lr=0.05,
        recovering_epochs=2,
        recovering_lr=5.0,
        batch_size=64,
        threshold=0.95,
    )
    assert rnp.mitigate(model, data) is model
    extras, report = data.outputs.extras, data.outputs.summary
    assert report["pruned_neurons"] == sum(int(extras[k].sum()) for k in extras if k.startswith("pruned.")) > 0
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    for name, _ in batchnorm_layers(model):
        pruned, mask = extras[f"pruned.{name}"], extras[f"mask.{name}"]
        assert torch.equal(pruned, mask <= 0.95)
        weight = model.state_dict()[f"{name}.weight"]
        assert torch.all(weight[pruned] == 0) and torch.equal(weight[~pruned], before[f"{name}.weight"][~pruned])
    assert changed and all(k.endswith(".weight") and k[: -len(".weight")] in report["pruned_by_layer"] for k in changed)


def test_a_model_without_batchnorm_is_refused(digits_defender):
    _, data = digits_defender
    with pytest.raises(UserError, match="RNP prunes the channels of BatchNorm2d layers"):
        create_defense("rnp").mitigate(nn.Sequential(nn.Conv2d(1, 4, 3)), data)


def test_run_on_digits(record_root):
    summary = defense.run(
        "rnp",
        result_file="badnet_digits",
        record_root=str(record_root),
        device="cpu",
        unlearning_epochs=3,
        recovering_epochs=2,
    )
    state = load_defense_result(record_root / "badnet_digits" / "defense" / "rnp" / "defense_result.pt")["model"]
    assert summary["total_neurons"] == 288 and 1 <= summary["unlearning_epochs_used"] <= 3
    for name, count in summary["pruned_by_layer"].items():
        assert int((state[f"{name}.weight"] == 0).sum()) >= count
