"""LIRA: the trigger stays inside the L-infinity ball, the generator learns in stage I and is
fixed in stage II, and the generator kept in the record rebuilds the backdoor test set."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import attack
from attack.base import AttackContext
from attack.lira import LIRA, Autoencoder, generator_from_extras, perturb
from utils.datasets import load_dataset
from utils.poison import to_uint8
from utils.records import load_record


def test_perturbation_is_bounded_by_eps_and_clipped_to_the_image_range():
    x = torch.rand(8, 3, 32, 32)
    x[:, :, :4] = 1.0  # saturated rows: the clip keeps them in [0, 1]
    net = Autoencoder(3, (32, 32), (0.5,) * 3, (0.25,) * 3)
    for eps in (0.01, 0.1):
        out = perturb(x, net, eps)
        assert (out - x).abs().max() <= eps + 1e-7 and out.min() >= 0 and out.max() <= 1
        assert (out - x).abs().max() > eps / 10  # and it is there
    assert Autoencoder(1, (8, 8), (0.5,), (0.25,))(torch.rand(2, 1, 8, 8)).shape == (2, 1, 8, 8)
    assert Autoencoder(1, (28, 28), (0.5,), (0.25,))(torch.rand(2, 1, 28, 28)).shape == (2, 1, 28, 28)


class _Training:
    def __init__(self, model, epoch):
        self.model, self.epoch = model, epoch


def test_generator_learns_in_stage_one_and_is_fixed_in_stage_two():
    torch.manual_seed(0)
    lira = LIRA(both_train_epochs=1, lr_atk=0.01)
    ctx = AttackContext(
        load_dataset("digits"),
        0,
        "all2one",
        torch.device("cpu"),
        np.random.default_rng(0),
        {"pratio": 0.1, "epochs": 2},
    )
    lira.prepare(ctx)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    opt_f = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_t = torch.optim.Adam(lira.generator.parameters(), lr=0.01)
    x, y = torch.rand(32, 1, 8, 8), torch.randint(1, 10, (32,))

    def step(epoch):
        before_f = [p.detach().clone() for p in model.parameters()]
        before_t = [p.detach().clone() for p in lira.generator.parameters()]
        for opt in (opt_f, opt_t):
            opt.zero_grad(set_to_none=True)
        loss, _, _ = lira.train_step(_Training(model, epoch), x, y)
        loss.backward()
        grads_t = [p.grad for p in lira.generator.parameters()]
        for opt in (opt_f, opt_t):
            opt.step()
        moved_f = any(not torch.equal(a, b) for a, b in zip(before_f, model.parameters()))
        moved_t = any(not torch.equal(a, b) for a, b in zip(before_t, lira.generator.parameters()))
        return moved_f, moved_t, grads_t

    moved_f, moved_t, _ = step(0)
    assert moved_f and moved_t  # stage I: both learn
    moved_f, moved_t, grads_t = step(1)
    assert moved_f and not moved_t and all(g is None for g in grads_t)  # stage II: T is fixed


def test_generator_loss_leaves_no_gradient_in_the_classifier():
    torch.manual_seed(0)
    lira = LIRA(both_train_epochs=5, alpha=1.0)  # alpha 1: the classifier's own loss is the clean loss only
    lira.prepare(
        AttackContext(
            load_dataset("digits"),
            0,
            "all2one",
            torch.device("cpu"),
            np.random.default_rng(0),
            {"pratio": 0.1, "epochs": 10},
        )
    )
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x, y = torch.rand(16, 1, 8, 8), torch.randint(1, 10, (16,))
    loss, logits, _ = lira.train_step(_Training(model, 0), x, y)
    loss.backward()
    clean = nn.functional.cross_entropy(model(x), y)
    expected = torch.autograd.grad(clean, list(model.parameters()))
    assert all(torch.allclose(p.grad, g, atol=1e-6) for p, g in zip(model.parameters(), expected))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lira.generator.parameters())


def test_digits_record_keeps_the_generator_that_rebuilds_the_backdoor_test_set(tmp_path):
    attack.run(
        "lira",
        dataset="digits",
        epochs=2,
        both_train_epochs=1,
        device="cpu",
        record_root=str(tmp_path),
        save_folder_name="l",
    )
    record, data = load_record(tmp_path / "l"), load_dataset("digits")
    eps = record.attack_params["test_eps"]
    net = generator_from_extras(record.extras, 1, (8, 8), record.mean, record.std)
    clean = data.test.images[record.bd_test.indices]
    with torch.no_grad():
        remade = to_uint8(perturb(clean.float() / 255, net, eps))
    assert (remade.int() - record.bd_test.images.int()).abs().max() <= 1
    assert (record.bd_test.images.int() - clean.int()).abs().max() <= round(eps * 255) + 1  # the bound at rest
    assert record.bd_train is None and "generator.encoder.0.weight" in record.extras
