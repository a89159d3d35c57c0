"""SCAn: data detection by statistical contamination analysis. Tang, Wang, Tang and Zhang,
"Demon in the Variant: Statistical Analysis of DNNs for Robust Backdoor Contamination
Detection", USENIX Security 2021 (arXiv:1908.00686); BackdoorBench's version
(detection_pretrain/scan.py, config/detection/scan/).

Idea: a representation r of a sample of class k is modelled as r = mu_k + e, the identity
mu_k ~ N(0, S_u) shared by the class and the variation e ~ N(0, S_e) shared by all
classes. (1) From the defender's clean subset, EM estimates S_u and S_e (the global
model). (2) For every class of the training set (with the clean subset), the class is
split in two components with means u_1, u_2 and the shared variation S_e (an EM-like
alternation: each sample joins the component its linear discriminant under S_e prefers),
and the log-likelihood ratio of "two identities" against "one identity" is computed (the
test statistic). (3) The statistics are standardised across classes by their median and
median absolute deviation (the anomaly index J); a class whose J exceeds e^2 is
contaminated, and in it the component holding fewer of the clean subset's samples is
flagged.

The score of a training sample of class k (higher = more suspicious): max(J_k, 0) times
the posterior probability of the sample belonging to class k's suspicious component (the
two Gaussians with means u_1, u_2, covariance S_e and equal priors): the contaminated
class's poisoned component scores highest, samples of a clean class score little.

Hyperparameters (BackdoorBench's detection_pretrain/scan.py):
    threshold: J above which a class is contaminated (e^2 = 7.389, the paper's and BackdoorBench's)
    em_iters: most EM iterations of the global model and of each class's split (100)
    tol: convergence tolerance of both (1e-5)
    layer: the representation: None for the penultimate one, or a module of the
        architecture whose output is flattened (BackdoorBench: ``target_layer`` summed over
        its spatial positions; for cnn and preactresnet18 the penultimate representation
        is that sum divided by the number of positions) (None)
    batch_size: samples per forward pass for the representations (256)

Deviations:
* The clean samples are the defender's clean subset (``--ratio`` of the training set,
  none of them poisoned), not BackdoorBench's ``clean_sample_num`` samples of the clean
  test set (a defense never sees the test set).
* The one-identity hypothesis of the test uses the class's identity as the global model
  estimates it, mu = S_u (n S_u + S_e)^-1 sum(x) (the EM's E-step). BackdoorBench's (and
  the original code's) calc_test computes S_e (n S_u + S_e)^-1 sum(x), the E-step without
  its S_u S_e^-1 factor, which tests the class against the global mean rather than
  against one identity: on a synthetic mixture (tests/test_scan.py) a pure class far
  from the global mean then outscores a class holding two identities.
* The split of each class starts from a seeded random assignment (the run's seed;
  BackdoorBench: numpy's global state).
* The per-sample score above is this project's (BackdoorBench and the paper only flag).
"""

from __future__ import annotations

import utils.boot  # noqa: F401  (first, before torch: Ctrl-C while loading is one line)

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from defense.base import Defense, Detection, TrainingDataWithClean, main, register_defense
from utils import config as cfg
from utils.models import Classifier

log = logging.getLogger("saubench")


def _cov(x: np.ndarray) -> np.ndarray:
    """Covariance of the rows of ``x`` (unbiased, as numpy's cov of the transpose)."""
    centred = x - x.mean(0, keepdims=True)
    return centred.T @ centred / max(len(x) - 1, 1)


@dataclass
class GlobalModel:
    """S_u (covariance of the class identities) and S_e (covariance of the variations)."""

    s_u: np.ndarray
    s_e: np.ndarray
    iterations: int


