"""TeCo: input detection by corruption robustness consistency. Liu, Li, Wang, Hu, Ye, Jin,
Wu and Xiao, "Detecting Backdoors During the Inference Stage Based on Corruption
Robustness Consistency", CVPR 2023 (arXiv:2303.18191); BackdoorBench's version
(detection_infer/teco.py, config/detection/teco/).

Idea: a clean image resists every kind of corruption about equally well: its prediction
flips at similar severities for noise, blur or compression. A triggered image does not:
some corruptions destroy the trigger at once (noise on a small patch), others never do
(brightness keeps a bright patch), so the severity at which its prediction first changes
varies widely across corruption types. For each corruption type, the input is corrupted at
severities 1..5 and the first severity whose prediction differs from the uncorrupted one is
recorded (``max_severity`` + 1 when none does); the score is the standard deviation of
those severities across types (higher = more suspicious). The threshold is the (1 - frr)
quantile of the clean subset's scores.

Hyperparameters (BackdoorBench's detection_infer/teco.py):
    corruptions: corruption types (8 of BackdoorBench's 15, see defense/corruptions.py:
        gaussian_noise, shot_noise, impulse_noise, gaussian_blur, brightness, contrast,
        pixelate, jpeg_compression)
    max_severity: severities 1..max_severity are tried (5; a type that never flips counts
        max_severity + 1 = 6, BackdoorBench's ``max``)
    frr: false rejection rate on the clean subset that sets the threshold (0.1, as STRIP;
        TeCo reports AUROC only)
    batch_size: inputs scored at a time (256)

Deviations:
* The corruptions are this project's tensor versions with CIFAR-10-C's constants
  (defense/corruptions.py), not the ``imagecorruptions`` package's ImageNet-C ones; the
  seven of BackdoorBench's types that need neither image files nor a minimum image size
  (gaussian, shot and impulse noise, brightness, contrast, pixelate, JPEG) and Gaussian
  blur in place of defocus blur. Glass, motion and zoom blur, snow, frost, fog and the
  elastic transform are left out.
* Each severity corrupts the original image (BackdoorBench's loop writes each corrupted
  image back into its list, so its severity s is applied on top of severities 1..s-1).
* Noise is drawn from a generator seeded by the run's seed.
* The flagged set (the clean-quantile threshold) is this project's.
"""

from __future__ import annotations

import utils.boot  # noqa: F401  (first, before torch: Ctrl-C while loading is one line)

import logging

import torch

from defense.base import Defense, DefenseData, Detection, InputDetector, main, register_defense
from defense.corruptions import CORRUPTIONS, LEVELS, corrupt
from utils import config as cfg
from utils.models import Classifier

log = logging.getLogger("saubench")


def _known(value: list) -> str | None:
    unknown = [v for v in value if v not in CORRUPTIONS]
    if not value or unknown:
        return f"must be a non-empty list of {', '.join(CORRUPTIONS)}" + (f" (not {unknown[0]})" if unknown else "")
    return None


def _unit_interval(value: float) -> str | None:
    return None if 0.0 <= value < 1.0 else "must be in [0, 1)"


def flip_severity(predictions: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """The first severity (1-based) at which ``predictions`` (N, S: severities 1..S)
    differ from ``original`` (N,); S + 1 where none does."""
    changed = predictions != original[:, None]
    first = changed.float().argmax(1) + 1
    return torch.where(changed.any(1), first, torch.full_like(first, predictions.shape[1] + 1))


@register_defense("teco")
class TeCo(Defense):
    """TeCo: flag test inputs whose prediction flips at very different severities across corruption types.

    Args:
        corruptions: corruption types
        max_severity: severities 1..max_severity are tried
        frr: false rejection rate on the clean subset that sets the threshold
        batch_size: inputs scored at a time
    """

    kind = "input_detection"
    paper = (
        "Liu, Li, Wang, Hu, Ye, Jin, Wu and Xiao, Detecting Backdoors During the Inference Stage Based on "
        "Corruption Robustness Consistency, CVPR 2023, arXiv:2303.18191"
    )
    year = 2023
    param_checks = {
        "corruptions": _known,
        "max_severity": cfg.positive,
        "frr": _unit_interval,
        "batch_size": cfg.positive,
    }
    smoke_params = {"corruptions": ["gaussian_noise", "brightness"], "max_severity": 2}

    def __init__(
        self, corruptions: list[str] = CORRUPTIONS, max_severity: int = 5, frr: float = 0.1, batch_size: int = 256
    ):
        self.corruptions, self.max_severity, self.frr, self.batch_size = (
            list(corruptions),
            max_severity,
            frr,
            batch_size,
        )

    def severities(self, model: Classifier, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The flip severity of each image of ``x`` for each corruption type: (N, types)."""
        with torch.no_grad():
            original = model(x).argmax(1)
            out = []
            for name in self.corruptions:
                top = min(self.max_severity, len(LEVELS[name]))
                preds = torch.stack([model(corrupt(x, name, s, generator)).argmax(1) for s in range(1, top + 1)], 1)
                out.append(flip_severity(preds, original))
        return torch.stack(out, 1)

    def deviation(self, model: Classifier, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        parts = [
            self.severities(model, x[i : i + self.batch_size], generator).float().std(1, unbiased=False)
            for i in range(0, len(x), self.batch_size)
        ]
        return torch.cat(parts) if parts else torch.zeros(0, device=x.device)

    def fit(self, model: Classifier, data: DefenseData) -> InputDetector:
        model.eval()
        generator = data.generator(1)
        reference = self.deviation(model, data.tensors()[0], generator).sort().values.cpu()
        threshold = float(reference[min(int((1 - self.frr) * len(reference)), len(reference) - 1)])
        data.add_summary(deviation_threshold=threshold)
        log.info(
            "TeCo: deviation threshold %.4f (the %.0f%% quantile of %d clean images; %d corruption types)",
            threshold,
            100 * (1 - self.frr),
            len(reference),
            len(self.corruptions),
        )

        def detector(x: torch.Tensor) -> Detection:
            d = self.deviation(model, x, generator)
            return Detection(d, d > threshold)

        return detector


if __name__ == "__main__":
    main("teco")
