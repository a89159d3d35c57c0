"""BNP: BackdoorBench's KL score of a BN channel (against torch.distributions), a planted
channel whose running statistics disagree with the clean data is pruned and no other, the
statistics come from a seeded clean batch, and a run through the harness on digits."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch import nn
from torch.distributions import Normal, kl_divergence

import defense
from defense import create_defense
from defense.base import HandsOver
from defense.bnp import bn_kl_divergence
from utils.errors import UserError
from utils.records import load_defense_result


class Batch(HandsOver):
    """The part of DefenseData BNP reads: one batch of images."""

    def __init__(self, x: torch.Tensor):
        super().__init__()
        self.x, self.sizes = x, []

    def generator(self, offset: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(offset)

    def batches(self, batch_size, *, shuffle=True, augment=False, generator=None):
        self.sizes.append(batch_size)
        yield self.x[:batch_size], torch.zeros(min(batch_size, len(self.x)), dtype=torch.long)

    def autocast(self):
        return contextlib.nullcontext()


def test_score_is_backdoorbenchs_kl_formula():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    bn.running_mean.copy_(torch.tensor([0.0, 1.0, -2.0]))
    bn.running_var.copy_(torch.tensor([1.0, 4.0, 0.5]))
    x = torch.randn(64, 3, 5, 5) * torch.tensor([1.0, 0.5, 2.0]).view(1, 3, 1, 1) + 0.3
    mean_1, var_1 = x.mean((0, 2, 3)), x.var((0, 2, 3))
    kl = kl_divergence(Normal(mean_1, var_1.sqrt()), Normal(bn.running_mean, bn.running_var.sqrt()))
    # BackdoorBench's first term is log(var_2 / var_1), twice the Gaussian KL's log(sigma_2 / sigma_1)
    expected = kl + 0.5 * (bn.running_var / var_1).log()
    assert torch.allclose(bn_kl_divergence(bn, x), expected, atol=1e-5)
    # equal statistics score 0
    bn.running_mean.copy_(mean_1)
    bn.running_var.copy_(var_1)
    assert torch.allclose(bn_kl_divergence(bn, x), torch.zeros(3), atol=1e-5)


def test_a_planted_channel_is_pruned_and_no_other():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(16)).eval()
    with torch.no_grad():
        model[0].weight.uniform_(0.5, 1.5)
        model[0].bias.uniform_(-1.0, 1.0)
        model[0].running_mean[7] = 5.0  # the running statistics of a backdoor neuron: shifted by poisoned data
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = Batch(torch.randn(256, 16, 4, 4))  # clean data: N(0, 1) in every channel
    bnp = create_defense("bnp", u=3.0, batch_size=128)
    bnp.mitigate(model, data)
    assert data.sizes == [128]
    pruned = data.outputs.extras["pruned.0"]
    assert pruned.nonzero().flatten().tolist() == [7]
    assert model[0].weight[7] == 0 and model[0].bias[7] == 0
    assert torch.equal(model[0].weight[~pruned], before["0.weight"][~pruned])
    assert torch.equal(model[0].bias[~pruned], before["0.bias"][~pruned])
    assert data.outputs.summary == {"pruned_neurons": 1, "total_neurons": 16, "pruned_by_layer": {"0": 1}}
    assert data.outputs.extras["kl.0"][7] > 10 > data.outputs.extras["kl.0"][~pruned].max()
    assert math.isclose(float(data.outputs.extras["kl.0"][7]), 12.5, rel_tol=0.1)  # (5 - 0)^2 / 2


def test_a_model_without_batchnorm_is_refused():
    with pytest.raises(UserError, match="BNP prunes the channels of BatchNorm2d layers"):
        create_defense("bnp").mitigate(nn.Sequential(nn.Conv2d(3, 4, 3)), Batch(torch.zeros(2, 3, 8, 8)))


def test_run_on_digits(record_root):
    summary = defense.run("bnp", result_file="badnet_digits", record_root=str(record_root), device="cpu", u=1.0)
    state = load_defense_result(record_root / "badnet_digits" / "defense" / "bnp" / "defense_result.pt")["model"]
    assert summary["total_neurons"] == 288 and summary["pruned_neurons"] > 0
    for name, count in summary["pruned_by_layer"].items():
        assert int((state[f"{name}.weight"] == 0).sum()) == int((state[f"{name}.bias"] == 0).sum()) == count
    again = defense.run(
        "bnp", result_file="badnet_digits", record_root=str(record_root), device="cpu", u=1.0, overwrite=True
    )
    assert again["pruned_by_layer"] == summary["pruned_by_layer"]  # the clean batch is drawn from the seed
