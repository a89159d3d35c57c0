"""FT: fine-tuning changes the weights, keeps clean accuracy, and reads BackdoorBench's key names."""

from __future__ import annotations

import torch

import defense
from utils.records import load_defense_result, load_record


def ft(root, **kw):
    return defense.run("ft", result_file="badnet_digits", record_root=str(root), device="cpu", **kw)


def saved_state(root):
    return load_defense_result(root / "badnet_digits" / "defense" / "ft" / "defense_result.pt")["model"]


def test_fine_tuning_changes_the_weights_and_keeps_clean_accuracy(record_root):
    summary = ft(record_root, epochs=2, eval_every=100)
    record = load_record(record_root / "badnet_digits")
    state = saved_state(record_root)
    changed = [k for k, v in record.model.items() if v.is_floating_point() and not torch.equal(v, state[k])]
    assert any(k.endswith(".weight") for k in changed), "fine-tuning left the weights alone"
    assert summary["after"]["clean_acc"] >= summary["before"]["clean_acc"] - 0.05


def test_backdoorbench_names_for_momentum_and_weight_decay_are_read(record_root, tmp_path):
    yaml = tmp_path / "ft.yaml"
    yaml.write_text("epochs: 0\nsgd_momentum: 0.5\nwd: 0.001\n")
    summary = ft(record_root, yaml_path=str(yaml))
    assert summary["config"]["momentum"] == 0.5 and summary["config"]["weight_decay"] == 0.001
    record = load_record(record_root / "badnet_digits")
    state = saved_state(record_root)
    assert all(torch.equal(v, state[k]) for k, v in record.model.items()), "zero epochs must change nothing"
    assert summary["after"] == summary["before"]
