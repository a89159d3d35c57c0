"""The benchmark's metrics, one definition each, used by attacks and defenses alike.

* C-Acc (``clean_acc``): accuracy on the clean test set.
* ASR (``asr``): share of the backdoor test set classified as the attacker's label.
* RA (``ra``): share of the backdoor test set classified as its true label.
* DER: (max(0, ASR_before - ASR_after) - max(0, ACC_before - ACC_after) + 1) / 2.

Detection (data- and input-detection defenses; positives are the poisoned samples, scores
are "higher = more suspicious"), :func:`detection_metrics`:

* AUROC: the probability that a random poisoned sample scores above a random clean one,
  ties counting one half (rank-based; sklearn's ``roc_auc_score``).
* TPR@5%FPR: the largest TPR of an ROC point whose FPR is at most 5%.
* TPR, FPR, precision, recall, F1 of the method's own flagged set.
* :func:`detection_info_csv`: these numbers under BackdoorBench's ``detection_info.csv``
  column names (its detection_pretrain/*.py and detection_infer/*.py), ours after them.
* ROC: the curve's (FPR, TPR) points, at most :data:`ROC_POINTS` of them (:func:`roc_points`),
  for plots; their trapezoid area is the AUROC when the curve has no more points than that.
"""

from __future__ import annotations

import math
from typing import Any
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from utils.datasets import ImageData
from utils.poison import PoisonedSet


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return int((logits.argmax(1) == labels).sum()) / len(labels) if len(labels) else float("nan")


def mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float(F.cross_entropy(logits, labels)) if len(labels) else float("nan")


def der(asr_before: float, asr_after: float, acc_before: float, acc_after: float) -> float | None:
    """Defense effectiveness rating (BackdoorBench), in [0, 1]; None without a backdoor test set."""
    if math.isnan(asr_before) or math.isnan(asr_after):
        return None
    return (max(0.0, asr_before - asr_after) - max(0.0, acc_before - acc_after) + 1.0) / 2.0


def closing_text(
    after: dict[str, float | None], before: dict[str, float | None] | None = None, der_value: float | None = None
) -> str:
    """The numbers of a run's closing line, from its summary's headlines (C-Acc, ASR,
    RA as fractions; None: undefined): ``C-Acc 0.9500 -> 0.9400  ...  DER 0.9700`` with
    ``before``, ``C-Acc 0.9500  ASR ...`` without."""
    parts = []
    for key, label in (("clean_acc", "C-Acc"), ("asr", "ASR"), ("ra", "RA")):
        shown = _number(after.get(key))
        parts.append(f"{label} {shown}" if before is None else f"{label} {_number(before.get(key))} -> {shown}")
    if before is not None:
        parts.append(f"DER {_number(der_value)}")
    return "  ".join(parts)


def detection_text(metrics: dict[str, Any]) -> str:
    """The numbers of a detector's closing line, from its summary's ``detection``:
    AUROC, TPR at 5% FPR and the F1 of the flagged set (n/a when it flags none)."""
    return "  ".join(
        f"{label} {_number(metrics.get(key))}"
        for key, label in (("auroc", "AUROC"), ("tpr_at_5fpr", "TPR@5%FPR"), ("f1", "F1"))
    )


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


# BackdoorBench's metric columns of a <defense>_df.csv (after "epoch"), in its order.
COLUMNS = (
    "clean_test_loss_avg_over_batch",
    "bd_test_loss_avg_over_batch",
    "ra_test_loss_avg_over_batch",
    "test_acc",
    "test_asr",
    "test_ra",
)


@dataclass
class Metrics:
    clean_acc: float
    asr: float
    ra: float
    clean_loss: float
    bd_loss: float
    ra_loss: float

    def as_row(self) -> dict[str, float]:
        """BackdoorBench's column names (:data:`COLUMNS`)."""
        return dict(zip(COLUMNS, (self.clean_loss, self.bd_loss, self.ra_loss, self.clean_acc, self.asr, self.ra)))

    def headline(self) -> dict[str, float | None]:
        """C-Acc, ASR and RA as fractions; None where undefined (no backdoor test set)."""
        return {
            k: None if math.isnan(v) else v
            for k, v in {"clean_acc": self.clean_acc, "asr": self.asr, "ra": self.ra}.items()
        }

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def eval_batch_size(device: torch.device) -> int:
    """Evaluation's batch size: 1024 on CUDA; 256 on the CPU, where larger batches measured
    slower (cnn on Fashion-MNIST's shape: 4096 images in 7.6 s at 256, 10.0 s at 1024)."""
    return 1024 if device.type == "cuda" else 256


