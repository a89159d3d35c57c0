"""Input-Aware: generated triggers differ between inputs, the masks respect the density
after pre-training, and the saved generators reproduce the backdoor test set."""

from __future__ import annotations

import torch

import attack
from attack.inputaware import Generator, backdoor, generators_from_extras, threshold
from utils.datasets import load_dataset
from utils.poison import to_uint8
from utils.records import load_record


def rms(a: torch.Tensor) -> torch.Tensor:
    return a.pow(2).mean(dim=(1, 2, 3)).sqrt()


def test_triggers_differ_between_inputs_and_masks_respect_the_density(tmp_path):
    density = 0.032
    attack.run(
        "inputaware",
        dataset="digits",
        epochs=1,
        clean_train_epochs=4,
        batch_size=32,
        lambda_norm=100.0,
        mask_density=density,
        device="cpu",
        record_root=str(tmp_path),
        save_folder_name="ia",
    )
    record, data = load_record(tmp_path / "ia"), load_dataset("digits")
    net_g, net_m = generators_from_extras(record.extras, 1, (8, 8), record.mean, record.std)
    x = data.test.images.float() / 255
    with torch.no_grad():
        patterns, masks = net_g(x), threshold(net_m(x))
        untrained = threshold(Generator(1, 1, (8, 8), record.mean, record.std).eval()(x))
    a, b = slice(0, 180), slice(180, 360)
    assert (rms(patterns[a] - patterns[b]) / rms(x[a] - x[b])).mean() > 0.2  # input-specific patterns
    assert rms(masks[a] - masks[b]).mean() > 0.05  # input-specific masks
    assert untrained.mean() > 0.2 and masks.mean() < 3 * density  # pre-training made them sparse
    bd = record.bd_test
    with torch.no_grad():
        remade = to_uint8(backdoor(data.test.images[bd.indices].float() / 255, net_g, net_m))
    assert (remade.int() - bd.images.int()).abs().max() <= 1
