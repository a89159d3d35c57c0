"""Spectral Signatures: data detection by the top singular direction of each class's
representations. Tran, Li and Madry, "Spectral Signatures in Backdoor Attacks", NeurIPS
2018 (arXiv:1811.00636); BackdoorBench's version (detection_pretrain/spectral.py,
config/detection/spectral/).

Idea: within the samples labelled with one class, poisoned samples leave a trace in the
learned representation that is strong enough to dominate the spectrum of its covariance.
For each class, the penultimate-layer representations are centred and the score of a
sample is its squared projection on the top right singular vector (higher = more
suspicious). In each class the ``1.5 * expected_rate`` share of samples with the highest
scores is flagged (the paper removes 1.5 times the expected number of poisoned samples).

Hyperparameters:
    expected_rate: the poison rate the defender expects, epsilon (0.1: BackdoorBench's
        ``percentile: 85`` flags the top 15% of each class, 1.5 x 0.1)
    removal_factor: how many times the expected share is flagged in each class (1.5, the paper)
    layer: the representation: None, the penultimate one (the input of the model's last
        linear layer; BackdoorBench's choice), or a module of the architecture (e.g.
        layer2 of cnn), whose output is flattened (BackdoorBench's target_layer) (None)
    batch_size: samples per forward pass when the representations are computed (256)

Deviations:
* BackdoorBench projects the uncentred representations on the singular vector
  (``corrs = eigs @ full_cov.T``) and takes the norm; here the centred ones, squared,
  as the paper.
* BackdoorBench flags strictly above the 85th percentile of each class; here the top
  ``round(1.5 * expected_rate * n_c)`` samples of each class of n_c samples.
* Every class is examined (as BackdoorBench when no target label is given); a class with
  fewer than two samples scores 0.
"""

from __future__ import annotations

import utils.boot  # noqa: F401  (first, before torch: Ctrl-C while loading is one line)

import logging

import torch

from defense.base import Defense, Detection, TrainingData, main, register_defense
from utils import config as cfg
from utils.models import Classifier

log = logging.getLogger("saubench")


def _rate(value: float) -> str | None:
    return None if 0.0 < value < 1.0 else "must be in (0, 1)"


def spectral_scores(features: torch.Tensor) -> torch.Tensor:
    """Squared projection of each centred row of ``features`` (N, D) on the top right
    singular vector of the centred matrix."""
    centred = features.double() - features.double().mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return (centred @ vh[0]).pow(2).float()


@register_defense("spectral")
class Spectral(Defense):
    """Spectral Signatures: score training samples by their projection on their class's top singular direction.

    Args:
        expected_rate: the poison rate the defender expects (epsilon)
        removal_factor: flag this many times the expected share of each class
        layer: a module of the architecture whose output is the representation (None: the penultimate one)
        batch_size: samples per forward pass for the representations
    """

    kind = "data_detection"
    paper = "Tran, Li and Madry, Spectral Signatures in Backdoor Attacks, NeurIPS 2018, arXiv:1811.00636"
    year = 2018
    param_checks = {"expected_rate": _rate, "removal_factor": cfg.positive, "batch_size": cfg.positive}

    def __init__(
        self, expected_rate: float = 0.1, removal_factor: float = 1.5, layer: str | None = None, batch_size: int = 256
    ):
        self.expected_rate, self.removal_factor, self.batch_size = expected_rate, removal_factor, batch_size
        self.layer = layer

    def detect(self, model: Classifier, data: TrainingData) -> Detection:
        features = data.penultimate(model, self.batch_size, self.layer)
        labels = data.labels
        scores = torch.zeros(len(data))
        flagged = torch.zeros(len(data), dtype=torch.bool)
        for c in range(data.num_classes):
            idx = torch.nonzero(labels == c).flatten()
            if len(idx) < 2:
                continue
            s = spectral_scores(features[idx])
            scores[idx] = s
            count = min(len(idx), int(round(self.removal_factor * self.expected_rate * len(idx))))
            flagged[idx[s.argsort(descending=True)[:count]]] = True
            log.debug("class %d: %d samples, %d flagged, top score %.4g", c, len(idx), count, float(s.max()))
        log.info("spectral signatures: %d of %d training samples flagged", int(flagged.sum()), len(data))
        return Detection(scores, flagged)


if __name__ == "__main__":
    main("spectral")
