"""ANP: the neuron perturbation, the pruning rule (threshold and number), and pruned
neurons that output zero in the returned model and in its saved weights."""
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


def test_perturbation_stays_in_budget_and_raises_the_loss(digits_defender):
    record, data = digits_defender
    model = frozen_copy(record.build_model())
    masks = NeuronMasks(neuron_layers(model))
    x, y = data.tensors()
    anp = ANP(eps=0.4, steps=2)
    with torch.no_grad():
        clean_loss = F.cross_entropy(masks.forward(model, x), y)
    torch.manual_seed(0)
    anp.perturb(masks, model, data, x, y, sign_scale=1.0)
    assert all(t.abs().max() <= 0.4 + 1e-6 for t in (*masks.delta, *masks.xi))
    assert any(t.abs().max() > 0.3 for t in masks.delta)
    with torch.no_grad():
        perturbed_loss = F.cross_entropy(masks.forward(model, x, perturbed=True), y)
    assert perturbed_loss > clean_loss + 0.1


@pytest.mark.parametrize("rule", [{"pruning_by": "threshold", "threshold": 0.9},
                                  {"pruning_by": "number", "number": 7}])
def test_pruned_neurons_are_the_smallest_masks_and_output_zero(digits_defender, rule):
    record, data = digits_defender
    model = record.build_model().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    anp = ANP(nb_iter=15, batch_size=64, report_every=15, **rule)
    purified = anp.mitigate(model, data)
    assert purified is model
    extras = anp.extras()
    layers = neuron_layers(model)
    masks = torch.cat([extras[f"mask.{name}"] for name, _ in layers])
    pruned = torch.cat([extras[f"pruned.{name}"] for name, _ in layers])
    assert masks.min() < 1.0 and 0.0 <= masks.min() and masks.max() <= 1.0  # the masks moved, within [0, 1]
    if rule["pruning_by"] == "threshold":
        assert torch.equal(pruned, masks <= 0.9)
    else:
        assert int(pruned.sum()) == 7 and masks[pruned].max() <= masks[~pruned].min()
    assert 0 < int(pruned.sum()) < len(masks) and anp.report()["pruned_neurons"] == int(pruned.sum())

    # Each pruned channel outputs exactly zero; the others do not; nothing else changed.
    outputs = {}
    hooks = [module.register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o))
             for name, module in layers]
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
