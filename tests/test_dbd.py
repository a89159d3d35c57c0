"""DBD (defense/dbd.py): the symmetric cross-entropy, the MixMatch pieces (sharpening,
mixup, losses, ramp) by hand, the high-credibility split, the batch cycler, the frozen
backbone of the linear warm-up, and a short run. The SimCLR loss is tested in tests/test_nab.py."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from defense.dbd import DBD, Cycler, credible, mixmatch_loss, mixup, rampup, sharpen, symmetric_cross_entropy
from defense.training import delivered_set
from utils.datasets import ImageData, load_dataset
from utils.models import Classifier
from utils.records import load_record


@pytest.fixture(scope="module")
def delivered(digits_record_root):
    return delivered_set(load_record(digits_record_root / "badnet_digits"), load_dataset("digits"), torch.device("cpu"))


@pytest.fixture(scope="module")
def small(delivered):
    """The first 300 samples as delivered: the short runs' training set."""
    return dataclasses.replace(delivered, train=ImageData(delivered.train.images[:300], delivered.train.labels[:300]))


def test_symmetric_cross_entropy_by_hand():
    logits, y = torch.zeros(1, 2), torch.tensor([0])
    # p = (0.5, 0.5): CE = log 2; RCE = -(0.5 log 1 + 0.5 log 1e-4) = 0.5 log 1e4
    expected = 0.1 * math.log(2) + 1.0 * 0.5 * math.log(1e4)
    assert float(symmetric_cross_entropy(logits, y, 2)) == pytest.approx(expected, rel=1e-5)
    confident = torch.tensor([[20.0, 0.0], [0.0, 20.0]])
    per_sample = symmetric_cross_entropy(confident, torch.tensor([0, 0]), 2, reduction="none")
    assert per_sample[0] < 1e-6 and per_sample[1] == pytest.approx(0.1 * 20 + math.log(1e4), rel=1e-4)


def test_sharpening_mixup_losses_and_ramp_by_hand():
    assert torch.allclose(sharpen(torch.tensor([[0.6, 0.4]]), 0.5), torch.tensor([[0.36 / 0.52, 0.16 / 0.52]]))
    x, t = torch.tensor([[0.0], [10.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    mixed, targets = mixup(x, t, 0.75, torch.tensor([1, 0]))
    assert torch.allclose(mixed, torch.tensor([[2.5], [7.5]]))
    assert torch.allclose(targets, torch.tensor([[0.75, 0.25], [0.25, 0.75]]))
    lx, lu = mixmatch_loss(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]))
    assert float(lx) == pytest.approx(math.log(2)) and float(lu) == pytest.approx(0.25)  # ((0.5-1)^2 + 0.5^2) / 2
    assert rampup(95, 190) == pytest.approx(0.5) and rampup(300, 190) == 1.0 and rampup(3, 0) == 1.0


def test_credible_split_keeps_the_lowest_losses():
    mask = credible(torch.tensor([0.5, 0.1, 0.9, 0.05, 0.3]), 0.5)
    assert mask.tolist() == [False, True, False, True, False]  # int(5 * 0.5) = 2


def test_cycler_draws_whole_permutations_and_drops_the_remainder():
    cycler = Cycler(torch.arange(10, 20), 4, torch.Generator().manual_seed(0))
    first = [cycler.next() for _ in range(2)]
    assert all(len(b) == 4 for b in first)
    assert len(set(torch.cat(first).tolist())) == 8 and set(torch.cat(first).tolist()) <= set(range(10, 20))
    third = cycler.next()  # two left over: a fresh permutation
    assert len(third) == 4 and set(third.tolist()) <= set(range(10, 20))


def test_linear_warmup_trains_only_the_head(small):
    torch.manual_seed(0)
    dbd = DBD()
    model = small.new_model()
    before = {k: v.clone() for k, v in model.named_parameters()}
    optimizer = torch.optim.Adam(model.parameters(), lr=0.002)
    dbd.warmup_epoch(small, model, optimizer, 0, torch.Generator().manual_seed(0))
    head = {f"net.{n}" for n, m in model.net.named_modules() if m is model.classifier_layer()}
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert changed and {k.rsplit(".", 1)[0] for k in changed} == head


@pytest.mark.parametrize("simclr_augment", ["batched", "per_image"])
def test_a_short_run_keeps_epsilon_labelled_and_returns_the_architecture(small, simclr_augment):
    torch.manual_seed(0)
    dbd = DBD(
        epoch_self=1,
        batch_size_self=128,
        epoch_warmup=1,
        semi_epochs=1,
        train_iteration=3,
        epsilon=0.3,
        simclr_augment=simclr_augment,
    )
    model = dbd.train(held := dataclasses.replace(small))  # its own outputs (what the method hands over)
    assert isinstance(model, Classifier) and not model.training
    assert len(held.outputs.extras["labelled"]) == int(len(small) * 0.3) == held.outputs.summary["labelled"]
