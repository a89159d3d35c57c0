"""EP: BackdoorBench's histogram entropy on a hand-computed case, the per-image channel
maxima, a planted two-valued (bimodal) channel is pruned and no other, and a run through
the harness on digits."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch import nn

import defense
from defense import create_defense
from defense.base import HandsOver
from defense.ep import batch_entropy, batch_feats
from utils.errors import UserError
from utils.records import load_defense_result


class Batch(HandsOver):
    """The part of DefenseData EP reads: one batch of images."""

    def __init__(self, x: torch.Tensor):
        super().__init__()
        self.x = x

    def generator(self, offset: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(offset)

    def batches(self, batch_size, *, shuffle=True, augment=False, generator=None):
        yield self.x[:batch_size], torch.zeros(min(batch_size, len(self.x)), dtype=torch.long)

    def autocast(self):
        return contextlib.nullcontext()


def test_histogram_entropy_as_backdoorbench_counts_it():
    feats = torch.tensor([[0.0, 0.05, 0.05, 0.15, 0.25, 0.25], [0.05, 0.05, 0.05, 0.05, 0.05, 0.05]])
    # bins of 0.1 from the global minimum 0, int(0.25 / 0.1) = 2 of them; values strictly inside
    # count (0 and 0.25 fall in none): row 0 has 2 and 1 of its 6 values in the bins
    expected_0 = -(2 / 6 * math.log(2 / 6) + 1 / 6 * math.log(1 / 6))
    got = batch_entropy(feats)
    assert torch.allclose(got, torch.tensor([expected_0, 0.0]), atol=1e-6)


def test_features_are_the_per_image_maximum_of_each_channel():
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 2, 2)
    assert torch.equal(batch_feats(x), torch.tensor([[3.0, 15.0], [7.0, 19.0], [11.0, 23.0]]))


def test_a_planted_bimodal_channel_is_pruned_and_no_other():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(16)).eval()
    with torch.no_grad():
        model[0].bias.uniform_(-1.0, 1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(256, 16, 4, 4)
    x[:, 9] = 0.0
    x[:26, 9, 0, 0] = 8.0  # a tenth of the batch drives neuron 9 far up: two populations
    ep = create_defense("ep", u=3.0, batch_size=256)
    ep.mitigate(model, data := Batch(x))
    pruned = data.outputs.extras["pruned.0"]
    assert pruned.nonzero().flatten().tolist() == [9]
    assert model[0].weight[9] == 0 and model[0].bias[9] == 0
    assert torch.equal(model[0].weight[~pruned], before["0.weight"][~pruned])
    assert torch.equal(model[0].bias[~pruned], before["0.bias"][~pruned])
    entropy = data.outputs.extras["entropy.0"]
    assert entropy[9] < 0.5 < entropy[~pruned].min()
    assert data.outputs.summary["pruned_neurons"] == 1


def test_a_model_without_batchnorm_is_refused():
    with pytest.raises(UserError, match="EP prunes the channels of BatchNorm2d layers"):
        create_defense("ep").mitigate(nn.Sequential(nn.Conv2d(3, 4, 3)), Batch(torch.zeros(2, 3, 8, 8)))


def test_run_on_digits(record_root):
    summary = defense.run("ep", result_file="badnet_digits", record_root=str(record_root), device="cpu", u=1.0)
    state = load_defense_result(record_root / "badnet_digits" / "defense" / "ep" / "defense_result.pt")["model"]
    assert summary["total_neurons"] == 288 and summary["pruned_neurons"] > 0
    for name, count in summary["pruned_by_layer"].items():
        assert int((state[f"{name}.weight"] == 0).sum()) == int((state[f"{name}.bias"] == 0).sum()) == count
