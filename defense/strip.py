"""STRIP: input detection by perturbation. Gao, Xu, Wang, Chen, Ranasinghe and Nepal,
"STRIP: A Defence Against Trojan Attacks on Deep Neural Networks", ACSAC 2019
(arXiv:1902.06531); BackdoorBench's version (detection_infer/strip.py).

Idea: superimpose a test input on N clean images and look at the entropy of the model's
predictions over those N blends. A clean input's content is destroyed by the overlay, so
the predictions scatter (high entropy); a triggered input keeps its trigger, which still
drives the prediction to the target class (low entropy). The score of an input is minus
its mean entropy (higher = more suspicious). The threshold comes from the defender's
clean subset alone: each clean image is scored the same way (overlaid on other clean
images) and inputs whose entropy falls below the ``frr`` quantile of those clean
entropies are flagged, so about ``frr`` of clean inputs are falsely rejected.

Hyperparameters (BackdoorBench's detection_infer/strip.py, as it calls STRIP):
    alpha: weight of the overlaid clean image, x + alpha * x_clean (1.0; the paper's
        cv2.addWeighted(x, 1, x_clean, 1, 0) is alpha 1 too)
    n_overlay: clean images overlaid on each input, N (100)
    frr: false rejection rate on clean inputs that sets the threshold (0.1; BackdoorBench's
        defense_fpr)
    batch_size: inputs scored at a time (128)

Deviations:
* The sum is taken in pixel space and clipped to [0, 1] (the paper's addWeighted on uint8
  saturates the same way); BackdoorBench adds normalised tensors without clipping.
* The overlays are drawn from the defender's clean subset with a generator seeded by the
  run's seed, a fresh draw for every batch of inputs (BackdoorBench: Python's global
  random, a fresh draw for every batch); the clean subset scored for the threshold is
  the whole subset (BackdoorBench: a class-balanced sample of the clean test set, which
  the harness never gives a defense).
"""

from __future__ import annotations

import utils.boot  # noqa: F401  (first, before torch: Ctrl-C while loading is one line)

import logging

import torch

from defense.base import Defense, DefenseData, Detection, InputDetector, main, register_defense
from utils import config as cfg
from utils.models import Classifier

log = logging.getLogger("saubench")


def _unit_interval(value: float) -> str | None:
    return None if 0.0 <= value < 1.0 else "must be in [0, 1)"


@register_defense("strip")
class STRIP(Defense):
    """STRIP: flag test inputs whose predictions stay confident when clean images are superimposed.

    Args:
        alpha: weight of the superimposed clean image (x + alpha * x_clean, clipped to [0, 1])
        n_overlay: clean images superimposed on each input
        frr: false rejection rate on the clean subset that sets the entropy threshold
        batch_size: inputs scored at a time
    """

    kind = "input_detection"
    paper = (
        "Gao, Xu, Wang, Chen, Ranasinghe and Nepal, STRIP: A Defence Against Trojan Attacks on Deep Neural "
        "Networks, ACSAC 2019, arXiv:1902.06531"
    )
    year = 2019
    param_checks = {"alpha": cfg.positive, "n_overlay": cfg.positive, "frr": _unit_interval, "batch_size": cfg.positive}
    smoke_params = {"n_overlay": 8}

    def __init__(self, alpha: float = 1.0, n_overlay: int = 100, frr: float = 0.1, batch_size: int = 128):
        self.alpha, self.n_overlay, self.frr, self.batch_size = alpha, n_overlay, frr, batch_size

    def entropy(self, model: Classifier, x: torch.Tensor, overlays: torch.Tensor) -> torch.Tensor:
        """Mean prediction entropy of each input of ``x`` over its blends with ``overlays``."""
        n, k = len(x), len(overlays)
        blends = (x.unsqueeze(1) + self.alpha * overlays.unsqueeze(0)).clamp_(0.0, 1.0).flatten(0, 1)
        with torch.no_grad():
            p = torch.softmax(model(blends).float(), dim=1) + 1e-8
        return (-p * p.log()).sum(1).view(n, k).mean(1)

    def fit(self, model: Classifier, data: DefenseData) -> InputDetector:
        clean, _ = data.tensors()
        generator = data.generator(1)
        count = min(self.n_overlay, len(clean))

        def draw() -> torch.Tensor:
            return clean[torch.randperm(len(clean), generator=generator)[:count].to(clean.device)]

        def entropies(x: torch.Tensor) -> torch.Tensor:
            return (
                torch.cat(
                    [self.entropy(model, x[i : i + self.batch_size], draw()) for i in range(0, len(x), self.batch_size)]
                )
                if len(x)
                else torch.zeros(0)
            )

        reference = entropies(clean).sort().values.cpu()
        threshold = float(reference[min(int(self.frr * len(reference)), len(reference) - 1)])
        data.add_summary(entropy_threshold=threshold)
        log.info(
            "STRIP: entropy threshold %.4f (the %.0f%% quantile of %d clean images, %d overlays each)",
            threshold,
            100 * self.frr,
            len(reference),
            count,
        )

        def detector(x: torch.Tensor) -> Detection:
            e = entropies(x)
            return Detection(-e, e < threshold)

        return detector


if __name__ == "__main__":
    main("strip")
