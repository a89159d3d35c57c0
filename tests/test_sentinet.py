"""SentiNet (defense/sentinet.py): Grad-CAM on a tiny model against its closed form, and
the transplant of a trigger region against that of a clean region."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from defense.base import DefenseData
from defense.sentinet import SentiNet, grad_cam
from utils.datasets import DatasetInfo, ImageData


class Tiny(nn.Module):
    """features = W_f x (a 1x1 convolution, 2 -> 3 channels), logits = W_c mean_HW(features)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(2, 3, 1, bias=False)
        self.head = nn.Linear(3, 2, bias=False)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.features.weight.copy_(torch.randn(3, 2, 1, 1, generator=g))
            self.head.weight.copy_(torch.randn(2, 3, generator=g))

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def test_grad_cam_matches_its_closed_form_on_a_tiny_model():
    model = Tiny()
    x = torch.rand(4, 2, 5, 5, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 1, 0, 1])
    cam = grad_cam(model, model.features, x, target)
    # d logit_c / d A_k = W_c[c, k] / (H W) at every position, so alpha_k = W_c[c, k] / 25 and
    # the map is relu(sum_k W_c[c, k] A_k) / 25; the min-max scaling removes the 1/25
    acts = model.features(x).detach()
    raw = torch.relu(torch.einsum("nk,nkhw->nhw", model.head.weight.detach()[target], acts))
    low = raw.flatten(1).min(1).values.view(-1, 1, 1)
    expected = (raw - low) / ((raw - low).flatten(1).max(1).values.view(-1, 1, 1) + 1e-7)
    assert cam.shape == (4, 5, 5)
    assert torch.allclose(cam, expected, atol=1e-5)
    # default target: the predicted class
    assert torch.allclose(grad_cam(model, model.features, x), grad_cam(model, model.features, x, model(x).argmax(1)))


class Pixel(nn.Module):
    """Class 1 when the top-left pixel is bright (a one-pixel trigger), else class 0 or 2 by the
    brightness of the rest; its features are the image itself."""

    def __init__(self):
        super().__init__()
        self.features = nn.Identity()

    def forward(self, x):
        f = self.features(x * 1.0)  # a non-leaf tensor: Grad-CAM differentiates through it
        trigger = f[:, 0, 0, 0]
        rest = f[:, 0].flatten(1)[:, 1:].mean(1)
        return torch.stack([rest, 50 * (trigger - 0.9), 0.5 - rest], 1)


def test_a_transplanted_trigger_takes_over_every_clean_image():
    s = SentiNet(n_overlay=6)
    model = Pixel()
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(6, 1, 4, 4, generator=g) * 0.8  # no trigger
    inert = torch.rand(6, 1, 4, 4, generator=g)
    x = torch.full((2, 1, 4, 4), 0.3)
    x[0, 0, 0, 0] = 1.0  # triggered
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, 0, 0, 0] = 1.0  # the region: the trigger's pixel
    fooled, conf = s.transplant(model, x, mask, torch.tensor([1, 2]), clean, inert)
    assert fooled.tolist() == [1.0, 0.0]  # the clean region (label 2) never takes over: the rest decides
    assert conf[0].item() > 0.9 and conf[1].item() < 0.9


def test_the_detector_scores_the_fooled_fraction_and_flags_by_inert_confidence():
    info = DatasetInfo(name="toy", num_classes=3, channels=1, size=(4, 4), mean=(0.5,), std=(0.5,))
    clean = (torch.rand(10, 1, 4, 4, generator=torch.Generator().manual_seed(2)) * 0.8 * 255).to(torch.uint8)
    data = DefenseData(ImageData(clean, torch.zeros(10)), info, torch.device("cpu"))
    model = Pixel()
    model.spec = None
    model.feature_module = lambda: model.features
    detector = SentiNet(n_overlay=10, mask_threshold=0.5, conf_threshold=0.9).fit(model, data)
    x = torch.full((1, 1, 4, 4), 0.3)
    x[0, 0, 0, 0] = 1.0
    out = detector(x)
    assert out.scores.tolist() == pytest.approx([1.0]) and out.flagged.tolist() == [True]


def test_an_unknown_layer_is_one_user_error(record_root):
    import defense
    from utils.errors import UserError

    with pytest.raises(UserError, match="model 'cnn' has no layer 'nope'"):
        defense.run(
            "sentinet",
            result_file="badnet_digits",
            record_root=str(record_root),
            device="cpu",
            layer="nope",
            n_overlay=4,
        )
    with pytest.raises(UserError, match="model 'cnn' has no layer 'nope'"):
        defense.run("beatrix", result_file="badnet_digits", record_root=str(record_root), device="cpu", layer="nope")
