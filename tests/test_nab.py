"""NAB (defense/nab.py) and the SimCLR pieces it shares with DBD (defense/simclr.py): the
NT-Xent loss by hand, the per-image views, the defensive trigger and the model that stamps it
at test time, the nearest-centroid relabelling, the LGA pieces, the stamping of relabelled
samples in training, and a short run's detection."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from defense.nab import NAB, StampedClassifier, defensive_trigger, lga_rate, lowest, nearest_centroid_labels
from defense.simclr import SelfModel, nt_xent, simclr_augmentation, simclr_views
from defense.training import Held, delivered_set
from utils.datasets import ImageData, load_dataset
from utils.models import create_model
from utils.records import load_record


@pytest.fixture(scope="module")
def record(digits_record_root):
    return load_record(digits_record_root / "badnet_digits")


@pytest.fixture(scope="module")
def delivered(record):
    return delivered_set(record, load_dataset("digits"), torch.device("cpu"))


@pytest.fixture(scope="module")
def small(delivered):
    """The first 300 samples as delivered: the short run's training set."""
    return dataclasses.replace(delivered, train=ImageData(delivered.train.images[:300], delivered.train.labels[:300]))


def test_nt_xent_by_hand():
    # image 0: two identical views (1, 0); image 1: views (0, 1) and (-1, 0); temperature 0.5
    features = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [-1.0, 0.0]]])
    # anchor (1,0) against (0,1), (1,0)+, (-1,0): logits 0, 2, -2; anchor (0,1) against (1,0), (1,0), (-1,0)+: 0, 0, 0
    first = -math.log(math.exp(2) / (1 + math.exp(2) + math.exp(-2)))
    second = math.log(3)
    assert float(nt_xent(features, 0.5)) == pytest.approx((first + second) / 2, rel=1e-6)
    # the positive pair's gradient pulls the views together: the loss falls as they align
    apart = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, -1.0], [-1.0, 0.0]]])
    assert float(nt_xent(apart, 0.5)) > float(nt_xent(features, 0.5))


def test_simclr_views_are_drawn_per_image_and_stay_in_range():
    torch.manual_seed(0)
    x = torch.rand(1, 1, 8, 8).expand(16, 1, 8, 8).contiguous()
    views = simclr_views(x, simclr_augmentation((8, 8)))
    assert views.shape == x.shape and views.min() >= 0 and views.max() <= 1
    distinct = {tuple(v.flatten().tolist()) for v in views}
    assert len(distinct) > 8  # one draw per image, not one per batch


def test_self_model_projects_to_unit_vectors():
    backbone = create_model("cnn", 10, 1, (8, 8), (0.5,), (0.5,))
    model = SelfModel.around(backbone, 1, (8, 8), proj_dim=16)
    z = model(torch.rand(5, 1, 8, 8))
    assert z.shape == (5, 16) and torch.allclose(z.norm(dim=1), torch.ones(5), atol=1e-5)


def test_defensive_trigger_and_the_stamped_model():
    stamp = defensive_trigger(3, (6, 6), (0.2, 0.4, 0.6), trigger_size=2)
    x = torch.rand(4, 3, 6, 6)
    y = stamp(x)
    for c, m in enumerate((0.2, 0.4, 0.6)):
        assert torch.allclose(y[:, c, :2, :2], torch.full((4, 2, 2), m))
    assert torch.equal(y[:, :, 2:], x[:, :, 2:]) and torch.equal(y[:, :, :, 2:], x[:, :, :, 2:])
    model = create_model("cnn", 10, 3, (6, 6), (0.2, 0.4, 0.6), (0.3, 0.3, 0.3)).eval()
    stamped = StampedClassifier(model, stamp).eval()
    assert torch.allclose(stamped(x), model(y))
    # normalised, the stamp is BackdoorBench's zero: the same pixels as its images[:, :, :2, :2] = 0
    assert torch.allclose(model.normalize(y)[:, :, :2, :2], torch.zeros(4, 3, 2, 2), atol=1e-6)
    assert stamped.state_dict().keys() == model.state_dict().keys() and stamped.name == model.name


def test_nearest_centroid_relabelling_by_hand():
    features = torch.tensor([[0.0, 0.0], [0.2, 0.0], [5.0, 5.0], [5.2, 5.0], [4.9, 5.1], [0.1, 0.1]])
    labels = torch.tensor([0, 0, 1, 1, 0, 1])  # samples 4 and 5 carry the wrong label
    reference = torch.tensor([True, True, True, True, False, False])
    assert nearest_centroid_labels(features, labels, reference, 3).tolist() == [0, 0, 1, 1, 1, 0]


def test_lga_pieces_follow_backdoorbench():
    assert lowest(torch.tensor([0.5, 0.1, 0.9, 0.05, 0.3]), 0.4).tolist() == [1, 3]
    assert lga_rate(0.01, 0, 20) == pytest.approx(0.01)
    assert lga_rate(0.01, 50, 20) == pytest.approx(0.005)  # cos(pi / 2)
    assert lga_rate(0.01, 19, 20) == pytest.approx(0.005 * (1 + math.cos(math.pi * 19 / 100)))


def test_training_stamps_exactly_the_relabelled_samples(delivered):
    torch.manual_seed(0)
    n = len(delivered)
    labels = delivered.train.labels.clone()
    changed = torch.arange(0, n, 7)
    labels[changed] = (labels[changed] + 1) % 10
    held = Held(labels=labels, suspicious=changed)
    model = create_model("cnn", 10, 1, (8, 8), (0.5,), (0.5,))
    stamp = defensive_trigger(1, (8, 8), (0.5,), 2)
    seen = []
    model.register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0].detach()))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    NAB.train_epoch(delivered, model, optimizer, held, stamp, 0, torch.Generator().manual_seed(0))
    x = torch.cat(seen)
    corner = (x[:, 0, :2, :2] == 0.5).flatten(1).all(1)
    assert len(x) == n and int(corner.sum()) == len(changed)


def test_a_short_run_relabels_only_suspicious_samples_and_returns_the_stamped_model(small):
    torch.manual_seed(0)
    nab = NAB(epoch_self=1, batch_size_self=128, epoch_lga=2, epochs=1)
    model = nab.train(held := dataclasses.replace(small))  # its own outputs (what the method hands over)
    assert isinstance(model, StampedClassifier) and not model.training
    extras, summary = held.outputs.extras, held.outputs.summary
    suspicious, relabelled = extras["suspicious"], extras["relabelled"]
    assert len(suspicious) == int(0.1 * len(small)) == summary["suspicious"]
    assert set(relabelled.tolist()) <= set(suspicious.tolist()) and len(relabelled) == summary["relabelled"]
    trigger = extras["defensive_trigger"]
    assert trigger.shape == (2, 1, 8, 8) and int(trigger[1].sum()) == 4
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(model(x), model(torch.where(trigger[1].bool(), torch.zeros_like(x), x)))  # the stamp wins
