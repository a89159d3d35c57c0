"""TrojanNN: the trigger lies inside its mask, its optimisation excites the selected
neurons, and a clean model can come from a prototype record."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

import attack
from attack.trojannn import TrojanNN, last_linear, most_connected, neuron_trigger, square_mask
from utils.datasets import load_dataset
from utils.errors import UserError
from utils.models import create_model
from utils.records import load_record


def run(root, name: str, which: str = "trojannn", **kw) -> dict:
    return attack.run(
        which, dataset="digits", epochs=1, device="cpu", record_root=str(root), save_folder_name=name, **kw
    )


def test_trigger_lies_inside_its_mask_and_reuses_a_prototype_record(tmp_path):
    run(tmp_path, "proto", "prototype")
    run(tmp_path, "t", clean_model="proto", mask_update_iters=20)
    record, data = load_record(tmp_path / "t"), load_dataset("digits")
    mask, trigger = record.extras["mask"], record.extras["trigger"]
    assert torch.equal(mask, square_mask((8, 8), 0.07)) and mask.sum() == 4 and mask[0, -2:, -2:].all()
    assert torch.all(trigger * (1 - mask) == 0) and trigger.min() >= 0 and trigger.max() <= 1
    for bd, clean in ((record.bd_test, data.test), (record.bd_train, data.train)):
        changed = bd.images != clean.images[bd.indices]
        assert not changed[:, :, mask[0] == 0].any()  # nothing outside the mask
        assert torch.equal(
            bd.images[:, :, mask[0] == 1], (trigger[:, mask[0] == 1] * 255).round().byte().expand(len(bd), -1, -1)
        )
    proto = load_record(tmp_path / "proto").build_model()
    assert torch.equal(record.extras["neurons"], most_connected(last_linear(proto), 2))
    run(tmp_path, "b", "badnet")
    with pytest.raises(UserError, match="clean_model 'b' is a badnet record, not a clean model"):
        run(tmp_path, "t2", clean_model="b")


def test_optimisation_drives_the_selected_neurons_up():
    torch.manual_seed(0)
    model = create_model("cnn", 10, 1, (8, 8)).eval().requires_grad_(False)
    mask = square_mask((8, 8), 0.25)[None]
    neurons = most_connected(last_linear(model), 2)
    features = []
    last_linear(model).register_forward_hook(lambda m, i, o: features.append(i[0][0, neurons]))
    start = mask.clone()
    trigger = neuron_trigger(model, start, mask, neurons, 100.0, iters=30, eps=1.0, alpha=0.1)
    model(start * mask), model(trigger * mask)
    assert features[-1].sum() > features[-2].sum() and torch.all(trigger * (1 - mask) == start * (1 - mask))


def test_mask_from_a_file(tmp_path):
    image = np.zeros((16, 16), np.uint8)
    image[2:8, 4:12] = 255
    path = tmp_path / "mask.png"
    cv2.imwrite(str(path), image)
    mask = TrojanNN(mask_path=str(path)).make_mask((8, 8))
    assert mask.shape == (1, 8, 8) and mask[0, 1:4, 2:6].all() and mask.sum() == 12
    cv2.imwrite(str(path), np.zeros((16, 16), np.uint8))
    with pytest.raises(UserError, match="the mask is empty"):
        TrojanNN(mask_path=str(path)).make_mask((8, 8))
