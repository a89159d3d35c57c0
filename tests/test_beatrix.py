"""Beatrix (defense/beatrix.py): the Gram features by hand, the median/MAD band and the
deviation by hand, the out-of-fold threshold, and a run on the digits BadNets record."""

from __future__ import annotations

import math

import pytest
import torch

import defense
from defense.beatrix import Beatrix, GramStatistics, gram_features, kernel_mmd


def test_gram_features_by_hand():
    # one sample, 2 channels at 2 positions: F = [[1, 2], [3, -4]], F F^T = [[5, -5], [-5, 25]]
    fmap = torch.tensor([[1.0, 2.0], [3.0, -4.0]]).view(1, 2, 1, 2)
    assert gram_features(fmap, 1).tolist() == [[5.0, -5.0, 25.0]]  # upper triangle, row by row
    assert gram_features(fmap, 2)[0].tolist() == pytest.approx([math.sqrt(5), -math.sqrt(5), 5.0])
    assert gram_features(fmap, 3)[0, 2].item() == pytest.approx(25 ** (1 / 3))
    # a channel's scale enters its row of the Gram matrix linearly (order 1)
    scaled = fmap.clone()
    scaled[:, 0] *= 2
    assert gram_features(scaled, 1).tolist() == [[20.0, -10.0, 25.0]]


def test_the_deviation_counts_only_what_leaves_the_band_relative_to_its_bound():
    # 1 channel at 1 position: the order-1 Gram feature is a^2; clean a^2 = 1, 4, 4, 4, 9: median 4, MAD 0
    # with mad_range 1 and MAD 0 the band is [4, 4]
    clean = torch.tensor([1.0, 2.0, 2.0, 2.0, 3.0]).view(5, 1, 1, 1)
    stats = GramStatistics(clean, [1.0], mad_range=1.0)
    probe = torch.tensor([2.0, 3.0, 1.0]).view(3, 1, 1, 1)  # a^2 = 4 (inside), 9 (above), 1 (below)
    deviation = stats.deviation(probe)
    assert deviation.tolist() == pytest.approx([0.0, (9 - 4) / 4, (4 - 1) / 4], rel=1e-5)


def test_the_threshold_is_the_clean_quantile_of_out_of_fold_deviations():
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(50, 3, 2, 2, generator=g) + 0.5
    b = Beatrix(orders=[1, 2], folds=5, quantile=0.95)
    threshold = b.threshold(clean)
    inside = GramStatistics(clean, [1, 2], 10.0).deviation(clean)
    assert threshold >= 0 and (inside <= threshold + 1e-12).all()  # in-sample points sit in their own band
    far = clean[:5] * 20.0
    assert (GramStatistics(clean, [1, 2], 10.0).deviation(far) > threshold).all()


def test_kernel_mmd_grows_with_the_shift():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(100, 4, generator=g), torch.randn(100, 4, generator=g)
    assert kernel_mmd(a, b) < kernel_mmd(a, b + 3.0)


def test_beatrix_names_the_target_class_of_the_digits_badnets_record(record_root):
    summary = defense.run("beatrix", result_file="badnet_digits", record_root=str(record_root), device="cpu")
    assert summary["config"]["layer"] == "layer2"  # digits.yaml
    assert [c["class"] for c in summary["classes"] if c["target"]] == [0]
    assert summary["detection"]["auroc"] > 0.85
