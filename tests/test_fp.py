"""FP: which channels are pruned, the accuracy bound, and the mask saved with the weights."""

from __future__ import annotations

import pytest
import torch

import defense
from defense.fp import FP, clean_accuracy, mean_activation
from utils.records import load_defense_result, save_defense_result


def features(model, x):
    """The small CNN's layer3 output, computed without hooks."""
    net = model.net
    return net.layer3(net.layer2(net.layer1(model.normalize(x))))


def test_mean_activation_is_the_channel_mean_of_the_feature_layer(digits_defender):
    record, data = digits_defender
    model = record.build_model().eval()
    x, _ = data.tensors()
    with torch.no_grad():
        expected = features(model, x).mean(dim=(0, 2, 3))
    got = mean_activation(model, model.feature_module(), data, batch_size=50)
    assert torch.allclose(got, expected, atol=1e-5)


def test_channels_are_ranked_on_train_transformed_images_by_default(digits_defender, monkeypatch):
    """BackdoorBench's activation pass reads the clean subset through its train transform."""
    record, data = digits_defender
    model = record.build_model().eval()
    assert FP().rank_augment is True
    seen = []
    monkeypatch.setattr(type(data), "augment", lambda self, x: seen.append(len(x)) or torch.zeros_like(x))
    FP(epochs=0, once_prune_ratio=0.05, val_ratio=0.0).prune(model, data)
    assert sum(seen) == len(data)  # every image once, transformed
    fresh = record.build_model().eval()
    blank = mean_activation(fresh, fresh.feature_module(), data, augment=True)  # every image "transformed" to 0
    x, _ = data.tensors()
    with torch.no_grad():
        assert torch.allclose(blank, features(fresh, torch.zeros_like(x[:1])).mean(dim=(0, 2, 3)), atol=1e-5)
    seen.clear()
    FP(epochs=0, once_prune_ratio=0.05, val_ratio=0.0, rank_augment=False).prune(record.build_model(), data)
    assert seen == []


def test_prunes_the_least_active_channels_while_accuracy_stays_within_the_bound(digits_defender):
    record, data = digits_defender
    model = record.build_model()
    fp = FP(epochs=0, once_prune_ratio=0.05)
    fp.mitigate(model, data)
    r, extras = data.outputs.summary, data.outputs.extras
    mask = model.mask("layer3")
    pruned = mask == 0
    assert r["pruned"] > 0 and int(pruned.sum()) == r["pruned"] and r["channels"] == 128
    assert set(torch.nonzero(pruned).flatten().tolist()) == set(extras["prune_order"][: r["pruned"]].tolist())
    assert extras["activation"][pruned].max() <= extras["activation"][~pruned].min()
    acc_0 = r["held_out_acc_unpruned"]
    assert r["held_out_acc_pruned"] >= (1 - fp.acc_ratio) * acc_0 - 1e-6
    _, held_out = data.split(fp.val_ratio)
    assert clean_accuracy(model, held_out) == pytest.approx(r["held_out_acc_pruned"])
    ks, accs = extras["prune_curve_pruned"], extras["prune_curve_acc"]
    if int(ks[-1]) > r["pruned"]:  # stopped by the bound, not by running out of channels
        assert acc_0 - float(accs[-1]) > fp.acc_ratio * acc_0


def test_tolerance_decides_how_far_pruning_goes(digits_defender):
    record, data = digits_defender
    everything = FP(epochs=0, once_prune_ratio=0.05, acc_ratio=1.0)
    everything.mitigate(record.build_model(), data)
    assert data.outputs.summary["pruned"] == 126  # steps of 7 up to 127: one channel always stays
    strict = FP(epochs=0, once_prune_ratio=0.05, acc_ratio=0.0)
    strict.mitigate(record.build_model(), data)
    r = data.outputs.summary
    assert r["pruned"] < 126 and r["held_out_acc_pruned"] >= r["held_out_acc_unpruned"]


def test_saved_result_reloads_with_the_mask_applied(digits_defender, tmp_path):
    record, data = digits_defender
    fp = FP(epochs=1, once_prune_ratio=0.05, batch_size=64)
    purified = fp.mitigate(record.build_model(), data).eval()
    save_defense_result(tmp_path, record.model_name, record.num_classes, purified.state_dict(), data.outputs.extras)
    result = load_defense_result(tmp_path / "defense_result.pt")
    assert torch.equal(result["extras"]["prune_order"], data.outputs.extras["prune_order"])
    reloaded = record.build_model(result["model"]).eval()
    x = record.bd_test.images[:32].float() / 255
    with torch.no_grad():
        assert torch.allclose(reloaded(x), purified(x), atol=1e-6)
        mask = reloaded.mask("layer3")
        assert int((mask == 0).sum()) == data.outputs.summary["pruned"] > 0
        unmasked = record.build_model({k: v for k, v in result["model"].items() if not k.startswith("masks.")}).eval()
        manual = unmasked.net.linear(unmasked.net.avgpool(features(unmasked, x) * mask.view(1, -1, 1, 1)).flatten(1))
        assert torch.allclose(reloaded(x), manual, atol=1e-5)
        assert not torch.allclose(unmasked(x), reloaded(x), atol=1e-3), "the mask made no difference"


def test_summary_reports_the_number_pruned(record_root):
    summary = defense.run(
        "fp", result_file="badnet_digits", record_root=str(record_root), device="cpu", epochs=1, once_prune_ratio=0.05
    )
    state = load_defense_result(record_root / "badnet_digits" / "defense" / "fp" / "defense_result.pt")["model"]
    assert summary["pruned"] == int((state["masks.layer3"] == 0).sum()) > 0
    assert summary["feature_layer"] == "layer3" and summary["channels"] == 128
