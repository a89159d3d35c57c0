"""Neural Cleanse: the anomaly index, the cost schedule, the unlearning set, and detection
on the backdoored digits model (target 0) against a clean one."""

from __future__ import annotations

import math

import pytest
import torch

from defense.base import DefenseData, clean_indices
from defense.nc import CostSchedule, NeuralCleanse, ReversedTrigger, anomaly_index, flag_classes
from utils.datasets import load_dataset
from utils.metrics import evaluate
from utils.records import load_record

# A quick reverse-engineering budget: 80 clean images, batches of 10, 15 epochs a class.
QUICK = {"nc_epochs": 15, "batch_size": 10, "epochs": 5, "lr": 0.01}


def test_anomaly_index_is_the_deviation_over_the_scaled_mad():
    norms = torch.tensor([10.0, 11.0, 9.0, 10.5, 2.0, 10.0, 30.0])
    index, median, mad = anomaly_index(norms)
    # median 10; absolute deviations 0, 1, 1, .5, 8, 0, 20 -> their median 1; MAD 1.4826
    assert median == 10.0 and mad == pytest.approx(1.4826)
    assert torch.allclose(index, torch.tensor([0, 1, 1, 0.5, 8, 0, 20]) / 1.4826)
    # 30 is an outlier too, but above the median: only small triggers count.
    assert flag_classes(norms) == [4]
    assert flag_classes(norms, threshold=10.0) == []
    assert flag_classes(torch.tensor([5.0, 5.0, 5.0, 1.0])) == [3]  # zero MAD: any deviation is infinite
    assert math.isinf(float(anomaly_index(torch.tensor([5.0, 5.0, 5.0, 1.0]))[0][3]))


def test_cost_schedule_raises_lowers_and_stops_early():
    s = CostSchedule(cost=1e-3, threshold=0.98, patience=2, multiplier=2.0, early_stop_patience=5)
    assert not s.update(0.99, 5.0) and s.cost == 1e-3
    assert not s.update(0.99, 5.0) and s.cost == pytest.approx(2e-3)  # 2 epochs at the threshold: raise
    assert not s.update(0.5, 5.0) and not s.update(0.5, 5.0)
    assert s.cost == pytest.approx(2e-3 / 2**1.5)  # 2 epochs below: lower by multiplier^1.5
    assert not s.update(0.5, 5.0)  # moved both ways; the best norm has stalled for 4 epochs
    assert s.update(0.5, 5.0)  # ... and now for 5
    improving = CostSchedule(cost=1e-3, threshold=0.98, patience=1, early_stop_patience=2)
    assert not any(improving.update(0.99 if k % 2 else 0.5, 5.0 * 0.9**k) for k in range(10))
    fresh = CostSchedule(cost=1e-3, threshold=0.98, patience=2, early_stop_patience=1)
    assert not any(fresh.update(0.99, 5.0 - k) for k in range(6))  # never lowered: no early stop


def test_unlearning_set_stamps_a_fifth_and_keeps_true_labels():
    x = torch.rand(50, 1, 4, 4)
    y = torch.arange(50) % 10
    data = DefenseData.__new__(DefenseData)
    data.seed, data._on_device = 0, (x, y)
    mask = torch.zeros(1, 4, 4)
    mask[0, -1, -1] = 1.0
    trigger = ReversedTrigger(mask, torch.ones(1, 4, 4), 1.0, 1)
    images, labels = NeuralCleanse(unlearning_ratio=0.2).unlearning_set(data, [trigger] * 10, [3])
    assert images.shape == (50, 1, 4, 4) and sorted(labels.tolist()) == sorted(y.tolist())
    stamped = images[:, 0, -1, -1] == 1.0  # the clean corner pixels are below 1
    assert int(stamped.sum()) == 10
    for image, label in zip(images[stamped], labels[stamped]):
        expected = x.clone()
        expected[:, 0, -1, -1] = 1.0
        match = [i for i in range(50) if torch.equal(expected[i], image)]
        assert len(match) == 1 and y[match[0]] == label  # the stamped copy of a clean image, its label kept
    two = NeuralCleanse(unlearning_ratio=0.2).unlearning_set(data, [trigger] * 10, [3, 5])[0]
    assert len(two) == 40 + 2 * 10  # one stamped copy of the same fifth per flagged class


def defender(record, n: int = 80) -> DefenseData:
    data = load_dataset("digits")
    idx = clean_indices(data.train.labels, record.poison_indices, n / len(data.train), 0)
    return DefenseData(data.train.subset(idx), data.info, torch.device("cpu"), amp=False, seed=0)


def test_flags_the_target_of_the_backdoor_and_unlearns_it(digits_record_root):
    record = load_record(digits_record_root / "badnet_digits")
    model = record.build_model().eval()
    data = load_dataset("digits")
    before = evaluate(model, data.test, record.bd_test, device=torch.device("cpu"), amp=False)
    nc = NeuralCleanse(**QUICK)
    purified = nc.mitigate(model, held := defender(record))
    report = held.outputs.summary
    assert report["detected"] and report["flagged"][0] == 0  # the target, with the smallest mask
    norms = held.outputs.extras["l1_norms"]
    assert int(norms.argmin()) == 0 and float(norms[0]) < 0.5 * float(norms.median())
    extras = held.outputs.extras
    assert extras["masks"].shape == (10, 1, 8, 8) and extras["patterns"].shape == (10, 1, 8, 8)
    after = evaluate(purified, data.test, record.bd_test, device=torch.device("cpu"), amp=False)
    assert after.asr < 0.5 * before.asr and after.clean_acc > before.clean_acc - 0.1


def test_clean_model_is_returned_unchanged(tmp_path):
    # At this quick budget no class of a clean digits model is flagged. At the full
    # budget (80 epochs) the small natural triggers of classes 8 and 9 are (measured).
    from attack import run

    run("prototype", dataset="digits", save_folder_name="clean", record_root=str(tmp_path), epochs=5, device="cpu")
    record = load_record(tmp_path / "clean")
    model = record.build_model().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    nc = NeuralCleanse(**QUICK)
    returned = nc.mitigate(model, data := defender(record))
    report = data.outputs.summary
    assert report["detected"] is False and report["flagged"] == []
    assert set(report["anomaly_index"]) == {str(c) for c in range(10)}
    assert returned is model and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
