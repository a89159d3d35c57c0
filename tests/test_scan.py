"""SCAn (defense/scan.py): the global model's EM on a synthetic mixture whose covariances
are known, the split and the likelihood-ratio test of a class holding two identities, the
anomaly index, and a run on the digits BadNets record."""

from __future__ import annotations

import numpy as np
import pytest

import defense
from defense.scan import anomaly_index, global_model, split_class, split_statistic


def _mixture(rng, classes=60, per_class=60, m=3):
    """r = mu_k + e with mu_k ~ N(0, S_u), e ~ N(0, S_e): the model SCAn assumes."""
    s_u = np.diag([4.0, 1.0, 0.25])
    a = rng.normal(size=(m, m))
    s_e = a @ a.T / m + 0.5 * np.eye(m)
    mu = rng.multivariate_normal(np.zeros(m), s_u, size=classes)
    labels = np.repeat(np.arange(classes), per_class)
    reprs = mu[labels] + rng.multivariate_normal(np.zeros(m), s_e, size=len(labels))
    return reprs, labels, s_u, s_e


def test_em_recovers_the_covariances_of_a_synthetic_mixture():
    reprs, labels, s_u, s_e = _mixture(np.random.default_rng(0))
    gm = global_model(reprs, labels, 60)
    assert gm.iterations >= 2
    assert np.linalg.norm(gm.s_e - s_e) / np.linalg.norm(s_e) < 0.08
    assert np.linalg.norm(gm.s_u - s_u) / np.linalg.norm(s_u) < 0.35  # 60 identities: a rough estimate
    # the EM's S_e is the within-class covariance, not the pooled one (which adds S_u)
    pooled = np.cov(reprs, rowvar=False)
    assert np.linalg.norm(gm.s_e - s_e) < 0.2 * np.linalg.norm(pooled - s_e)


def test_a_class_holding_two_identities_splits_and_stands_out():
    rng = np.random.default_rng(1)
    reprs, labels, _, s_e = _mixture(rng, classes=10, per_class=100)
    gm = global_model(reprs, labels, 10)
    f = np.linalg.pinv(gm.s_e)
    # class 0 gets 40 samples of another identity (a trigger's), 6 noise units away
    planted = np.array([6.0, 0.0, 0.0]) + rng.multivariate_normal(np.zeros(3), s_e, size=40)
    x = reprs - reprs.mean(0)
    statistics = []
    for k in range(10):
        cls = x[labels == k]
        if k == 0:
            cls = np.concatenate([cls, planted - reprs.mean(0)])
        z, u1, u2 = split_class(cls, f, np.random.default_rng(k))
        if k == 0:
            side = z[100:].mean() > 0.5
            assert (z[100:] == side).all() and (z[:100] != side).mean() > 0.95
        statistics.append(split_statistic(cls, gm, f, z, u1, u2))
    j = anomaly_index(np.array(statistics))
    assert j.argmax() == 0 and j[0] > np.exp(2) and (j[1:] < np.exp(2)).all()


def test_anomaly_index_by_hand():
    # a = v / 4 = (0.25, 0.5, 0.5, 1); median 0.5; |a - 0.5| = (0.25, 0, 0, 0.5), MAD 0.125
    j = anomaly_index(np.array([1.0, 2.0, 2.0, 4.0]))
    assert j == pytest.approx(np.array([0.25, 0.0, 0.0, 0.5]) / (0.125 * 1.4826))


def test_scan_finds_the_target_class_of_the_digits_badnets_record(record_root):
    summary = defense.run("scan", result_file="badnet_digits", record_root=str(record_root), device="cpu")
    flagged = [c["class"] for c in summary["classes"] if c["flagged"]]
    assert flagged == [0]  # BadNets' target class on digits
    assert summary["detection"]["auroc"] > 0.85 and summary["clean_samples"] == 287