def logits_fp32(
    model: nn.Module, images: torch.Tensor, *, device: torch.device, batch_size: int | None = None
) -> torch.Tensor:
    """Logits (float32, on the CPU) of every image, in order, in one pass: in
    ``torch.inference_mode`` and float32 whatever autocast the caller runs under (metrics
    are never computed in reduced precision); the model's mode is kept. ``batch_size``
    defaults to :func:`eval_batch_size`."""
    batch_size = batch_size or eval_batch_size(device)
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.inference_mode(), torch.autocast(device.type, enabled=False):
            for start in range(0, len(images), batch_size):
                x = images[start : start + batch_size].to(device, non_blocking=True)
                x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
                out.append(model(x).float())
    finally:
        model.train(was_training)
    return torch.cat(out).cpu() if out else torch.zeros(0)


def evaluate(
    model: nn.Module,
    clean_test: ImageData,
    bd_test: PoisonedSet,
    *,
    device: torch.device,
    batch_size: int | None = None,
    amp: bool | None = None,
) -> Metrics:
    """C-Acc, ASR, RA and their losses: one float32 forward pass of each clean test image
    and of each backdoor test image, whose logits give both ASR (against the attacker's
    labels) and RA (against the true labels). ``amp`` is accepted and ignored: evaluation
    never runs under autocast."""
    del amp  # metrics are float32 always
    clean = logits_fp32(model, clean_test.images, device=device, batch_size=batch_size)
    bd = logits_fp32(model, bd_test.images, device=device, batch_size=batch_size)
    return Metrics(
        clean_acc=accuracy(clean, clean_test.labels),
        asr=accuracy(bd, bd_test.labels),
        ra=accuracy(bd, bd_test.original_labels),
        clean_loss=mean_loss(clean, clean_test.labels),
        bd_loss=mean_loss(bd, bd_test.labels),
        ra_loss=mean_loss(bd, bd_test.original_labels),
    )


# -- detection --------------------------------------------------------------------------------------


