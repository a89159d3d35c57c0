"""i-BAU: the implicit hypergradient against its closed form on a quadratic problem, and
the universal perturbation search on the backdoored digits model."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from defense.ibau import IBAU, implicit_hypergradient, twice_differentiable


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
    ibau = IBAU(batch_size=50, delta_lr=1.0, delta_bound=1.5, inner_passes=2)
    delta, reached = ibau.find_perturbation(model, data, x[:1], data.generator())
    assert delta.shape == (1, *x.shape[1:])
    assert float(delta.norm()) <= 1.5 + 1e-5
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
    ibau = IBAU(epochs=1, batch_size=50, lr=1e-3, delta_lr=1.0, delta_bound=1.5)
    torch.manual_seed(0)
    delta, _ = ibau.find_perturbation(model, data, x[:1], data.generator(5))
    with torch.no_grad():
        before = F.cross_entropy(model(x + delta), y)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for step in range(3):
        ibau.outer_step(model, params, optimizer, scaler, data, x, y, delta, torch.ones(len(y), 1, 1, 1), 0, step)
    with torch.no_grad():
        after = F.cross_entropy(model(x + delta), y)
    assert after < 0.8 * before


def test_hard_activations_are_differentiated_twice_and_restored():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.Hardswish(), nn.Linear(6, 6), nn.Hardsigmoid(),
                          nn.Linear(6, 3))
    x, y = torch.randn(5, 4) * 3, torch.tensor([0, 1, 2, 0, 1])
    params = list(model.parameters())

    def hypergradient():
        def fp_map(d, _):
            (g,) = torch.autograd.grad(-F.cross_entropy(model(x + d), y), d, create_graph=True)
            return d - 0.1 * g
        return implicit_hypergradient(torch.zeros(1, 4), params, fp_map,
                                      lambda d, _: F.cross_entropy(model(x + d), y), K=3)

    with torch.no_grad():
        reference = model(x)
    with twice_differentiable(model):
        with torch.no_grad():
            assert torch.allclose(model(x), reference)  # the same function
        grads = hypergradient()
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert "forward" not in vars(model[2]) and "forward" not in vars(model[4])  # restored
