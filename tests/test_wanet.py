"""WaNet: the warp is the identity at s = 0, the backdoor test set is reproduced exactly
from the saved field, and each batch gets backdoor and noise-mode samples."""

from __future__ import annotations

import numpy as np
import torch

import attack
from attack.base import AttackContext
from attack.wanet import WaNet, random_field, warp, warping_grid
from utils.datasets import load_dataset
from utils.poison import to_uint8
from utils.records import load_record


def test_warp_is_the_identity_at_zero_strength():
    noise = random_field(4, 8, 8, torch.Generator().manual_seed(0))
    x = torch.rand(3, 2, 8, 8)
    assert torch.allclose(warp(x, warping_grid(noise, s=0.0)), x, atol=1e-6)
    assert (warp(x, warping_grid(noise, s=0.5)) - x).abs().max() > 0.01
    assert noise.shape == (1, 8, 8, 2) and torch.isclose(
        random_field(4, 4, 4, torch.Generator()).abs().mean(), torch.tensor(1.0), atol=0.05
    )  # k = size: no upsampling


def test_bd_test_set_is_reproduced_from_the_saved_field(tmp_path):
    attack.run("wanet", dataset="digits", epochs=1, device="cpu", record_root=str(tmp_path), save_folder_name="w")
    record, data = load_record(tmp_path / "w"), load_dataset("digits")
    noise, grid = record.extras["noise_grid"], record.extras["grid"]
    params = record.attack_params
    assert torch.equal(grid, warping_grid(noise, params["s"], params["grid_rescale"]))
    clean = data.test.images[record.bd_test.indices].float() / 255
    assert torch.equal(to_uint8(warp(clean, grid)), record.bd_test.images)
    cross = record.cross_test.images[record.bd_test.indices]
    assert (cross != record.bd_test.images).flatten(1).any(1).float().mean() > 0.5  # noise mode differs


def test_batch_hook_makes_backdoor_and_noise_mode_samples_with_all2all_labels():
    ctx = AttackContext(
        load_dataset("digits"), 0, "all2all", torch.device("cpu"), np.random.default_rng(0), {"pratio": 0.1}
    )
    wanet = WaNet()
    wanet.prepare(ctx)
    hook = wanet.batch_hook(ctx)
    x, y = torch.rand(50, 1, 8, 8), torch.randint(0, 10, (50,))
    out_x, out_y = hook(x, y)
    assert torch.equal(out_y[:5], (y[:5] + 1) % 10) and torch.equal(out_y[5:], y[5:])  # 5 backdoor samples
    assert torch.equal(out_x[:5], wanet.apply(x[:5]))
    noisy = out_x[5:15]  # cross_ratio 2: 10 noise-mode samples, true labels
    assert not torch.allclose(noisy, wanet.apply(x[5:15]), atol=1e-4) and not torch.allclose(noisy, x[5:15])
    assert torch.equal(out_x[15:], x[15:])
