"""BppAttack: squeezed images hold only squeeze_num levels, Floyd-Steinberg error
diffusion matches a hand-computed example and the row-major loop, and each batch gets
backdoor and negative samples."""

from __future__ import annotations

import numpy as np
import torch

import attack
from attack.base import AttackContext
from attack.bpp import BPP, floyd_steinberg, squeeze
from utils.datasets import load_dataset
from utils.records import load_record


def test_output_has_the_squeezed_colour_depth():
    x = torch.rand(4, 3, 9, 7)
    for dithering in (True, False):
        out = BPP(squeeze_num=8, dithering=dithering).apply(x) * 7
        assert torch.allclose(out, out.round(), atol=1e-5) and out.min() >= 0 and out.max() <= 7
    assert (BPP(dithering=True).apply(x) != BPP(dithering=False).apply(x)).any()


def test_dithering_matches_a_hand_computed_3x3_example():
    # 0.4 everywhere, two levels (0 and 1). Row 0: 0.4 -> 0 (error 0.4, 7/16 of it makes the
    # next pixel 0.575 -> 1); (0, 2) is left at 0.214 -> 0; row 1: (1, 0) 0.445 -> 0, (1, 1)
    # 0.527 -> 1, (1, 2) 0.233 -> 0; row 2 likewise: 0.451 -> 0, 0.521 -> 1, 0.234 -> 0.
    x = torch.full((1, 1, 3, 3), 0.4, dtype=torch.float64)
    expected = torch.tensor([[0.0, 1.0, 0.0]] * 3, dtype=torch.float64)
    assert torch.equal(floyd_steinberg(x, 2)[0, 0], expected)
    assert torch.equal(squeeze(x, 2), torch.zeros_like(x))  # no dithering: every pixel to the nearest level


def row_major(image: np.ndarray, k: int) -> np.ndarray:
    """The textbook loop (BackdoorBench's floydDitherspeed on [0, 1] values, clipped levels)."""
    image = image.copy()
    _, h, w = image.shape
    for y in range(h):
        for x in range(w):
            old = image[:, y, x].copy()
            new = np.clip(np.round(old * (k - 1)), 0, k - 1) / (k - 1)
            image[:, y, x] = new
            err = old - new
            if x + 1 < w:
                image[:, y, x + 1] += err * 7 / 16
            if y + 1 < h and x + 1 < w:
                image[:, y + 1, x + 1] += err * 1 / 16
            if y + 1 < h:
                image[:, y + 1, x] += err * 5 / 16
            if y + 1 < h and x >= 1:
                image[:, y + 1, x - 1] += err * 3 / 16
    return image


def test_wavefront_dithering_equals_the_row_major_loop():
    gen = torch.Generator().manual_seed(0)
    for shape in ((5, 11), (8, 8), (1, 6), (6, 1)):
        x = torch.rand(3, 2, *shape, generator=gen, dtype=torch.float64)
        expected = np.stack([row_major(img.numpy(), 5) for img in x])
        assert np.array_equal(floyd_steinberg(x, 5).numpy(), expected)


def test_batch_hook_makes_backdoor_and_negative_samples():
    ctx = AttackContext(
        load_dataset("digits"), 0, "all2one", torch.device("cpu"), np.random.default_rng(0), {"pratio": 0.1}
    )
    bpp = BPP(squeeze_num=4, neg_ratio=0.1)
    bpp.prepare(ctx)
    x, y = torch.rand(50, 1, 8, 8), torch.randint(0, 10, (50,))
    out_x, out_y = bpp.batch_hook(ctx)(x, y)
    assert torch.equal(out_x[:5], bpp.apply(x[:5])) and torch.all(out_y[:5] == 0)  # 5 backdoor samples
    neg = out_x[5:10]  # 5 negative samples: x plus another image's squeezing residual, true labels
    assert torch.equal(out_y[5:], y[5:]) and not torch.allclose(neg, x[5:10])
    assert not torch.allclose(neg, bpp.apply(x[5:10]))
    assert torch.equal(out_x[10:], x[10:])


def test_digits_record_holds_squeezed_backdoor_images(tmp_path):
    attack.run("bpp", dataset="digits", epochs=1, device="cpu", record_root=str(tmp_path), save_folder_name="b")
    record = load_record(tmp_path / "b")
    k = record.attack_params["squeeze_num"]
    levels = torch.arange(k, dtype=torch.float64) * 255 / (k - 1)
    values = record.bd_test.images.unique().double()
    assert ((values[:, None] - levels[None]).abs().min(1).values <= 0.5).all()  # uint8 at rest: nearest integer
    assert record.bd_train is None and record.cross_test is not None
