"""Speed work that must change no number: SAU's active-set search against the dense
search, the one evaluation pass per test image, the reuse of an evaluation of an
unchanged model, and float32 evaluation under autocast."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from defense.base import Monitor, frozen_copy
from defense.sae import SharedAdversarialExamples, adversarial_loss, project, share_loss
from utils.metrics import Metrics, evaluate


def dense_search(sae: SharedAdversarialExamples, images: torch.Tensor, labels: torch.Tensor):
    """The search as it was before the active set: every sample through every step."""
    with torch.no_grad():
        clean_pred = sae.model(images).argmax(1)
        clean_pred_ref = sae.model_ref(images).argmax(1)
    delta = sae.initial(images)
    steps = 0
    while True:
        delta.requires_grad_(steps < sae.steps)
        with torch.set_grad_enabled(steps < sae.steps):
            logits, logits_ref = sae.model(images + delta), sae.model_ref(images + delta)
        pred, pred_ref = logits.argmax(1), logits_ref.argmax(1)
        fooled, fooled_ref = pred != clean_pred, pred_ref != clean_pred_ref
        shared = fooled & fooled_ref & (pred == pred_ref)
        if bool(shared.all()) or steps == sae.steps:
            break
        loss = sae.beta_1 * adversarial_loss(logits, logits_ref, labels, fooled, fooled_ref) + sae.beta_2 * share_loss(
            logits, logits_ref, shared
        )
        (grad,) = torch.autograd.grad(loss, delta)
        delta = project(delta.detach() - sae.step_size * grad.sign(), sae.norm, sae.bound)
        steps += 1
    return delta.detach(), fooled, fooled_ref, shared, pred_ref, steps


def tiny_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    )
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        model[1].running_mean.uniform_(-0.2, 0.2)
        model[1].running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize(
    "norm,init", [("L_inf", "max"), ("L_inf", "random"), ("L_inf", "zero"), ("L2", "max"), ("L1", "random")]
)
def test_the_active_set_search_gives_the_dense_search_numbers_with_fewer_passes(norm, init):
    f, f_ref = tiny_cnn(0), tiny_cnn(1)
    torch.manual_seed(2)
    x, y = torch.rand(48, 1, 6, 6), torch.randint(0, 3, (48,))
    bound = {"L_inf": 0.3, "L2": 2.0, "L1": 6.0}[norm]
    sae = SharedAdversarialExamples(
        f, frozen_copy(f_ref), bound=bound, step_size=0.1, steps=6, norm=norm, init=init, amp=False
    )
    torch.manual_seed(3)
    delta, fooled, fooled_ref, shared, pred_ref, steps = dense_search(sae, x, y)
    rows: list[int] = []
    f.register_forward_hook(lambda m, i, o: rows.append(len(i[0])))
    torch.manual_seed(3)
    got = sae(x, y)
    assert torch.equal(got, delta)
    assert sae.stats.steps == steps
    assert sae.stats.shared == shared.float().mean().item() and 0 < sae.stats.shared < 1  # some, not all
    assert sae.stats.fooled == fooled.float().mean().item()
    assert sae.stats.fooled_ref == fooled_ref.float().mean().item()
    assert torch.equal(sae.pred_ref, pred_ref)
    # the samples already shared are left out of the later passes
    assert rows[0] == 48 and rows[1] == 48 and rows[-1] < 48 and rows == sorted(rows, reverse=True)


def test_cached_reference_labels_give_the_same_search():
    f, f_ref = tiny_cnn(0), frozen_copy(tiny_cnn(1))
    torch.manual_seed(2)
    x, y = torch.rand(20, 1, 6, 6), torch.randint(0, 3, (20,))
    sae = SharedAdversarialExamples(f, f_ref, bound=0.3, step_size=0.1, steps=4, amp=False)
    calls: list[int] = []
    f_ref.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    delta = sae(x, y)
    without = len(calls)
    calls.clear()
    cached = sae.reference_predictions(x)
    assert calls == [20] and torch.equal(cached, sae.clean_pred_ref)
    calls.clear()
    assert torch.equal(sae(x, y, cached), delta)
    assert len(calls) == without - 1  # no pass over x for f_ref's clean labels


# -- evaluation ------------------------------------------------------------------------------------


def test_evaluation_is_one_float32_pass_per_test_image_even_under_autocast(digits_record_root):
    from utils.datasets import load_dataset
    from utils.records import load_record

    record = load_record(digits_record_root / "badnet_digits")
    test = load_dataset("digits").test
    model = record.build_model().eval()
    seen: list[int] = []
    dtypes: set[torch.dtype] = set()

    def count(m, i, o) -> None:
        seen.append(len(i[0]))

    def dtype(m, i, o) -> None:
        dtypes.add(o.dtype)

    model.register_forward_hook(count)
    for layer in model.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            layer.register_forward_hook(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a caller under autocast, and --amp
        metrics = evaluate(model, test, record.bd_test, device=torch.device("cpu"), amp=True)
    assert sum(seen) == len(test) + len(record.bd_test)  # ASR and RA from the same pass
    assert dtypes == {torch.float32}
    assert metrics == evaluate(model, test, record.bd_test, device=torch.device("cpu"))
    assert not model.training


def fake_metrics(value: float) -> Metrics:
    return Metrics(value, value, value, value, value, value)


def test_monitor_reuses_an_evaluation_only_while_the_model_is_unchanged():
    model = tiny_cnn(0)
    calls: list[int] = []

    def measure(m: nn.Module) -> Metrics:
        calls.append(1)
        return fake_metrics(float(len(calls)))

    monitor = Monitor(measure, eval_every=2, last_epoch=3)
    monitor.report(0, model, loss=1.0)  # not evaluated (every 2)
    assert calls == []
    monitor.report(1, model, loss=1.0)
    assert len(calls) == 1 and monitor.evaluate(model) == fake_metrics(1.0) and len(calls) == 1
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] += 1e-3  # a parameter
    assert monitor.evaluate(model) == fake_metrics(2.0)
    assert monitor.evaluate(model) == fake_metrics(2.0) and len(calls) == 2
    model[1].running_mean.add_(0.5)  # a buffer
    assert monitor.evaluate(model) == fake_metrics(3.0)
    handle = model[2].register_forward_hook(lambda m, i, o: o * 0)  # a hook
    assert monitor.evaluate(model) == fake_metrics(4.0)
    handle.remove()
    assert monitor.evaluate(model) == fake_metrics(5.0)
    assert monitor.evaluate(frozen_copy(model)) == fake_metrics(6.0)  # another model, even if equal
    assert len(calls) == 6


def test_the_after_evaluation_reuses_the_last_report_unless_the_model_changed(record_root, monkeypatch):
    import defense
    import defense.base as base
    import defense.sau as sau_module

    calls: list[int] = []
    real = base.evaluate

    def counted(model, *args, **kwargs):
        calls.append(1)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(base, "evaluate", counted)
    run = dict(result_file="badnet_digits", record_root=str(record_root), device="cpu", epochs=2, eval_every=1)
    summary = defense.run("sau", **run)
    assert len(calls) == 3  # before, epoch 0, epoch 1 (= after)
    rows = (record_root / "badnet_digits/defense/sau/sau_df.csv").read_text().splitlines()
    assert len(rows) == 3 and summary["after"]["asr"] is not None

    mitigate = sau_module.SAU.mitigate

    def changes_after_its_last_report(self, model, data):
        model = mitigate(self, model, data)
        with torch.no_grad():
            next(model.parameters()).mul_(0.5)
        return model

    monkeypatch.setattr(sau_module.SAU, "mitigate", changes_after_its_last_report)
    calls.clear()
    defense.run("sau", **run, overwrite=True)
    assert len(calls) == 4  # the returned model is evaluated again
    rows = (record_root / "badnet_digits/defense/sau/sau_df.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[-1].split(",")[1] == ""  # its row, without an epoch


def test_sau_memory_layout_auto_is_channels_last_only_for_convolutions_on_the_cpu():
    from defense.sau import memory_format_for

    conv, linear = nn.Sequential(nn.Conv2d(1, 2, 3)), nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert memory_format_for(conv, cpu) == torch.channels_last
    assert memory_format_for(conv, cuda) == torch.contiguous_format
    assert memory_format_for(linear, cpu) == torch.contiguous_format
    assert memory_format_for(conv, cpu, "contiguous") == torch.contiguous_format
    assert memory_format_for(linear, cuda, "channels_last") == torch.channels_last


def test_a_sau_result_saved_before_memory_format_existed_holds_auto():
    from bench.compare import _defaults
    from defense.base import CONTROL_KEYS
    from utils.config import config_diff

    stored = {"epochs": 3, "lr": 0.1}  # made when SAU always ran "auto"
    defaults = _defaults("defense", "sau")
    assert defaults["memory_format"] == "auto"
    assert config_diff({**stored, "memory_format": "auto"}, stored, CONTROL_KEYS, defaults=defaults) == []
    assert config_diff({**stored, "memory_format": "contiguous"}, stored, CONTROL_KEYS, defaults=defaults) == [
        "memory_format: result 'auto', requested 'contiguous'"
    ]


def test_params_added_later_must_name_a_hyperparameter():
    from defense.sau import SAU

    class Typo(SAU):
        params_added_later = frozenset({"memory_fromat"})

    with pytest.raises(TypeError, match="memory_fromat"):
        Typo.params()


def test_sau_searches_in_the_layout_asked_for(record_root, monkeypatch):
    import defense
    import defense.sae as sae_module

    seen: list[bool] = []
    search = sae_module.SharedAdversarialExamples.search

    def spy(self, x, *args, **kwargs):  # a weight with several input channels shows the layout (one does not)
        w = next(m.weight for m in self.model.modules() if isinstance(m, nn.Conv2d) and m.in_channels > 1)
        seen.append(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous())
        return search(self, x, *args, **kwargs)

    monkeypatch.setattr(sae_module.SharedAdversarialExamples, "search", spy)
    run = dict(result_file="badnet_digits", record_root=str(record_root), device="cpu", epochs=1, adv_steps=2)
    for fmt, channels_last in (("contiguous", False), ("auto", True)):
        seen.clear()
        summary = defense.run("sau", **run, memory_format=fmt, result_name=f"sau_{fmt}", overwrite=True)
        assert seen and set(seen) == {channels_last}, fmt
        assert summary["config"]["memory_format"] == fmt
