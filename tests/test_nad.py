"""NAD: the attention map and loss against hand computations, the teacher, and the
student's attention moving towards the teacher's on digits."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from defense.nad import NAD, attention_distance, attention_loss, attention_map
from utils.datasets import load_dataset
from utils.metrics import evaluate
from utils.runtime import seed_everything


def test_attention_map_by_hand():
    f = torch.tensor([[[[1.0, -2.0]], [[3.0, 4.0]]]])  # N=1, C=2, H=1, W=2
    # p = 2: sum_c F_c^2 = [1 + 9, 4 + 16]; p = 1: sum_c |F_c| = [1 + 3, 2 + 4]
    assert torch.allclose(attention_map(f, 2.0), torch.tensor([[10.0, 20.0]]) / math.sqrt(500.0), atol=1e-6)
    assert torch.allclose(attention_map(f, 1.0), torch.tensor([[4.0, 6.0]]) / math.sqrt(52.0), atol=1e-6)
    tokens = torch.tensor([[[1.0, 2.0], [2.0, 2.0]]])  # N=1, tokens=2, D=2: one value a token
    assert torch.allclose(attention_map(tokens, 2.0), torch.tensor([[5.0, 8.0]]) / math.sqrt(89.0), atol=1e-6)


def test_attention_loss_by_hand_and_its_invariances():
    a = torch.tensor([[[[3.0, 0.0]]]])  # map [9, 0] -> [1, 0]
    b = torch.tensor([[[[0.0, 2.0]]]])  # map [0, 4] -> [0, 1]
    assert attention_loss(a, b).item() == pytest.approx((1 + 1) / 2, abs=1e-5)  # mean over 2 positions
    f = torch.randn(4, 8, 5, 5)
    assert attention_loss(f, 3.0 * f).item() == pytest.approx(0.0, abs=1e-10)  # normalised: scale-free
    assert attention_loss(f, -f).item() == pytest.approx(0.0, abs=1e-10)  # |F|^p: sign-free
    assert attention_loss(f, f.roll(1, dims=3)).item() > 1e-4


def test_attention_loss_is_zero_between_a_model_and_itself_and_positive_otherwise(digits_defender):
    record, data = digits_defender
    model = record.build_model()
    assert attention_distance(model, model, data) == [0.0, 0.0, 0.0]
    other = record.build_model()
    with torch.no_grad():
        other.net.layer1[0].weight.mul_(torch.linspace(0.2, 2.0, 32).view(-1, 1, 1, 1))
    assert all(d > 0 for d in attention_distance(model, other, data))


def test_distillation_pulls_the_student_towards_the_teacher_and_removes_the_backdoor(digits_defender):
    record, data = digits_defender
    recipe = dict(epochs=10, te_epochs=10, batch_size=64, lr=0.05, beta_1=20.0, beta_2=40.0, beta_3=40.0)  # digits.yaml
    seed_everything(0)
    student = record.build_model()
    teacher = NAD(**recipe).teacher(student, data)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    frozen = copy.deepcopy(teacher.state_dict())
    plain = copy.deepcopy(student)  # the same training without the attention loss
    start = sum(attention_distance(student, teacher, data))
    NAD(**recipe).distil(student, teacher, data)
    NAD(**{**recipe, "beta_1": 0.0, "beta_2": 0.0, "beta_3": 0.0}).distil(plain, teacher, data)
    distilled = sum(attention_distance(student, teacher, data))
    # below half of the start with two torch threads, 0.59 of it with one (their sums round differently)
    assert distilled < 0.75 * start and distilled < sum(attention_distance(plain, teacher, data))
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in frozen.items()), "the teacher must stay frozen"
    test, cpu = load_dataset("digits").test, torch.device("cpu")
    before = evaluate(record.build_model(), test, record.bd_test, device=cpu)
    after = evaluate(student, test, record.bd_test, device=cpu)
    assert after.asr < before.asr - 0.5 and after.clean_acc >= before.clean_acc - 0.03
    assert after.asr < evaluate(plain, test, record.bd_test, device=cpu).asr  # the attention loss did better
