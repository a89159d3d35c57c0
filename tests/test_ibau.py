"""i-BAU: the implicit hypergradient against its closed form on a quadratic problem,
BackdoorBench's normalised-space steps against the project's, and the universal
perturbation search on the backdoored digits model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from defense.base import DefenseData
from defense.ibau import IBAU, implicit_hypergradient, twice_differentiable
from utils.datasets import ImageData, dataset_info
from utils.models import create_model


def quadratic_problem(seed: int = 0):
    """Inner: delta*(theta) = argmin_d 1/2 d^T A d - d^T B theta = A^-1 B theta, with the
    fixed-point map Phi(d, theta) = d - eta (A d - B theta). Outer: L(d, theta) =
    1/2 ||d - c||^2 + 1/2 ||theta||^2 + s^T d * (theta . 1), whose total gradient is
    B^T A^-1 dL/dd + dL/dtheta|_d."""
    g = torch.Generator().manual_seed(seed)
    n, m = 4, 3
    q = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = q @ q.T + n * torch.eye(n, dtype=torch.float64)
    B = torch.randn(n, m, generator=g, dtype=torch.float64)
    c = torch.randn(n, generator=g, dtype=torch.float64)
    s = torch.randn(n, generator=g, dtype=torch.float64)
    theta = torch.randn(m, generator=g, dtype=torch.float64, requires_grad=True)
    eta = 1.0 / float(torch.linalg.eigvalsh(A).max())  # a contraction: ||I - eta A|| < 1

    def fixed_point_map(d, params):
        (t,) = params
        return d - eta * (A @ d - B @ t)

    def outer_loss(d, params):
        (t,) = params
        return 0.5 * (d - c).pow(2).sum() + 0.5 * t.pow(2).sum() + (s @ d) * t.sum()

    delta_star = torch.linalg.solve(A, B @ theta.detach())
    t = theta.detach()
    dL_dd = delta_star - c + s * t.sum()
    dL_dt = t + (s @ delta_star) * torch.ones_like(t)
    J = torch.eye(n, dtype=torch.float64) - eta * A  # dPhi/ddelta (symmetric)
    return theta, delta_star, fixed_point_map, outer_loss, (A, B, J, eta, dL_dd, dL_dt)


def test_hypergradient_matches_the_implicit_gradient_of_a_quadratic():
    theta, delta_star, fp_map, outer, (A, B, J, eta, dL_dd, dL_dt) = quadratic_problem()
    exact = B.T @ torch.linalg.solve(A, dL_dd) + dL_dt
    (approx,) = implicit_hypergradient(delta_star, [theta], fp_map, outer, K=400)
    assert torch.allclose(approx, exact, rtol=1e-6, atol=1e-8)
    # With K iterations it is the first K terms of the Neumann series of (I - J)^-1.
    for K in (1, 2, 5):
        series = sum(torch.linalg.matrix_power(J, k) for k in range(K)) @ dL_dd
        (approx,) = implicit_hypergradient(delta_star, [theta], fp_map, outer, K=K)
        assert torch.allclose(approx, eta * B.T @ series + dL_dt, rtol=1e-10)
    # K = 0 ignores how delta* moves with theta; that is not the total gradient.
    (partial,) = implicit_hypergradient(delta_star, [theta], fp_map, outer, K=0)
    assert torch.allclose(partial, dL_dt) and not torch.allclose(partial, exact, rtol=1e-2)


def test_hypergradient_agrees_with_differentiating_through_the_solution():
    theta, _, fp_map, outer, (A, B, *_rest) = quadratic_problem(seed=1)
    loss = outer(torch.linalg.solve(A, B @ theta), [theta])  # delta*(theta) in closed form
    (autograd,) = torch.autograd.grad(loss, theta)
    delta_star = torch.linalg.solve(A, B @ theta.detach())
    (approx,) = implicit_hypergradient(delta_star, [theta], fp_map, outer, K=400)
    assert torch.allclose(approx, autograd, rtol=1e-6)


def test_universal_perturbation_raises_the_backdoored_models_loss(digits_defender):
    record, data = digits_defender
    model = record.build_model().eval()
    x, y = data.tensors()
    # digits' std is 0.5: delta_lr 4 on delta_n is a pixel-space step of 1, the bound 3 on
    # ||delta_n|| a pixel-space bound of 1.5
    ibau = IBAU(batch_size=50, delta_lr=4.0, delta_bound=3.0, inner_passes=2)
    delta, reached = ibau.find_perturbation(model, data, x[:1], data.generator())
    assert delta.shape == (1, *x.shape[1:])
    assert float(delta.norm()) <= 0.5 * 3.0 + 1e-5
    with torch.no_grad():
        clean_loss = F.cross_entropy(model(x), y)
        adv_logits = model(x + delta)
    assert F.cross_entropy(adv_logits, y) > clean_loss + 1.0
    assert (adv_logits.argmax(1) != y).float().mean() > 0.3
    assert reached > clean_loss


def test_a_round_lowers_the_loss_under_the_round_perturbation(digits_defender):
    record, data = digits_defender
    model = record.build_model().eval()
    x, y = data.tensors()
    x, y = x[:100], y[:100]
    ibau = IBAU(epochs=1, batch_size=50, lr=1e-3, delta_lr=4.0, delta_bound=3.0)
    torch.manual_seed(0)
    delta, _ = ibau.find_perturbation(model, data, x[:1], data.generator(5))
    with torch.no_grad():
        before = F.cross_entropy(model(x + delta), y)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    for step in range(3):
        ibau.outer_step(model, params, optimizer, data, x, y, delta, torch.ones(len(y), 1, 1, 1), 0, step)
    with torch.no_grad():
        after = F.cross_entropy(model(x + delta), y)
    assert after < 0.8 * before


def test_hard_activations_are_differentiated_twice_and_restored():
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(4, 6), nn.Hardswish(), nn.Linear(6, 6), nn.Hardsigmoid(), nn.Linear(6, 3)
    )
    x, y = torch.randn(5, 4) * 3, torch.tensor([0, 1, 2, 0, 1])
    params = list(model.parameters())

    def hypergradient():
        def fp_map(d, _):
            (g,) = torch.autograd.grad(-F.cross_entropy(model(x + d), y), d, create_graph=True)
            return d - 0.1 * g

        return implicit_hypergradient(
            torch.zeros(1, 4), params, fp_map, lambda d, _: F.cross_entropy(model(x + d), y), K=3
        )

    with torch.no_grad():
        reference = model(x)
    with twice_differentiable(model):
        with torch.no_grad():
            assert torch.allclose(model(x), reference)  # the same function
        grads = hypergradient()
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert "forward" not in vars(model[2]) and "forward" not in vars(model[4])  # restored


# -- BackdoorBench's procedure, on normalised inputs ----------------------------------------------

STD = (0.25, 0.5, 0.1)


def tiny_setup(seed: int = 0):
    """A small cnn on 3 x 8 x 8 inputs with per-channel std STD, and 16 clean samples."""
    torch.manual_seed(seed)
    model = create_model("cnn", num_classes=3, in_channels=3, img_size=(8, 8), mean=(0.4, 0.5, 0.6), std=STD).eval()
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (16, 3, 8, 8), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 3, (16,), generator=g)
    data = DefenseData(ImageData(images, labels), dataset_info("cifar10"), torch.device("cpu"))
    x, y = data.tensors()
    return model, data, x, y


def backdoorbench_search(net, x_n, y, lr, passes):
    """BackdoorBench's search (defense/i-bau.py): SGD on batch_pert, added to normalised
    images, loss mean(-CE) + 0.001 * ||batch_pert||^2 (one batch, ``passes`` steps)."""
    pert = torch.zeros(1, *x_n.shape[1:], requires_grad=True)
    opt = torch.optim.SGD([pert], lr=lr)
    for _ in range(passes):
        loss = torch.mean(-F.cross_entropy(net(x_n + pert), y, reduction="none")) + 0.001 * torch.norm(pert) ** 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    return pert.detach()


def backdoorbench_hypergradient(net, params, x_n, y, pert, patching_mask, K):
    """BackdoorBench's fixed_point(pert, params, K, GradientDescent(loss_inner, 0.1),
    loss_outer) written out: inner loss mean(-CE) + 0.001 ||p||^2 on x_n + p, outer loss
    CE on x_n + mask * p, vs from zero, K iterations."""
    p = pert.detach().requires_grad_(True)
    outer = F.cross_entropy(net(x_n + patching_mask * p), y)
    (gow,) = torch.autograd.grad(outer, p, retain_graph=True)
    goh = torch.autograd.grad(outer, params, allow_unused=True)
    inner = torch.mean(-F.cross_entropy(net(x_n + p), y, reduction="none")) + 0.001 * torch.norm(p) ** 2
    (g,) = torch.autograd.grad(inner, p, create_graph=True)
    w_mapped = p - 0.1 * g
    vs = torch.zeros_like(p)
    for _ in range(K):
        (vs,) = torch.autograd.grad(w_mapped, p, grad_outputs=vs, retain_graph=True)
        vs = vs + gow
    grads = torch.autograd.grad(w_mapped, params, grad_outputs=vs, allow_unused=True)
    return [v if h is None else h + v for h, v in zip(grads, goh)]


def test_perturbation_search_equals_backdoorbenchs_step_in_normalised_space():
    model, data, x, y = tiny_setup()
    std = torch.tensor(STD).view(1, 3, 1, 1)
    x_n = model.normalize(x)
    reference = backdoorbench_search(model.net, x_n, y, lr=10.0, passes=2)
    assert reference.abs().max() > 1e-3  # a step was taken
    ibau = IBAU(batch_size=len(y), delta_lr=10.0, inner_passes=2)
    delta, _ = ibau.find_perturbation(model, data, x[:1], data.generator())
    assert torch.allclose(delta, std * reference, rtol=1e-4, atol=1e-6)  # pixel delta = std * delta_n
    # The same values applied in pixel space (the earlier procedure) are another step.
    pixel = torch.zeros_like(reference, requires_grad=True)
    loss = -F.cross_entropy(model(x + pixel), y) + 0.001 * pixel.pow(2).sum()
    (grad,) = torch.autograd.grad(loss, pixel)
    first_n = backdoorbench_search(model.net, x_n, y, lr=10.0, passes=1)
    assert not torch.allclose(-10.0 * grad, std * first_n, rtol=1e-2)


def test_hypergradient_equals_backdoorbenchs_in_normalised_space():
    model, data, x, y = tiny_setup(1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    x_n = model.normalize(x)
    pert = backdoorbench_search(model.net, x_n, y, lr=10.0, passes=1)
    mask = torch.zeros(len(y), 1, 1, 1)
    mask[[1, 4, 9]] = 1.0
    params = [p for p in model.parameters() if p.requires_grad]
    reference = backdoorbench_hypergradient(model.net, params, x_n, y, pert, mask, K=5)
    ibau = IBAU(K=5, fp_lr=0.1, lmd=0.001)
    ours, _ = ibau.hypergradient(model, params, data, x, y, std * pert, mask)
    for a, b in zip(ours, reference):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert any(b.abs().sum() > 0 for b in reference)


def test_backdoorbench_portion_is_the_default():
    assert IBAU().portion == 0.01
