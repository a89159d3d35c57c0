"""ANP: the neuron perturbation (BackdoorBench's, unclipped, and the clipped variant), the
pruning rule (threshold, number, held-out clean accuracy), BackdoorBench's weight-only
pruning, and pruned neurons that output zero (prune_bias) in the returned model and in its
saved weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from defense.anp import ANP, NeuronMasks, neuron_layers, select_pruned
from defense.base import frozen_copy


def test_selection_is_the_smallest_masks_by_threshold_or_by_number():
    values = torch.tensor([0.9, 0.05, 0.2, 0.6, 0.21, 0.0, 0.2, 1.0])
    assert select_pruned(values, "threshold", 0.2, None).nonzero().flatten().tolist() == [1, 2, 5, 6]
    by_number = select_pruned(values, "number", 0.0, 3)
    assert by_number.nonzero().flatten().tolist() == [1, 2, 5]  # 0.0, 0.05 and the first 0.2
    assert select_pruned(values, "number", 0.0, 0).sum() == 0
    assert select_pruned(values, "number", 0.0, 100).all()


def test_perturbation_reaches_twice_eps_as_backdoorbench(digits_defender):
    """BackdoorBench: uniform start in [-eps, eps], then one unclipped signed step of eps."""
    record, data = digits_defender
    model = frozen_copy(record.build_model())
    masks = NeuronMasks(neuron_layers(model))
    x, y = data.tensors()
    anp = ANP(eps=0.4, steps=1)
    assert anp.clip_noise is False
    torch.manual_seed(0)
    anp.perturb(masks, model, data, x, y, sign_scale=1.0)
    noise = torch.cat([t.flatten() for t in (*masks.delta, *masks.xi)])
    assert noise.abs().max() <= 0.8 + 1e-6
    assert noise.abs().max() > 0.4 + 0.1  # beyond eps
    assert (noise.abs() > 0.4).float().mean() > 0.2  # about half the values go past eps


def test_clipped_perturbation_stays_in_budget_and_raises_the_loss(digits_defender):
    record, data = digits_defender
    model = frozen_copy(record.build_model())
    masks = NeuronMasks(neuron_layers(model))
    x, y = data.tensors()
    anp = ANP(eps=0.4, steps=2, clip_noise=True)
    with torch.no_grad():
        clean_loss = F.cross_entropy(masks.forward(model, x), y)
    torch.manual_seed(0)
    anp.perturb(masks, model, data, x, y, sign_scale=1.0)
    assert all(t.abs().max() <= 0.4 + 1e-6 for t in (*masks.delta, *masks.xi))
    assert any(t.abs().max() > 0.3 for t in masks.delta)
    with torch.no_grad():
        perturbed_loss = F.cross_entropy(masks.forward(model, x, perturbed=True), y)
    assert perturbed_loss > clean_loss + 0.1


def test_pruning_zeroes_only_the_bn_weight_by_default(digits_defender):
    """BackdoorBench's pruning(): state_dict['<layer>.weight'][idx] = 0; the bias stays."""
    record, data = digits_defender
    model = record.build_model().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    anp = ANP(nb_iter=15, batch_size=64, report_every=15, threshold=0.9)
    assert anp.prune_bias is False
    anp.mitigate(model, data)
    extras = data.outputs.extras
    layers = neuron_layers(model)
    assert sum(int(extras[f"pruned.{name}"].sum()) for name, _ in layers) > 0
    for name, module in layers:
        chosen = extras[f"pruned.{name}"]
        assert torch.all(module.weight[chosen] == 0)
        assert torch.equal(module.weight[~chosen], before[f"{name}.weight"][~chosen])
        assert torch.equal(module.bias, before[f"{name}.bias"])  # untouched, pruned channels included
    assert any(before[f"{name}.bias"][extras[f"pruned.{name}"]].abs().sum() > 0 for name, _ in layers)


def test_clean_acc_rule_chooses_the_threshold_on_a_held_out_part(digits_defender, monkeypatch):
    record, data = digits_defender
    model = record.build_model().eval()
    seen = {}
    fit_masks, choose = ANP.optimize_masks, ANP.choose_threshold

    def optimize_masks(self, m, part):
        seen["fit"] = part.clean
        return fit_masks(self, m, part)

    def choose_threshold(self, m, part, values):
        seen["held_out"] = part.clean
        return choose(self, m, part, values)

    monkeypatch.setattr(ANP, "optimize_masks", optimize_masks)
    monkeypatch.setattr(ANP, "choose_threshold", choose_threshold)
    anp = ANP(nb_iter=10, batch_size=32, report_every=10, pruning_by="clean_acc", val_fraction=0.25)
    anp.mitigate(model, data)
    fit, held_out = seen["fit"], seen["held_out"]
    assert len(held_out) == round(0.25 * len(data)) and len(fit) + len(held_out) == len(data)
    rows = sorted(map(tuple, torch.cat([fit.images, held_out.images]).flatten(1).tolist()))
    assert rows == sorted(map(tuple, data.clean.images.flatten(1).tolist()))  # a partition of the subset
    threshold = data.outputs.summary["threshold"]
    assert 0.0 <= threshold <= 0.9 and abs(threshold / 0.05 - round(threshold / 0.05)) < 1e-9


@pytest.mark.parametrize("rule", [{"pruning_by": "threshold", "threshold": 0.9}, {"pruning_by": "number", "number": 7}])
def test_pruned_neurons_are_the_smallest_masks_and_output_zero(digits_defender, rule):
    record, data = digits_defender
    model = record.build_model().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    anp = ANP(nb_iter=15, batch_size=64, report_every=15, prune_bias=True, **rule)
    purified = anp.mitigate(model, data)
    assert purified is model
    extras = data.outputs.extras
    layers = neuron_layers(model)
    masks = torch.cat([extras[f"mask.{name}"] for name, _ in layers])
    pruned = torch.cat([extras[f"pruned.{name}"] for name, _ in layers])
    assert masks.min() < 1.0 and 0.0 <= masks.min() and masks.max() <= 1.0  # the masks moved, within [0, 1]
    if rule["pruning_by"] == "threshold":
        assert torch.equal(pruned, masks <= 0.9)
    else:
        assert int(pruned.sum()) == 7 and masks[pruned].max() <= masks[~pruned].min()
    assert 0 < int(pruned.sum()) < len(masks) and data.outputs.summary["pruned_neurons"] == int(pruned.sum())

    # Each pruned channel outputs exactly zero; the others do not; nothing else changed.
    outputs = {}
    hooks = [
        module.register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o)) for name, module in layers
    ]
    x, _ = data.tensors()
    reloaded = record.build_model(model.state_dict()).eval()
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    for name, module in layers:
        chosen = extras[f"pruned.{name}"]
        assert torch.all(outputs[name][:, chosen] == 0)
        assert torch.all(outputs[name][:, ~chosen].flatten(1).abs().amax(1) > 0)
    for key, value in model.state_dict().items():
        layer, _, kind = key.rpartition(".")
        if kind in ("weight", "bias") and layer in dict(layers):
            assert torch.equal(value[~extras[f"pruned.{layer}"]], before[key][~extras[f"pruned.{layer}"]])
        else:
            assert torch.equal(value, before[key]), f"{key} changed (running statistics must stay untouched)"
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))  # the saved weights reproduce the pruning


def test_number_rule_needs_a_number():
    with pytest.raises(ValueError):
        ANP(pruning_by="number")
