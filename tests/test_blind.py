"""Blind: the pattern sits where the authors put it, the blended loss is the clean loss until
the clean loss has settled and then the fixed or MGDA blend of clean and backdoor losses,
and MGDA's weights are the least-norm combination of the two gradients."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import attack
from attack.base import AttackContext
from attack.blind import Blind, mgda_scales, min_norm_weight, pattern_and_mask
from utils.datasets import load_dataset
from utils.records import load_record


def test_pattern_place_on_32x32_and_on_8x8():
    pattern, mask = pattern_and_mask((32, 32))
    assert mask.sum() == 9 and torch.equal(torch.nonzero(mask).min(0).values, torch.tensor([3, 23]))
    assert torch.equal(pattern[3:8, 23:26], torch.tensor([[1.0, 0, 1], [0, 1, 0], [0, 0, 0], [0, 1, 0], [1, 0, 1]]))
    assert torch.equal(mask[3:8, 23:26], torch.tensor([[1.0, 1, 1], [0, 1, 0], [0, 0, 1], [0, 1, 0], [1, 1, 1]]))
    _, mask = pattern_and_mask((8, 8))
    assert mask.sum() == 9 and torch.equal(torch.nonzero(mask).min(0).values, torch.tensor([1, 5]))
    x = torch.full((2, 3, 8, 8), 0.5)
    out = Blind().apply(x)
    assert torch.equal(out[..., mask == 0], x[..., mask == 0]) and set(out[..., mask == 1].unique().tolist()) == {0, 1}


def test_min_norm_weight_by_hand():
    assert min_norm_weight(1.0, 0.0, 1.0) == 0.5  # orthogonal unit gradients: halfway
    assert min_norm_weight(1.0, 2.0, 4.0) == 0.999  # g2 = 2 g1: the smaller one, g1
    assert min_norm_weight(4.0, 2.0, 1.0) == 0.001
    g1, g2 = torch.tensor([3.0, 1.0]), torch.tensor([-1.0, 2.0])
    gamma = min_norm_weight(float(g1 @ g1), float(g1 @ g2), float(g2 @ g2))
    point = gamma * g1 + (1 - gamma) * g2
    assert abs(float((g1 - g2) @ point)) < 1e-6  # the least-norm point of the segment


def test_mgda_scales_normalise_the_gradients_first():
    losses = {"backdoor": torch.tensor(0.5), "normal": torch.tensor(2.0)}
    grads = {"backdoor": [torch.tensor([4.0, 0.0])], "normal": [torch.tensor([0.0, 1.0])]}
    # l2: both unit vectors, orthogonal -> 0.5; none: (4, 0) vs (0, 1) -> 1 / 17 on the longer one
    assert abs(mgda_scales(losses, grads, "l2")["backdoor"] - 0.5) < 1e-4
    assert abs(mgda_scales(losses, grads, "none")["backdoor"] - 1 / 17) < 1e-6
    # loss+: divided by loss * norm = 2 and 2 -> (2, 0) and (0, 0.5): gamma = 0.25 / 4.25
    scales = mgda_scales(losses, grads, "loss+")
    assert abs(scales["backdoor"] - 0.25 / 4.25) < 1e-4 and abs(sum(scales.values()) - 1) < 1e-12


class _Training:
    def __init__(self, model):
        self.model = model


def _blind(**kw) -> Blind:
    blind = Blind(batch_history_len=3, **kw)
    ctx = AttackContext(
        load_dataset("digits"), 0, "all2one", torch.device("cpu"), np.random.default_rng(0), {"pratio": 0.1}
    )
    blind.prepare(ctx)
    return blind


def test_blended_loss_waits_for_the_clean_loss_then_blends():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    blind = _blind(backdoor_batch_loss_threshold=5.0)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(1, 10, (16,))
    clean = F.cross_entropy(model(x), y)
    backdoor = F.cross_entropy(model(blind.apply(x)), torch.zeros_like(y))
    for _ in range(3):  # fewer than batch_history_len batches seen: the clean loss alone
        loss, logits, targets = blind.train_step(_Training(model), x, y)
        assert torch.allclose(loss, clean) and torch.equal(targets, y)
    loss, _, _ = blind.train_step(_Training(model), x, y)
    assert torch.allclose(loss, 1.0 * clean + 0.9 * backdoor)  # BackdoorBench's fixed scales
    high = _blind(backdoor_batch_loss_threshold=0.1)  # the clean loss never settles below 0.1
    for _ in range(5):
        loss, _, _ = high.train_step(_Training(model), x, y)
    assert torch.allclose(loss, clean)


def test_mgda_blend_uses_the_scales_of_the_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    blind = _blind(weight_loss_balance_mode="MGDA", mgda_normalize="none", backdoor_batch_loss_threshold=5.0)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(1, 10, (16,))
    for _ in range(4):
        loss, _, _ = blind.train_step(_Training(model), x, y)
    clean = F.cross_entropy(model(x), y)
    backdoor = F.cross_entropy(model(blind.apply(x)), torch.zeros_like(y))
    params = list(model.parameters())
    g_b = torch.cat([g.flatten() for g in torch.autograd.grad(backdoor, params)])
    g_n = torch.cat([g.flatten() for g in torch.autograd.grad(clean, params)])
    gamma = float((g_n - g_b) @ g_n / (g_b - g_n).pow(2).sum())  # the interior least-norm weight
    assert 0.001 < gamma < 0.999
    assert abs(blind.last_scales["backdoor"] - gamma) < 1e-4
    assert torch.allclose(loss, gamma * backdoor + (1 - gamma) * clean, atol=1e-4)


def test_digits_record_has_the_pattern_on_the_backdoor_test_set(tmp_path):
    attack.run(
        "blind",
        dataset="digits",
        epochs=1,
        batch_history_len=5,
        device="cpu",
        record_root=str(tmp_path),
        save_folder_name="b",
    )
    record, data = load_record(tmp_path / "b"), load_dataset("digits")
    _, mask = pattern_and_mask((8, 8))
    clean = data.test.images[record.bd_test.indices]
    assert record.bd_train is None and len(record.poison_indices) == 0
    assert torch.equal(record.bd_test.images[..., mask == 0], clean[..., mask == 0])
    assert set(record.bd_test.images[..., mask == 1].unique().tolist()) <= {0, 255}
    assert torch.equal(record.extras["mask"], mask)
