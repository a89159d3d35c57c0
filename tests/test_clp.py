"""CLP: the channel Lipschitz upper bound against a hand-computed spectral norm, the
outlier rule on a planted channel, BackdoorBench's conv/BN pairing, the refusal of a model
without BatchNorm, and a run through the harness on digits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import defense
from defense import create_defense
from defense.base import HandsOver
from defense.clp import channel_lipschitz, conv_bn_pairs
from utils.errors import UserError
from utils.records import load_defense_result, load_record


def conv_bn(channels: int = 4, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, channels, 3, bias=False), nn.BatchNorm2d(channels), nn.ReLU())
    with torch.no_grad():
        model[1].weight.uniform_(-2.0, 2.0)  # negative gammas too: the bound takes |gamma|
        model[1].bias.uniform_(-1.0, 1.0)
        model[1].running_var.uniform_(0.5, 3.0)
    return model.eval()


def test_bound_is_the_spectral_norm_of_the_scaled_kernel():
    model = conv_bn()
    conv, bn = model[0], model[1]
    expected = []
    for k in range(4):
        W_k = conv.weight[k].reshape(3, 9) * bn.weight[k].abs() / bn.running_var[k].sqrt()
        expected.append(torch.linalg.matrix_norm(W_k, ord=2))
    got = channel_lipschitz(conv, bn)
    assert torch.allclose(got, torch.stack(expected).detach(), rtol=1e-5)
    # and it is a Lipschitz bound: |gamma|/sigma * ||W_k x|| <= UCLC_k * ||x|| for a 3 x 3 input patch
    x = torch.randn(50, 3, 3, 3)
    out = (conv(x) * (bn.weight / bn.running_var.sqrt()).view(1, -1, 1, 1)).detach().abs().flatten(1)
    assert torch.all(out <= got * x.flatten(1).norm(dim=1, keepdim=True) + 1e-5)


def test_a_planted_channel_with_a_large_bound_is_pruned_and_no_other():
    model = conv_bn(channels=16, seed=1)
    with torch.no_grad():
        model[1].weight.fill_(1.0)
        model[1].running_var.fill_(1.0)
        model[0].weight[5] *= 20.0  # the planted channel
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clp = create_defense("clp", u=3.0)
    clp.mitigate(model, data := HandsOver())  # data-free: the data is not read, only handed the results
    bn = model[1]
    assert bn.weight[5] == 0 and bn.bias[5] == 0
    keep = torch.arange(16) != 5
    assert torch.equal(bn.weight[keep], before["1.weight"][keep])
    assert torch.equal(bn.bias[keep], before["1.bias"][keep])
    assert torch.equal(model[0].weight, before["0.weight"])  # the convolution itself is untouched
    assert data.outputs.summary["pruned_channels"] == 1
    assert data.outputs.extras["pruned.1"].nonzero().flatten().tolist() == [5]
    # a higher u prunes nothing
    model = conv_bn(channels=16, seed=1)
    create_defense("clp", u=100.0).mitigate(model, HandsOver())
    assert torch.all(model[1].weight != 0)


def test_each_bn_goes_with_the_last_convolution_before_it():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 6, 1), nn.BatchNorm2d(5)
    )  # the last BN has no matching convolution: skipped
    pairs = conv_bn_pairs(model)
    assert [(conv_name, bn_name) for conv_name, _, bn_name, _ in pairs] == [("1", "2")]


def test_a_model_without_batchnorm_is_refused_in_one_line():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(UserError, match="has none, so it does not apply"):
        create_defense("clp").mitigate(model, HandsOver())


def test_run_on_digits_prunes_in_the_saved_weights(record_root):
    summary = defense.run("clp", result_file="badnet_digits", record_root=str(record_root), device="cpu", u=1.0)
    state = load_defense_result(record_root / "badnet_digits" / "defense" / "clp" / "defense_result.pt")["model"]
    record = load_record(record_root / "badnet_digits")
    assert summary["pruned_channels"] > 0 and summary["total_channels"] == 288
    zeroed = 0
    for name, count in summary["pruned_by_layer"].items():
        weight, bias = state[f"{name}.weight"], state[f"{name}.bias"]
        assert int((weight == 0).sum()) == int((bias == 0).sum()) == count
        zeroed += count
    assert zeroed == summary["pruned_channels"]
    changed = [k for k, v in record.model.items() if not torch.equal(v, state[k])]
    assert changed and all(
        k.endswith((".weight", ".bias")) and k.rsplit(".", 1)[0] in summary["pruned_by_layer"] for k in changed
    )
