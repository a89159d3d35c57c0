"""Frequency-domain trigger helpers shared by FTrojan and CTRL: the orthonormal 2-D DCT-II
on square blocks and the linear colour transforms (RGB to YCrCb as OpenCV, RGB to YUV as
kornia). Not an attack itself: it registers nothing.

Images are float N x C x H x W in [0, 1]; the colour transforms map [0, 1] RGB to [0, 1]
scaled colour channels (OpenCV's YCrCb with its offset of 128/255 on the chroma
channels; kornia's YUV has no offset), and the inverse transforms are the exact matrix
inverses, so a trigger added to the chroma channels leaves the luma unchanged up to
floating-point error (before clipping).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from utils.errors import UserError

# Rows: output channels; columns: R, G, B.
YCRCB = torch.tensor(
    [
        [0.299, 0.587, 0.114],  # Y
        [0.713 * 0.701, -0.713 * 0.587, -0.713 * 0.114],  # Cr = 0.713 (R - Y) + 128/255
        [-0.564 * 0.299, -0.564 * 0.587, 0.564 * 0.886],
    ],  # Cb = 0.564 (B - Y) + 128/255
    dtype=torch.float64,
)
YCRCB_OFFSET = torch.tensor([0.0, 128 / 255, 128 / 255], dtype=torch.float64)
YUV = torch.tensor(
    [
        [0.299, 0.587, 0.114],  # Y
        [-0.147, -0.289, 0.436],  # U
        [0.615, -0.515, -0.100],
    ],  # V
    dtype=torch.float64,
)
NO_OFFSET = torch.zeros(3, dtype=torch.float64)


def to_colour(x: torch.Tensor, matrix: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """RGB (N, 3, H, W) -> the colour space of ``matrix`` (rows are output channels), plus ``offset``."""
    m, o = matrix.to(x.device, x.dtype), offset.to(x.device, x.dtype)
    return torch.einsum("oc,nchw->nohw", m, x) + o[None, :, None, None]


def from_colour(y: torch.Tensor, matrix: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The exact inverse of :func:`to_colour`."""
    inverse = torch.linalg.inv(matrix).to(y.device, y.dtype)
    return torch.einsum("oc,nchw->nohw", inverse, y - offset.to(y.device, y.dtype)[None, :, None, None])


def dct_matrix(n: int, dtype: torch.dtype = torch.float64, device: torch.device | None = None) -> torch.Tensor:
    """The orthonormal DCT-II matrix D (n x n): D[k, i] = a_k cos(pi (2i + 1) k / 2n),
    a_0 = sqrt(1/n), a_k = sqrt(2/n); the 2-D DCT of a block X is D X D^T (as OpenCV's
    cv2.dct and torch-dct's dct_2d(norm="ortho"))."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    d[0] /= math.sqrt(2)
    return d.to(device=device, dtype=dtype)


def _blocks(x: torch.Tensor, window: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.reshape(n, c, h // window, window, w // window, window)


def block_dct(x: torch.Tensor, window: int) -> torch.Tensor:
    """The 2-D DCT of every ``window`` x ``window`` block of (N, C, H, W), in place of the block."""
    d = dct_matrix(window, x.dtype, x.device)
    return torch.einsum("ki,ncaibj,lj->ncakbl", d, _blocks(x, window), d).reshape(x.shape)


def block_idct(y: torch.Tensor, window: int) -> torch.Tensor:
    """The inverse of :func:`block_dct`."""
    d = dct_matrix(window, y.dtype, y.device)
    return torch.einsum("ki,ncakbl,lj->ncaibj", d, _blocks(y, window), d).reshape(y.shape)


def frequency_mask(
    shape: tuple[int, int, int],
    window: int,
    channels: Sequence[int],
    positions: Sequence[tuple[int, int]],
    magnitude: float,
) -> torch.Tensor:
    """The (C, H, W) block-DCT-domain trigger: ``magnitude`` at ``positions`` (row, column
    within each block) of every ``window`` x ``window`` block of ``channels``, zero elsewhere."""
    mask = torch.zeros(shape, dtype=torch.float64)
    for ch in channels:
        for row, col in positions:
            mask[ch, row::window, col::window] = magnitude
    return mask


def check_blocks(
    name: str,
    size: tuple[int, int],
    window: int,
    positions: Sequence[tuple[int, int]],
    channels: Sequence[int],
    num_channels: int,
) -> None:
    """UserError unless ``window`` tiles an image of ``size`` and every position and channel fits."""
    h, w = size
    if h % window or w % window:
        raise UserError(
            f"{name}: window_size {window} does not tile the {h}x{w} images; give a --window_size that "
            f"divides {h} and {w} (and --pos_list inside it)"
        )
    bad = [p for p in positions if not (0 <= p[0] < window and 0 <= p[1] < window)]
    if bad:
        raise UserError(
            f"{name}: trigger position {bad[0]} lies outside the {window}x{window} DCT block; give a "
            f"--pos_list of indices below {window}"
        )
    if num_channels == 3 and any(not 0 <= ch < 3 for ch in channels):
        raise UserError(
            f"{name}: channel {[ch for ch in channels if not 0 <= ch < 3][0]} is not a channel of the "
            "3-channel colour space (0, 1 or 2)"
        )