def _detection_inputs(scores: torch.Tensor, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    s = torch.as_tensor(scores).detach().double().cpu().flatten().numpy()
    y = torch.as_tensor(labels).detach().bool().cpu().flatten().numpy()
    if s.shape != y.shape:
        raise ValueError(f"{len(s)} scores for {len(y)} labels")
    if not np.isfinite(s).all():
        raise ValueError("the scores hold NaN or infinity")
    return s, y


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` (higher = positive) against 0/1 ``labels``,
    ties counting one half; NaN when only one class is present."""
    from sklearn.metrics import roc_auc_score

    s, y = _detection_inputs(scores, labels)
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, s))


def tpr_at_fpr(scores: torch.Tensor, labels: torch.Tensor, fpr: float = 0.05) -> float:
    """The largest true-positive rate over the thresholds whose false-positive rate is at
    most ``fpr`` (a sample is flagged when its score is at least the threshold); NaN
    when only one class is present."""
    from sklearn.metrics import roc_curve

    s, y = _detection_inputs(scores, labels)
    if y.all() or not y.any():
        return float("nan")
    fprs, tprs, _ = roc_curve(y, s, drop_intermediate=False)
    return float(tprs[fprs <= fpr + 1e-12].max())


ROC_POINTS = 101  # the most (FPR, TPR) points a summary keeps of a ROC curve


def roc_points(
    scores: torch.Tensor, labels: torch.Tensor, max_points: int = ROC_POINTS
) -> dict[str, list[float]] | None:
    """The ROC curve of ``scores`` against 0/1 ``labels`` as ``{"fpr": [...], "tpr": [...]}``:
    from (0, 0) to (1, 1), both coordinates non-decreasing, tied scores one diagonal step
    (so the trapezoid area is :func:`auroc`), collinear points dropped. A longer curve is
    thinned to at most ``max_points`` points spread evenly along FPR + TPR (which grows
    from 0 to 2 along the curve), keeping both ends; None when only one class is present."""
    from sklearn.metrics import roc_curve

    s, y = _detection_inputs(scores, labels)
    if y.all() or not y.any():
        return None
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=True)
    if len(fpr) > max_points:
        keep = np.searchsorted(fpr + tpr, np.linspace(0.0, 2.0, max_points))
        keep = np.unique(np.concatenate([[0], np.clip(keep, 0, len(fpr) - 1), [len(fpr) - 1]]))
        fpr, tpr = fpr[keep], tpr[keep]
    return {"fpr": [float(v) for v in fpr], "tpr": [float(v) for v in tpr]}


def flagged_metrics(flagged: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """TPR (= recall), FPR, precision and F1 of a flagged set against 0/1 ``labels``, with
    the counts; NaN where a ratio has no denominator."""
    f = torch.as_tensor(flagged).bool().cpu().flatten()
    y = torch.as_tensor(labels).bool().cpu().flatten()
    if f.shape != y.shape:
        raise ValueError(f"{len(f)} flags for {len(y)} labels")
    tp, fp = int((f & y).sum()), int((f & ~y).sum())
    fn, tn = int((~f & y).sum()), int((~f & ~y).sum())

    def ratio(a: int, b: int) -> float:
        return a / b if b else float("nan")

    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    return {
        "tpr": recall,
        "fpr": ratio(fp, fp + tn),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
    }


def detection_metrics(
    scores: torch.Tensor, labels: torch.Tensor, flagged: torch.Tensor | None = None
) -> dict[str, Any]:
    """Every detection metric, once: ``auroc``, ``tpr_at_5fpr`` (at ``at_fpr``), the
    positives and negatives counted, the ROC curve's points (``roc``, :func:`roc_points`)
    and, when the method flags a set, that set's ``tpr``, ``fpr``, ``precision``,
    ``recall``, ``f1`` and counts (``flagged``). None stands for an undefined value (one
    class only, an empty denominator)."""
    y = torch.as_tensor(labels).bool().cpu().flatten()
    out: dict[str, Any] = {
        "auroc": auroc(scores, y),
        "tpr_at_5fpr": tpr_at_fpr(scores, y, 0.05),
        "positives": int(y.sum()),
        "negatives": int((~y).sum()),
        "roc": roc_points(scores, y),
    }
    if flagged is not None:
        out.update(flagged_metrics(flagged, y))
        out["flagged"] = int(torch.as_tensor(flagged).bool().sum())
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in out.items()}


# BackdoorBench's detection_info.csv columns (detection_pretrain/*.py, detection_infer/*.py; 'AUC' as in its
# strip.py and cd.py), then what BackdoorBench's file has no column for, under our names. Its ac.py's
# 'weight_F_score' (F1 with false negatives weighted 9 times) is not written: no metric of ours is it.
BACKDOORBENCH_DETECTION_COLUMNS = ("record", "TN", "FP", "FN", "TP", "TPR", "FPR", "AUC", "target")
DETECTION_EXTRA_COLUMNS = ("precision", "F1", "TPR_at_5FPR", "positives", "negatives")


def detection_info_csv(record: str, metrics: dict[str, Any]) -> str:
    """A detector run's numbers (``metrics``: :func:`detection_metrics`) as one row under
    BackdoorBench's ``detection_info.csv`` header, then :data:`DETECTION_EXTRA_COLUMNS`.
    Rates are fractions, as BackdoorBench writes them; an undefined value (no flagged set,
    one class only) is an empty cell, where BackdoorBench writes 0; ``target`` is "None"
    (BackdoorBench's value where a detector names no target class; ours name none)."""
    import csv
    import io

    values = {
        "record": record,
        "TN": metrics.get("tn"),
        "FP": metrics.get("fp"),
        "FN": metrics.get("fn"),
        "TP": metrics.get("tp"),
        "TPR": metrics.get("tpr"),
        "FPR": metrics.get("fpr"),
        "AUC": metrics.get("auroc"),
        "target": "None",
        "precision": metrics.get("precision"),
        "F1": metrics.get("f1"),
        "TPR_at_5FPR": metrics.get("tpr_at_5fpr"),
        "positives": metrics.get("positives"),
        "negatives": metrics.get("negatives"),
    }
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    columns = (*BACKDOORBENCH_DETECTION_COLUMNS, *DETECTION_EXTRA_COLUMNS)
    writer.writerow(columns)
    writer.writerow(["" if values[c] is None else values[c] for c in columns])
    return buf.getvalue()
