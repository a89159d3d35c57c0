"""SPECTRE (defense/spectre.py): the QUE matrix by hand, QUE scores on synthetic data whose
outliers are known (they score on top; alpha moves the score from the norm to the top
direction), the robust filter dropping far outliers, and a class with a planted minority."""

from __future__ import annotations

import numpy as np
import pytest

from defense.spectre import SPECTRE, que_matrix, que_scores, robust_selection, spectre_class, whiten


def test_que_matrix_of_a_diagonal_covariance_by_hand():
    # S = diag(3, 1.5, 1): ||S|| - 1 = 2; Q ~ diag(exp(4 * (2, 0.5, 0) / 2)) = diag(e^4, e^1, 1), trace 1
    q = que_matrix(np.diag([3.0, 1.5, 1.0]), alpha=4.0)
    expected = np.array([np.exp(4.0), np.exp(1.0), 1.0])
    assert np.diag(q) == pytest.approx(expected / expected.sum())
    assert np.abs(q - np.diag(np.diag(q))).max() < 1e-12


def test_que_scores_put_the_planted_outliers_on_top_and_alpha_interpolates():
    rng = np.random.default_rng(0)
    clean = rng.normal(size=(500, 8))
    direction = np.eye(8)[2]
    poison = rng.normal(size=(25, 8)) * 0.2 + 5.0 * direction
    x = np.concatenate([clean, poison])
    white = whiten(x, np.arange(len(x)) < 500)  # whitened by the clean samples' covariance
    scores, statistic = que_scores(white, alpha=4.0)
    assert set(np.argsort(-scores)[:25]) == set(range(500, 525))
    assert statistic > 2.0  # the whitened covariance has a direction of variance well above 1
    # alpha -> 0: the squared norm / d; large alpha: the squared projection on the top direction
    flat, _ = que_scores(white, alpha=1e-6)
    assert flat == pytest.approx((white**2).sum(1) / 8, rel=1e-4)
    sharp, _ = que_scores(white, alpha=200.0)
    top = np.linalg.eigh(np.cov(white, rowvar=False))[1][:, -1]
    assert sharp == pytest.approx((white @ top) ** 2, rel=1e-2, abs=1e-3)


def test_the_robust_filter_removes_far_outliers_within_its_budget():
    rng = np.random.default_rng(1)
    # 3 samples so far out that their whitened norms pass C d log(n / tau) (the early filter)
    x = np.concatenate([rng.normal(size=(2000, 4)), rng.normal(size=(3, 4)) + 1000.0])
    kept = robust_selection(x, eps=3 / 2003, limit=6)
    assert not kept[2000:].any() and kept[:2000].sum() >= 1997
    assert (~robust_selection(x, eps=3 / 2003, limit=2)).sum() <= 2
    clean = rng.normal(size=(2000, 4))
    assert robust_selection(clean, eps=0.01, limit=40).all()  # a Gaussian sample passes as it is


def test_spectre_ranks_a_planted_minority_of_one_class_first():
    rng = np.random.default_rng(2)
    clean = rng.normal(size=(600, 20))
    poison = rng.normal(size=(40, 20)) * 0.3 + 4.0 * np.eye(20)[0]
    scores, _, dims = spectre_class(np.concatenate([clean, poison]), eps=40, max_dims=16)
    assert 1 <= dims <= 16
    top = set(np.argsort(-scores)[:40])
    assert len(top & set(range(600, 640))) >= 36


def test_class_eps_follows_backdoorbench():
    s = SPECTRE(percentile=0.01)
    assert s.class_eps(277, 1437) == 14  # min(14.37, 0.33 * 277 = 91, 0.1 * 277 = 28)
    assert s.class_eps(100, 10000) == 10  # capped at 0.1 n below 500 samples
    assert s.class_eps(5000, 50000) == 500
