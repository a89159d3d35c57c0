"""Activation Clustering (AC): data detection by clustering each class's activations.
Chen, Carvalho, Baracaldo, Ludwig, Edwards, Lee, Molloy and Srivastava, "Detecting
Backdoor Attacks on Deep Neural Networks by Activation Clustering", AAAI SafeAI workshop
2019 (arXiv:1811.03728, 2018); BackdoorBench's version (detection_pretrain/ac.py,
config/detection/ac/).

Idea: the network reaches the target label for poisoned samples for another reason (the
trigger) than for clean ones (the class's features), so within the samples labelled
with the target class, the penultimate activations split in two clusters, the smaller
one poisoned. For each class: centre the activations, reduce them to ``nb_dims``
dimensions with ICA, run 2-means, and flag the smaller cluster when its relative size is
below ``size_threshold`` (``cluster_analysis: smaller``, BackdoorBench's) or when the
clustering's silhouette score is above ``silhouette_threshold`` (``cluster_analysis:
silhouette``, the paper's second criterion).

The score (higher = more suspicious), so that every sample can be ranked: for sample i
of class c, (1 - s_c) * max(0, silhouette_c) * m_i, where s_c is the relative size of the
class's smaller cluster, silhouette_c how well the two clusters separate, and m_i =
d_big / (d_small + d_big) the sample's membership of the smaller cluster from its
distances to the two centroids (1 at the smaller cluster's centroid, 0 at the larger
one's). A class that splits cleanly into a small and a large cluster scores high, its
smaller cluster highest.

Hyperparameters (BackdoorBench's config/detection/ac/cifar10.yaml):
    nb_dims: ICA components (10)
    nb_clusters: clusters per class (2; the score reads the smallest and the largest)
    cluster_analysis: ``smaller`` (relative size) or ``silhouette`` (smaller)
    size_threshold: relative size below which the smaller cluster is flagged (0.35)
    silhouette_threshold: silhouette above which it is flagged with ``silhouette`` (0.15)
    layer: None for the penultimate activations (the input of the model's last linear
        layer, BackdoorBench's), or a module of the architecture whose output is used (None)
    batch_size: samples per forward pass for the activations (256)

Deviations:
* KMeans runs 10 initialisations seeded by the run's seed (BackdoorBench: sklearn's
  default, unseeded); FastICA is seeded by the run's seed (BackdoorBench: its
  random_seed), with at most ``n_c - 1`` components for a class of n_c samples.
* The silhouette score is computed on at most 5000 samples of a class (drawn with the
  run's seed): exact below that.
* The score above is this project's (BackdoorBench and the paper only flag).
"""

from __future__ import annotations

import utils.boot  # noqa: F401  (first, before torch: Ctrl-C while loading is one line)

import logging
import warnings
from typing import Literal

import numpy as np
import torch

from defense.base import Defense, Detection, TrainingData, main, register_defense
from utils import config as cfg
from utils.models import Classifier

log = logging.getLogger("saubench")


def _below_half(value: float) -> str | None:
    return None if 0.0 < value <= 0.5 else "must be in (0, 0.5]"


def _at_least_two(value: int) -> str | None:
    return None if value >= 2 else "must be >= 2"