def global_model(
    reprs: np.ndarray, labels: np.ndarray, num_classes: int, iters: int = 100, tol: float = 1e-5
) -> GlobalModel:
    """EM estimate of S_u and S_e from labelled (clean) representations (N, M): each
    step takes the posterior mean of every class's identity given its samples, then the
    covariances of the identities and of the residuals."""
    x = reprs - reprs.mean(0, keepdims=True)
    classes = [k for k in range(num_classes) if (labels == k).any()]
    sums = {k: x[labels == k].sum(0) for k in classes}
    counts = {k: int((labels == k).sum()) for k in classes}
    identity = np.zeros_like(x)
    for k in classes:
        identity[labels == k] = sums[k] / counts[k]
    s_u, s_e = _cov(identity), _cov(x - identity)
    step = 0
    for step in range(1, iters + 1):
        f = np.linalg.pinv(s_e)
        mean = {}
        for k in classes:  # E[mu_k | x] = S_u (n_k S_u + S_e)^-1 sum(x) (the paper's -S_e G_k sum(x))
            g = -np.linalg.pinv(counts[k] * s_u + s_e) @ s_u @ f
            mean[k] = -s_e @ g @ sums[k]
        for k in classes:
            identity[labels == k] = mean[k]
        new_u, new_e = _cov(identity), _cov(x - identity)
        change = np.linalg.norm(new_u - s_u) + np.linalg.norm(new_e - s_e)
        s_u, s_e = new_u, new_e
        if change <= tol:
            break
    return GlobalModel(s_u, s_e, step)


