"""FT-SAM: the ascent perturbation has norm rho (adaptive: the |w|-scaled norm), a step
takes the gradient at w + epsilon but updates from w, BatchNorm statistics move once per
step, BackdoorBench's smoothed loss, and a run through the harness on digits."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

import defense
from defense import create_defense
from defense.ft_sam import sam_perturbation, sam_step, smooth_cross_entropy
from utils.records import load_defense_result, load_record


class NoAmp:
    def autocast(self):
        return contextlib.nullcontext()


def scaler() -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", enabled=False)


def params_with_grads(seed: int = 0) -> list[nn.Parameter]:
    torch.manual_seed(seed)
    params = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(2))]
    for p in params[:2]:
        p.grad = torch.randn_like(p)
    return params  # the last one has no gradient


def test_sam_perturbation_has_norm_rho():
    params = params_with_grads()
    epsilon = sam_perturbation(params, rho=2.0, adaptive=False)
    assert epsilon[2] is None
    norm = torch.sqrt(sum((e**2).sum() for e in epsilon[:2]))
    assert torch.isclose(norm, torch.tensor(2.0), rtol=1e-5)
    for p, e in zip(params[:2], epsilon[:2]):  # along the gradient
        assert torch.allclose(e, p.grad * (2.0 / torch.sqrt(sum((q.grad**2).sum() for q in params[:2]))))


def test_adaptive_perturbation_has_weight_scaled_norm_rho():
    params = params_with_grads(1)
    epsilon = sam_perturbation(params, rho=0.5, adaptive=True)
    scaled = torch.sqrt(sum(((e / p.abs()) ** 2).sum() for p, e in zip(params[:2], epsilon[:2])))
    assert torch.isclose(scaled, torch.tensor(0.5), rtol=1e-5)  # ||T_w^{-1} epsilon|| = rho
    plain = torch.sqrt(sum((e**2).sum() for e in epsilon[:2]))
    assert not torch.isclose(plain, torch.tensor(0.5), rtol=1e-2)  # it is not the plain norm


def test_non_finite_gradient_gives_no_perturbation():
    params = params_with_grads()
    params[0].grad[0, 0] = float("inf")
    assert all(torch.all(e == 0) for e in sam_perturbation(params, rho=2.0)[:2])


def test_step_uses_the_gradient_at_the_perturbed_point_and_updates_from_w():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    w = [p.detach().clone() for p in model.parameters()]
    # by hand: the gradient at w, the perturbation, the gradient at w + epsilon
    ref = [p.clone().requires_grad_(True) for p in w]

    def loss_fn(out):
        return F.cross_entropy(out, y)

    def forward(ps, inp):
        return torch.tanh(inp @ ps[0].T + ps[1]) @ ps[2].T + ps[3]

    g = torch.autograd.grad(loss_fn(forward(ref, x)), ref)
    for r, gi in zip(ref, g):
        r.grad = gi
    epsilon = sam_perturbation(ref, rho=0.3, adaptive=True)
    shifted = [(p + e).requires_grad_(True) for p, e in zip(w, epsilon)]
    g_perturbed = torch.autograd.grad(loss_fn(forward(shifted, x)), shifted)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    at_step = {}
    step = optimizer.step

    def spy(*args, **kwargs):
        at_step["weights"] = [p.detach().clone() for p in model.parameters()]
        at_step["grads"] = [p.grad.detach().clone() for p in model.parameters()]
        return step(*args, **kwargs)

    optimizer.step = spy
    sam_step(model, optimizer, loss_fn, x, rho=0.3, adaptive=True, data=NoAmp(), scaler=scaler())
    for before, restored in zip(w, at_step["weights"]):
        assert torch.equal(before, restored)  # the weights are restored before the update
    for got, expected in zip(at_step["grads"], g_perturbed):
        assert torch.allclose(got, expected, atol=1e-6)  # the gradient is the perturbed point's
    for before, after, gp in zip(w, model.parameters(), g_perturbed):
        assert torch.allclose(after, before - 0.1 * gp, atol=1e-6)


def test_batchnorm_statistics_move_once_per_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.LazyLinear(2))
    x, y = torch.randn(4, 2, 5, 5), torch.tensor([0, 1, 0, 1])
    model(x)  # materialise the lazy layer
    model[1].reset_running_stats()
    reference = nn.Sequential(*[m for m in model])  # same modules: compute the one-pass statistics first
    stats = [model[1].running_mean.clone(), model[1].running_var.clone()]
    with torch.no_grad():
        reference.train()(x)
    expected = [model[1].running_mean.clone(), model[1].running_var.clone()]
    model[1].running_mean.copy_(stats[0])
    model[1].running_var.copy_(stats[1])
    model[1].num_batches_tracked.zero_()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    sam_step(model.train(), optimizer, lambda out: F.cross_entropy(out, y), x, 1.0, True, NoAmp(), scaler())
    assert torch.allclose(model[1].running_mean, expected[0]) and torch.allclose(model[1].running_var, expected[1])
    assert model[1].momentum == 0.1  # restored after the second pass


def test_smoothed_loss_matches_backdoorbench_up_to_a_constant():
    torch.manual_seed(0)
    logits, y = torch.randn(6, 4, requires_grad=True), torch.randint(0, 4, (6,))
    s = 0.1
    one_hot = torch.full((6, 4), s / 3).scatter_(1, y.unsqueeze(1), 1 - s)
    bb = F.kl_div(F.log_softmax(logits, 1), one_hot, reduction="none").sum(-1).mean()
    ours = smooth_cross_entropy(logits, y, s)
    entropy = -(one_hot * one_hot.log()).sum(1).mean()
    assert torch.isclose(ours - entropy, bb, atol=1e-6)
    assert torch.isclose(smooth_cross_entropy(logits, y, 0.0), F.cross_entropy(logits, y))


def test_run_on_digits_changes_the_weights_and_keeps_clean_accuracy(record_root):
    assert create_defense("ft-sam").adaptive is True  # BackdoorBench's name; ASAM by default
    summary = defense.run(
        "ft_sam", result_file="badnet_digits", record_root=str(record_root), device="cpu", epochs=2, rho=0.5
    )
    state = load_defense_result(record_root / "badnet_digits" / "defense" / "ft_sam" / "defense_result.pt")["model"]
    record = load_record(record_root / "badnet_digits")
    assert any(not torch.equal(v, state[k]) for k, v in record.model.items() if k.endswith(".weight"))
    assert summary["after"]["clean_acc"] >= summary["before"]["clean_acc"] - 0.05
