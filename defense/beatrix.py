"""Beatrix: data detection by Gram-matrix statistics of activations. Ma, Wang, Sun, Xue,
Hu, Fu, Fu, Li and Nepal, "The 'Beatrix' Resurrections: Robust Backdoor Detection via Gram
Matrices", NDSS 2023 (arXiv:2209.11715); BackdoorBench's version
(detection_pretrain/beatrix.py, config/detection/beatrix/).

Idea: a trigger changes not only which features fire but how they co-vary. For a feature
map F (C channels x P positions) of a sample, the Gram matrix F F^T (C x C) holds the
channels' correlations; its upper triangle, raised to the signed powers 1/p for
p = 1..8 (higher-order statistics), is the sample's Gram feature. For each class (the
model's predicted label), the defender's clean samples give the median and the median
absolute deviation (MAD) of every Gram feature; a sample's deviation is the sum, over
features and orders, of how far it falls outside [median - 10 MAD, median + 10 MAD],
relative to the bound, averaged over features and orders. The class's threshold is the
95th percentile of its clean samples' deviations, each computed out of fold (5 folds);
training samples above it are flagged. The target class is the one whose flagged and
unflagged samples differ most (kernel MMD of the pooled activations; anomaly index above
e^2), reported.

The score of a training sample (higher = more suspicious): its deviation divided by its
predicted class's threshold (1 = the class's 95th percentile of clean deviations).

Hyperparameters (BackdoorBench's detection_pretrain/beatrix.py):
    orders: the powers p of the Gram features (1, ..., 8)
    mad_range: the band median +- mad_range x MAD (10)
    folds: folds of the clean samples for the threshold (5)
    quantile: the clean deviations' quantile that is the threshold (0.95)
    layer: the module whose output is the feature map (None: the architecture's
        feature_layer, its last stage; BackdoorBench: the input of ``target_layer``)
    batch_size: samples per forward pass (256)

Deviations:
* The clean samples are the defender's clean subset (none of them poisoned), grouped by
  the model's predictions as BackdoorBench's; not ``clean_sample_num`` samples of the
  clean test set. A class with fewer than ``folds`` clean samples predicted scores 0.
* The Gram feature is the upper triangle with the diagonal, C (C + 1) / 2 values, and the
  deviation is averaged over them (BackdoorBench keeps the C x C matrix with zeros below
  the diagonal and divides by C^2 / 2).
* The folds are taken in the clean subset's order (BackdoorBench shuffles them first).
* The score above is this project's (BackdoorBench only flags).
"""

from __future__ import annotations

import utils.boot  # noqa: F401  (first, before torch: Ctrl-C while loading is one line)

import logging
import math

import numpy as np
import torch

from defense.base import Defense, Detection, TrainingDataWithClean, layer_module, main, register_defense
from utils import config as cfg
from utils.models import Classifier

log = logging.getLogger("saubench")


def _fraction(value: float) -> str | None:
    return None if 0.0 < value < 1.0 else "must be in (0, 1)"


def _at_least_two(value: int) -> str | None:
    return None if value >= 2 else "must be >= 2"


def gram_features(fmap: torch.Tensor, p: float) -> torch.Tensor:
    """The order-``p`` Gram feature of feature maps (N, C, H, W): the upper triangle (with
    the diagonal) of F F^T, F the C x HW map, raised to the signed power 1/p: (N, C (C + 1) / 2)."""
    f = fmap.flatten(2).double()
    gram = f @ f.transpose(1, 2)
    rows, cols = torch.triu_indices(gram.shape[1], gram.shape[2])
    upper = gram[:, rows, cols]
    return upper.sign() * upper.abs().pow(1.0 / p)


