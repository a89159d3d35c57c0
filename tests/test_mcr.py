"""MCR: the quadratic Bezier curve passes through its end points, its midpoint and its
gradient in the control point are the hand-computed ones, a theta at the midpoint of the
end points gives the straight segment, BatchNorm statistics are recomputed exactly, and a
run through the harness returns the curve's point at t."""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from defense import create_defense
from defense.base import DefenseData
from defense.mcr import bezier_coefficients, curve_point, parameters_of, recompute_batchnorm


def three_points(seed: int = 0) -> tuple[dict, dict, dict]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"a": (3, 2), "b": (4,)}
    return tuple({k: torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(3))


def test_curve_passes_through_its_end_points():
    w_0, theta, w_1 = three_points()
    for name in w_0:
        assert torch.equal(curve_point(w_0, theta, w_1, 0.0)[name], w_0[name])
        assert torch.equal(curve_point(w_0, theta, w_1, 1.0)[name], w_1[name])


def test_midpoint_and_coefficients_are_the_quadratic_bezier_ones():
    w_0, theta, w_1 = three_points(1)
    mid = curve_point(w_0, theta, w_1, 0.5)
    for name in w_0:
        assert torch.allclose(mid[name], 0.25 * w_0[name] + 0.5 * theta[name] + 0.25 * w_1[name])
    assert torch.allclose(bezier_coefficients(0.1), torch.tensor([0.81, 0.18, 0.01]))
    assert torch.allclose(bezier_coefficients(0.3).sum(), torch.tensor(1.0))


def test_theta_at_the_midpoint_of_the_ends_gives_the_straight_segment():
    w_0, _, w_1 = three_points(2)
    theta = {k: (w_0[k] + w_1[k]) / 2 for k in w_0}
    for t in (0.1, 0.37, 0.8):
        point = curve_point(w_0, theta, w_1, t)
        for name in w_0:
            assert torch.allclose(point[name], (1 - t) * w_0[name] + t * w_1[name], atol=1e-6)


def test_gradient_in_theta_is_2t_1_minus_t_times_the_gradient_at_the_point():
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    w_0, w_1 = parameters_of(model), {k: v + 1.0 for k, v in parameters_of(model).items()}
    theta = {k: (v * 0.3).requires_grad_(True) for k, v in parameters_of(model).items()}
    t = 0.3
    point = curve_point(w_0, theta, w_1, t)
    F.cross_entropy(torch.func.functional_call(model, point, (x,)), y).backward()
    at = {k: v.detach().clone().requires_grad_(True) for k, v in point.items()}
    grads = torch.autograd.grad(F.cross_entropy(torch.func.functional_call(model, at, (x,)), y), list(at.values()))
    for name, g in zip(at, grads):
        assert torch.allclose(theta[name].grad, 2 * t * (1 - t) * g, atol=1e-6)


def test_batchnorm_statistics_are_the_exact_average_over_the_clean_subset(digits_defender):
    _, data = digits_defender
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4), nn.BatchNorm1d(4))
    model[2].running_mean.fill_(7.0)
    data = DefenseData(data.clean, dataclasses.replace(data.info, crop_padding=0, hflip=False), data.device)
    recompute_batchnorm(model, data, batch_size=100, generator=torch.Generator().manual_seed(0))
    x, _ = data.tensors()
    with torch.no_grad():
        h = model[1](model[0](x))
    # momentum None: PyTorch's cumulative average gives each batch's mean the same weight
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    means = torch.stack([h[order[i : i + 100]].mean(0) for i in range(0, len(x), 100)])
    assert torch.allclose(model[2].running_mean, means.mean(0), atol=1e-5)
    assert model[2].momentum == 0.1 and not model.training


def test_mcr_returns_the_point_at_t_between_the_backdoored_and_fine_tuned_models(digits_defender):
    record, data = digits_defender
    model = record.build_model().eval()
    w_0 = parameters_of(model)
    mcr = create_defense("mcr", t=0.0, epochs=1, ft_epochs=1)
    purified = mcr.mitigate(copy.deepcopy(model), data)
    for name, p in purified.named_parameters():  # t = 0: the backdoored model's weights
        assert torch.allclose(p, w_0[name])
    moved = create_defense("mcr", t=0.5, epochs=1, ft_epochs=2).mitigate(copy.deepcopy(model), data)
    assert any(not torch.allclose(p, w_0[name]) for name, p in moved.named_parameters())
