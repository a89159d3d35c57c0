"""SCALE-UP: input detection by scaled prediction consistency. Guo, Li, Chen, Wang, Wu and
Zhang, "SCALE-UP: An Efficient Black-box Input-level Backdoor Detection via Analyzing
Scaled Prediction Consistency", ICLR 2023 (arXiv:2302.03251). BackdoorBench has no
version; the paper's values (as backdoor-toolbox's SCALE_UP).

Idea: amplifying every pixel value of an input, x -> clip(n * x, 0, 1), destroys a clean
image's content, so the prediction soon changes; a poisoned input keeps its prediction
(the trigger, often saturated, survives amplification: scaled prediction invariance). The
scaled prediction consistency of x is SPC(x) = (1 / |N|) sum over n in N of
1[C(clip(n * x)) = C(x)], with C the model's label; higher = more suspicious. In the
data-limited setting (the defender holds a few clean images), SPC is standardised by the
mean and the standard deviation of the clean images' SPC, and inputs whose standardised
SPC reaches ``threshold`` are flagged.

Hyperparameters (the paper's):
    scales: the amplification factors N ({3, 5, 7, 9, 11})
    threshold: T, flag at SPC >= T (0.5), standardised SPC with ``standardize``
    standardize: standardise SPC with the clean subset's mean and standard deviation
        (True: the data-limited setting, the harness always gives a clean subset)
    batch_size: inputs scored at a time (256)

Deviations:
* The standardisation uses the clean subset's mean and standard deviation over all
  classes (as backdoor-toolbox's version); the standard deviation is floored at 1e-6.
* Amplification acts on the [0, 1] pixel values, before the model's normalisation (the
  project's convention; the paper amplifies the input image the same way).
"""

from __future__ import annotations

import utils.boot  # noqa: F401  (first, before torch: Ctrl-C while loading is one line)

import logging

import torch

from defense.base import Defense, DefenseData, Detection, InputDetector, main, register_defense
from utils import config as cfg
from utils.models import Classifier

log = logging.getLogger("saubench")


def _scales(value: list) -> str | None:
    return None if len(value) > 0 and all(v > 0 for v in value) else "must be a non-empty list of positive factors"


def scaled_consistency(model: Classifier, x: torch.Tensor, scales: list[float]) -> torch.Tensor:
    """SPC of each image of ``x`` (float [0, 1]): the fraction of ``scales`` n at which the
    model's label of clip(n * x, 0, 1) equals its label of x."""
    with torch.no_grad():
        label = model(x).argmax(1)
        same = [model((x * n).clamp(0.0, 1.0)).argmax(1) == label for n in scales]
    return torch.stack(same, 1).float().mean(1)


@register_defense("scaleup", aliases=("scale_up",))
class ScaleUp(Defense):
    """SCALE-UP: flag test inputs whose prediction survives pixel-value amplification.

    Args:
        scales: amplification factors n (x -> clip(n x, 0, 1))
        threshold: flag when the (standardised) scaled prediction consistency reaches this value
        standardize: standardise the consistency with the clean subset's mean and standard deviation
        batch_size: inputs scored at a time
    """

    kind = "input_detection"
    paper = (
        "Guo, Li, Chen, Wang, Wu and Zhang, SCALE-UP: An Efficient Black-box Input-level Backdoor Detection via "
        "Analyzing Scaled Prediction Consistency, ICLR 2023, arXiv:2302.03251"
    )
    year = 2023
    param_checks = {"scales": _scales, "batch_size": cfg.positive}

    def __init__(
        self,
        scales: list[float] = (3, 5, 7, 9, 11),
        threshold: float = 0.5,
        standardize: bool = True,
        batch_size: int = 256,
    ):
        self.scales, self.threshold, self.standardize, self.batch_size = (
            list(scales),
            threshold,
            standardize,
            batch_size,
        )

    def consistency(self, model: Classifier, x: torch.Tensor) -> torch.Tensor:
        parts = [
            scaled_consistency(model, x[i : i + self.batch_size], self.scales)
            for i in range(0, len(x), self.batch_size)
        ]
        return torch.cat(parts) if parts else torch.zeros(0, device=x.device)

    def fit(self, model: Classifier, data: DefenseData) -> InputDetector:
        model.eval()
        mean, std = 0.0, 1.0
        if self.standardize:
            clean = self.consistency(model, data.tensors()[0]).double()
            mean, std = float(clean.mean()), max(float(clean.std(unbiased=False)), 1e-6)
            log.info("SCALE-UP: clean subset's consistency %.4f +- %.4f (%d images)", mean, std, len(clean))
        # the clean subset's consistency statistics (None when not standardized)
        data.add_summary(
            clean_consistency_mean=mean if self.standardize else None,
            clean_consistency_std=std if self.standardize else None,
        )

        def detector(x: torch.Tensor) -> Detection:
            spc = (self.consistency(model, x).double() - mean) / std
            return Detection(spc.float(), spc >= self.threshold)

        return detector


if __name__ == "__main__":
    main("scaleup")