class GramStatistics:
    """Median and MAD band of every Gram feature of one class's clean feature maps, and
    the deviation of feature maps from it."""

    def __init__(self, fmaps: torch.Tensor, orders: list[float], mad_range: float):
        self.orders = orders
        self.bands = []
        for p in orders:
            g = gram_features(fmaps, p)
            median = g.median(0).values
            mad = (g - median).abs().median(0).values
            self.bands.append((median - mad_range * mad, median + mad_range * mad))

    def deviation(self, fmaps: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(len(fmaps), dtype=torch.float64)
        count = 1
        for p, (low, high) in zip(self.orders, self.bands):
            g = gram_features(fmaps, p)
            total += ((low - g).clamp(min=0) / (low + 1e-6).abs()).sum(1)
            total += ((g - high).clamp(min=0) / (high + 1e-6).abs()).sum(1)
            count = g.shape[1]
        return total / count / len(self.orders)


def kernel_mmd(a: torch.Tensor, b: torch.Tensor) -> float:
    """Kernel MMD between samples ``a`` (n, d) and ``b`` (m, d), Gaussian kernels of two
    bandwidths around the median squared distance, scaled by n m / (n + m) (BackdoorBench's)."""
    x = torch.cat([a, b]).double()
    d2 = torch.cdist(x, x).pow(2)
    bandwidth = d2.median() / 2.0
    kernel = sum(torch.exp(-d2 / max(float(bandwidth) * 2.0**i, 1e-12)) for i in range(2))
    n, m = len(a), len(b)
    value = kernel[:n, :n].mean() + kernel[n:, n:].mean() - 2 * kernel[:n, n:].mean()
    return float(value) * n * m / (n + m)


def feature_maps(
    model: Classifier, images: torch.Tensor, device: torch.device, layer: str | None, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The output of ``layer`` (default the architecture's feature layer) for uint8
    ``images``, on the CPU, and the model's predictions."""
    module = layer_module(model, layer)
    maps, preds = [], []
    hook = module.register_forward_hook(lambda m, i, out: maps.append(out.detach().float().cpu()))
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                x = images[start : start + batch_size].to(device).float().div_(255.0)
                preds.append(model.eval()(x).argmax(1).cpu())
    finally:
        hook.remove()
    return torch.cat(maps), torch.cat(preds)


@register_defense("beatrix")
class Beatrix(Defense):
    """Beatrix: deviation of Gram-matrix features from each class's clean median/MAD band.

    Args:
        orders: powers p of the Gram features
        mad_range: half-width of the band in MADs
        folds: folds of the clean samples for the threshold
        quantile: quantile of the clean deviations that is the threshold
        layer: module whose output is the feature map (None: the architecture's feature layer)
        batch_size: samples per forward pass
    """

    kind = "data_detection"
    uses_clean_subset = True
    paper = (
        'Ma, Wang, Sun, Xue, Hu, Fu, Fu, Li and Nepal, The "Beatrix" Resurrections: Robust Backdoor Detection '
        "via Gram Matrices, NDSS 2023, arXiv:2209.11715"
    )
    year = 2023
    smoke_params = {"orders": [1, 2]}
    param_checks = {
        "mad_range": cfg.positive,
        "folds": _at_least_two,
        "quantile": _fraction,
        "batch_size": cfg.positive,
    }

    def __init__(
        self,
        orders: list[float] = (1, 2, 3, 4, 5, 6, 7, 8),
        mad_range: float = 10.0,
        folds: int = 5,
        quantile: float = 0.95,
        layer: str | None = None,
        batch_size: int = 256,
    ):
        self.orders, self.mad_range, self.folds, self.quantile = list(orders), mad_range, folds, quantile
        self.layer, self.batch_size = layer, batch_size

    def threshold(self, clean: torch.Tensor) -> float:
        """The ``quantile`` of the clean maps' deviations, each from the band of the other folds."""
        parts = np.array_split(np.arange(len(clean)), self.folds)
        deviations = []
        for held in parts:
            rest = np.setdiff1d(np.arange(len(clean)), held)
            deviations.append(GramStatistics(clean[rest], self.orders, self.mad_range).deviation(clean[held]))
        ordered = torch.cat(deviations).sort().values
        return float(ordered[min(int(len(ordered) * self.quantile), len(ordered) - 1)])

    def detect(self, model: Classifier, data: TrainingDataWithClean) -> Detection:
        train_maps, train_pred = feature_maps(model, data.train.images, data.device, self.layer, self.batch_size)
        clean_maps, clean_pred = feature_maps(model, data.clean.images, data.device, self.layer, self.batch_size)
        scores = torch.zeros(len(data), dtype=torch.float64)
        flagged = torch.zeros(len(data), dtype=torch.bool)
        mmd = np.zeros(data.num_classes)
        classes = []  # one row per class examined, in summary.json
        for c in range(data.num_classes):
            clean = clean_maps[clean_pred == c]
            idx = torch.nonzero(train_pred == c).flatten()
            if len(clean) < self.folds or len(idx) == 0:
                log.info(
                    "class %d: %d clean samples predicted, too few for %d folds: not examined",
                    c,
                    len(clean),
                    self.folds,
                )
                continue
            threshold = max(self.threshold(clean), 1e-12)
            deviation = GramStatistics(clean, self.orders, self.mad_range).deviation(train_maps[idx])
            out = deviation > threshold
            scores[idx] = deviation / threshold
            flagged[idx[out]] = True
            pooled = train_maps[idx].mean((2, 3))
            mmd[c] = kernel_mmd(pooled[~out][:500], pooled[out][:500]) if out.any() and (~out).any() else 0.0
            classes.append(
                {
                    "class": c,
                    "clean": int(len(clean)),
                    "samples": int(len(idx)),
                    "threshold": threshold,
                    "flagged": int(out.sum()),
                    "kmmd": mmd[c],
                }
            )
        median = np.median(mmd)
        index = np.abs(mmd - median) / 1.4826 / (np.median(np.abs(mmd - median)) + 1e-6)
        for row in classes:
            row["anomaly_index"] = float(index[row["class"]])
            row["target"] = bool(index[row["class"]] > math.exp(2))
            log.info(
                "class %d: %d clean, %d samples, threshold %.4g, %d flagged, KMMD %.4g, anomaly index %.2f%s",
                row["class"],
                row["clean"],
                row["samples"],
                row["threshold"],
                row["flagged"],
                row["kmmd"],
                row["anomaly_index"],
                "  -> target" if row["target"] else "",
            )
        data.add_summary(classes=classes)
        return Detection(scores.float(), flagged)


if __name__ == "__main__":
    main("beatrix")