def split_class(
    x: np.ndarray, f: np.ndarray, rng: np.random.Generator, iters: int = 100, tol: float = 1e-5
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two components of one class's (centred) representations under the shared
    variation, F = S_e^-1: from a random assignment, each sample joins component 1 when
    its discriminant x F (u_1 - u_2) exceeds (u_1 F u_1 - u_2 F u_2) / 2. Returns the
    assignment (True: component 1) and the two means."""
    n = len(x)
    z = rng.random(n) >= 0.5
    if n == 1:
        return np.zeros(1, dtype=bool), x[0].copy(), x[0].copy()
    if z.all() or not z.any():
        z[0] = not z[0]
    u1, u2 = x[z].mean(0), x[~z].mean(0)
    for _ in range(iters):
        bias = u1 @ f @ u1 - u2 @ f @ u2
        new = bias - 2 * (x @ f @ (u1 - u2)) < 0
        if not new.any() or new.all():
            break
        settled = np.array_equal(new, z)
        z = new
        u1, u2 = x[z].mean(0), x[~z].mean(0)
        if settled:
            break
    return z, u1, u2


def split_statistic(
    x: np.ndarray, model: GlobalModel, f: np.ndarray, z: np.ndarray, u1: np.ndarray, u2: np.ndarray
) -> float:
    """The log-likelihood ratio (per sample, up to the factor -1/2 of the Gaussian's
    exponent) of the split (means u_1, u_2) against one identity (its posterior mean mu)
    for one class's representations ``x``."""
    n = len(x)
    mu = model.s_u @ np.linalg.pinv(n * model.s_u + model.s_e) @ x.sum(0)  # E[identity | x], as in global_model
    b1 = mu @ f @ mu - u1 @ f @ u1
    b2 = mu @ f @ mu - u2 @ f @ u2
    n1 = int(z.sum())
    statistic = n1 * b1 + (n - n1) * b2
    means = np.where(z[:, None], u1[None], u2[None])
    statistic -= 2 * float(np.einsum("ij,jk,ik->", x, f, mu[None] - means))
    return float(statistic / n)


def anomaly_index(values: np.ndarray) -> np.ndarray:
    """|a - median(a)| / (1.4826 MAD(a)) of a = values / max(values) (BackdoorBench's J)."""
    a = values / np.max(values)
    deviation = np.abs(a - np.median(a))
    return deviation / max(float(np.median(deviation)) * 1.4826, 1e-12)


@register_defense("scan")
class SCAn(Defense):
    """SCAn: a two-component decomposition of each class with a likelihood-ratio test; outlying classes are split.

    Args:
        threshold: anomaly index above which a class is contaminated
        em_iters: most iterations of the global EM and of each class's split
        tol: convergence tolerance
        layer: a module of the architecture whose output is the representation (None: the penultimate one)
        batch_size: samples per forward pass for the representations
    """

    kind = "data_detection"
    uses_clean_subset = True
    paper = (
        "Tang, Wang, Tang and Zhang, Demon in the Variant: Statistical Analysis of DNNs for Robust Backdoor "
        "Contamination Detection, USENIX Security 2021, arXiv:1908.00686"
    )
    year = 2021
    param_checks = {
        "threshold": cfg.positive,
        "em_iters": cfg.positive,
        "tol": cfg.positive,
        "batch_size": cfg.positive,
    }

    def __init__(
        self,
        threshold: float = math.exp(2),
        em_iters: int = 100,
        tol: float = 1e-5,
        layer: str | None = None,
        batch_size: int = 256,
    ):
        self.threshold, self.em_iters, self.tol, self.layer, self.batch_size = (
            threshold,
            em_iters,
            tol,
            layer,
            batch_size,
        )

    def detect(self, model: Classifier, data: TrainingDataWithClean) -> Detection:
        train = data.features(model, batch_size=self.batch_size, layer=self.layer).double().numpy()
        clean = data.features(model, data.clean.images, self.batch_size, self.layer).double().numpy()
        train_labels, clean_labels = data.labels.numpy(), data.clean.labels.numpy()
        gm = global_model(clean, clean_labels, data.num_classes, self.em_iters, self.tol)
        log.info("SCAn: global model from %d clean samples (%d EM iterations)", len(clean), gm.iterations)
        f = np.linalg.pinv(gm.s_e)
        everything = np.concatenate([train, clean])
        everything -= everything.mean(0, keepdims=True)
        labels = np.concatenate([train_labels, clean_labels])
        is_clean = np.arange(len(labels)) >= len(train)
        rng = np.random.default_rng(data.seed)
        statistics = np.zeros(data.num_classes)
        posterior = np.zeros(len(train))
        suspicious = {}
        for k in range(data.num_classes):
            idx = np.nonzero(labels == k)[0]
            if len(idx) < 2:
                continue
            x = everything[idx]
            z, u1, u2 = split_class(x, f, rng, self.em_iters, self.tol)
            statistics[k] = split_statistic(x, gm, f, z, u1, u2)
            # the component holding fewer clean samples is the suspicious one
            first = int(is_clean[idx][z].sum()) < int(is_clean[idx][~z].sum())
            us, uo = (u1, u2) if first else (u2, u1)
            discriminant = x @ f @ (us - uo) - (us @ f @ us - uo @ f @ uo) / 2
            in_train = ~is_clean[idx]
            posterior[idx[in_train]] = 1.0 / (1.0 + np.exp(-np.clip(discriminant[in_train], -500, 500)))
            suspicious[k] = idx[in_train][(z if first else ~z)[in_train]]
        j = anomaly_index(statistics) if np.max(statistics) > 0 else np.zeros(data.num_classes)
        flagged = np.zeros(len(train), dtype=bool)
        classes = []  # one row per class, in summary.json
        for k in range(data.num_classes):
            contaminated = bool(j[k] > self.threshold)
            if contaminated:
                flagged[suspicious.get(k, [])] = True
            classes.append(
                {
                    "class": k,
                    "statistic": round(float(statistics[k]), 4),
                    "anomaly_index": round(float(j[k]), 4),
                    "flagged": contaminated,
                }
            )
            log.info(
                "class %d: statistic %.4g, anomaly index %.3f%s",
                k,
                statistics[k],
                j[k],
                "  -> contaminated" if contaminated else "",
            )
        scores = np.maximum(j, 0.0)[train_labels] * posterior
        data.add_summary(classes=classes)
        return Detection(torch.from_numpy(scores).float(), torch.from_numpy(flagged))


if __name__ == "__main__":
    main("scan")
