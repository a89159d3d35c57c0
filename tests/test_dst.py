"""D-ST (defense/dst.py): the SS-CTL loss against an independent loop, the mixed
cross-entropy by hand, the learning-rate schedules, the batched augmentation, and a short
run's flags. The shared split is tested in tests/test_dbr.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from defense.dst import (
    CLEAN,
    DST,
    POISONED,
    UNCERTAIN,
    consistency_supcon_loss,
    contrastive_view,
    mce_rate,
    mixed_cross_entropy,
    resized_crop,
    sscl_rate,
)
from defense.training import delivered_set
from utils.datasets import load_dataset
from utils.records import load_record


def supcon_by_loop(features, labels, flags, temperature, base=0.07):
    """SS-CTL written out anchor by anchor (the paper's definition)."""
    bsz, views, _ = features.shape
    flat = [features[i, v] for v in range(views) for i in range(bsz)]  # view-major, as torch.cat(unbind)
    owner = [i for v in range(views) for i in range(bsz)]
    total = 0.0
    for a, fa in enumerate(flat):
        i = owner[a]
        others = [b for b in range(len(flat)) if b != a]
        denominator = sum(math.exp(float(fa @ flat[b]) / temperature) for b in others)
        if flags[i] == CLEAN:
            positives = [b for b in others if labels[owner[b]] == labels[i]]
        else:
            positives = [b for b in others if owner[b] == i]
        total += -sum(float(fa @ flat[b]) / temperature - math.log(denominator) for b in positives) / len(positives)
    return (temperature / base) * total / len(flat)


def test_consistency_supcon_loss_matches_an_independent_loop():
    torch.manual_seed(0)
    features = F.normalize(torch.randn(6, 2, 5), dim=2)
    labels = torch.tensor([0, 1, 0, 1, 0, 2])
    flags = torch.tensor([CLEAN, CLEAN, POISONED, UNCERTAIN, CLEAN, POISONED])
    got = float(consistency_supcon_loss(features, labels, flags, 0.1))
    assert got == pytest.approx(supcon_by_loop(features, labels, flags, 0.1), rel=1e-4)
    all_clean = torch.zeros(6, dtype=torch.long)
    assert float(consistency_supcon_loss(features, labels, all_clean, 0.5)) == pytest.approx(
        supcon_by_loop(features, labels, all_clean, 0.5), rel=1e-4
    )


def test_mixed_cross_entropy_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    flags = torch.tensor([CLEAN, POISONED, UNCERTAIN])
    clean = math.log(1 + math.exp(-2))
    poisoned = math.log(1 + math.exp(2))
    assert float(mixed_cross_entropy(logits, labels, flags, 0.001)) == pytest.approx(clean - 0.001 * poisoned)
    only_uncertain = torch.full((3,), UNCERTAIN)
    assert float(mixed_cross_entropy(logits, labels, only_uncertain, 0.001)) == 0.0


def test_learning_rates_follow_backdoorbenchs_schedules():
    assert sscl_rate(0.5, 1, 200, 0, 10) == pytest.approx(0.01)
    warm_to = 0.0005 + (0.5 - 0.0005) * (1 + math.cos(math.pi * 10 / 200)) / 2
    assert sscl_rate(0.5, 10, 200, 9, 10) == pytest.approx(0.01 + 99 / 100 * (warm_to - 0.01))
    assert sscl_rate(0.5, 200, 200, 0, 10) == pytest.approx(0.0005)
    assert mce_rate(5.0, 1, 0, 4) == pytest.approx(0.01) and mce_rate(5.0, 11, 0, 4) == 5.0
    assert mce_rate(5.0, 10, 3, 4) == pytest.approx(0.01 + 39 / 40 * 4.99)


def test_views_are_seeded_images_and_a_full_crop_is_the_identity():
    x = torch.rand(16, 3, 8, 8)
    a = contrastive_view(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a, contrastive_view(x, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, contrastive_view(x, torch.Generator().manual_seed(2)))
    full = resized_crop(x, torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.allclose(full, x, atol=1e-6)
    gray = torch.rand(4, 1, 8, 8)
    assert contrastive_view(gray, torch.Generator().manual_seed(0)).shape == gray.shape


def test_a_short_run_flags_every_sample_and_trains_only_the_classifier_in_the_last_phase(digits_record_root):
    data = delivered_set(load_record(digits_record_root / "badnet_digits"), load_dataset("digits"), torch.device("cpu"))
    torch.manual_seed(0)
    dst = DST(sd_epochs=1, sd_finetune_epochs=0, sscl_epochs=1, mce_epochs=0, batch_size=128)
    encoder = dst.train(data).state_dict()
    flags = data.outputs.extras["flags"]
    assert len(flags) == len(data) and set(flags.unique().tolist()) == {CLEAN, UNCERTAIN, POISONED}
    assert int((flags == POISONED).sum()) == data.outputs.summary["taken_as_poisoned"] >= int(0.05 * len(data))
    torch.manual_seed(0)
    both = DST(sd_epochs=1, sd_finetune_epochs=0, sscl_epochs=1, mce_epochs=1, batch_size=128)
    trained = both.train(data).state_dict()
    linear = [k for k in trained if not torch.equal(trained[k], encoder[k])]
    assert linear and all(k.startswith("net.") for k in linear) and len(linear) == 2  # the last layer's weight and bias