def cluster_class(
    features: np.ndarray, nb_dims: int, nb_clusters: int, seed: int
) -> tuple[np.ndarray, float, float, np.ndarray]:
    """ICA to ``nb_dims`` and k-means of one class's activations (n, D): whether each
    sample is in the smallest cluster, that cluster's relative size, the silhouette score,
    and each sample's membership of the smallest cluster (vs the largest one), in [0, 1]."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import FastICA
    from sklearn.metrics import silhouette_score

    n = len(features)
    centred = features - features.mean(0, keepdims=True)
    dims = max(1, min(nb_dims, n - 1, centred.shape[1]))
    with warnings.catch_warnings():  # convergence warnings: the result is used as it is
        warnings.simplefilter("ignore")
        try:
            projected = FastICA(n_components=dims, whiten="unit-variance", random_state=seed).fit_transform(centred)
        except (ValueError, np.linalg.LinAlgError):  # a degenerate class (constant activations)
            projected = centred[:, :dims]
        kmeans = KMeans(n_clusters=min(nb_clusters, n), n_init=10, random_state=seed).fit(projected)
    labels = kmeans.labels_
    sizes = np.bincount(labels, minlength=kmeans.n_clusters)
    small, big = int(sizes.argmin()), int(sizes.argmax())
    in_small = labels == small
    if small == big or len(set(labels.tolist())) < 2:
        return np.zeros(n, dtype=bool), 0.5, 0.0, np.zeros(n)
    sample = min(n, 5000)
    silhouette = float(
        silhouette_score(projected, labels, sample_size=sample if sample < n else None, random_state=seed)
    )
    d_small = np.linalg.norm(projected - kmeans.cluster_centers_[small], axis=1)
    d_big = np.linalg.norm(projected - kmeans.cluster_centers_[big], axis=1)
    membership = d_big / np.maximum(d_small + d_big, 1e-12)
    return in_small, float(sizes[small] / n), silhouette, membership


@register_defense("ac")
class AC(Defense):
    """Activation Clustering: 2-means of each class's ICA-reduced activations; the smaller cluster is suspicious.

    Args:
        nb_dims: ICA components
        nb_clusters: clusters per class
        cluster_analysis: flag the smaller cluster by its relative size or by the silhouette score
        size_threshold: relative size below which the smaller cluster is flagged
        silhouette_threshold: silhouette score above which the smaller cluster is flagged (silhouette)
        layer: a module of the architecture whose output is the representation (None: the penultimate one)
        batch_size: samples per forward pass for the activations
    """

    kind = "data_detection"
    paper = (
        "Chen, Carvalho, Baracaldo, Ludwig, Edwards, Lee, Molloy and Srivastava, Detecting Backdoor Attacks on "
        "Deep Neural Networks by Activation Clustering, AAAI SafeAI 2019, arXiv:1811.03728"
    )
    year = 2018
    param_checks = {
        "nb_dims": cfg.positive,
        "nb_clusters": _at_least_two,
        "size_threshold": _below_half,
        "batch_size": cfg.positive,
    }

    def __init__(
        self,
        nb_dims: int = 10,
        nb_clusters: int = 2,
        cluster_analysis: Literal["smaller", "silhouette"] = "smaller",
        size_threshold: float = 0.35,
        silhouette_threshold: float = 0.15,
        layer: str | None = None,
        batch_size: int = 256,
    ):
        self.nb_dims, self.nb_clusters, self.cluster_analysis = nb_dims, nb_clusters, cluster_analysis
        self.size_threshold, self.silhouette_threshold = size_threshold, silhouette_threshold
        self.layer, self.batch_size = layer, batch_size

    def detect(self, model: Classifier, data: TrainingData) -> Detection:
        features = data.penultimate(model, self.batch_size, self.layer).double().numpy()
        scores = np.zeros(len(data))
        flagged = np.zeros(len(data), dtype=bool)
        classes: list[dict[str, float | int | bool]] = []
        for c, idx in data.class_indices(min_size=2):
            in_small, size, silhouette, membership = cluster_class(
                features[idx], self.nb_dims, self.nb_clusters, data.seed
            )
            suspicious = (
                size < self.size_threshold
                if self.cluster_analysis == "smaller"
                else silhouette > self.silhouette_threshold
            )
            if suspicious:
                flagged[idx[in_small]] = True
            scores[idx] = (1.0 - size) * max(0.0, silhouette) * membership
            classes.append(
                {
                    "class": c,
                    "samples": int(len(idx)),
                    "smaller_cluster": round(size, 4),
                    "silhouette": round(silhouette, 4),
                    "flagged": bool(suspicious),
                }
            )
            log.info(
                "class %d: %d samples, smaller cluster %.3f, silhouette %.3f%s",
                c,
                len(idx),
                size,
                silhouette,
                "  -> flagged" if suspicious else "",
            )
        data.add_summary(classes=classes)
        return Detection(torch.from_numpy(scores).float(), torch.from_numpy(flagged))


if __name__ == "__main__":
    main("ac")
