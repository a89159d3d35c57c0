"""The model registry's contract, parametrized over every registered architecture: input
sizes and min_size, output shape, any channel count, normalisation as the first
operation and out of the state_dict, named stages; channel masks and load_weights; and
PreAct-ResNet18's BackdoorBench key layout."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from utils.errors import UserError
from utils.models import Classifier, create_model, list_models, load_weights, model_spec

# (channels, side) of the benchmark's datasets: digits, MNIST, CIFAR/GTSRB, Tiny-ImageNet.
SIZES = [(1, 8), (1, 28), (3, 32), (3, 64)]
# Seconds to build on 2 cores: built twice only (the `built` fixture, 32x32x3, and with 2 channels).
BIG = {"vgg19_bn", "convnext_tiny", "vit_b_16"}
MEAN, STD = (0.2, 0.5, 0.7), (0.3, 0.25, 0.2)


def _forward_cases():
    for name in list_models():
        for channels, side in SIZES:
            if side < model_spec(name).min_size or name not in BIG:
                yield pytest.param(name, channels, side, id=f"{name}-{side}x{side}x{channels}")


def _batch(name: str) -> int:
    return 1 if name in BIG else 2


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _trace(model: Classifier, x: torch.Tensor, layers) -> dict[str, torch.Tensor]:
    """The outputs of ``net.<layer>`` for each layer, and the logits (key "")."""
    outputs: dict[str, torch.Tensor] = {}
    hooks = [
        model.net.get_submodule(name).register_forward_hook(
            lambda _m, _i, out, name=name: outputs.__setitem__(name, out.detach().clone())
        )
        for name in layers
    ]
    try:
        outputs[""] = _run(model, x)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float error, relative to the tensors' scale (fresh MobileNet logits are ~1e-12,
    fresh ViT logits are 0: its head starts at zero)."""
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-30)
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


@pytest.fixture(scope="module", params=list_models())
def built(request) -> Classifier:
    """Each model once, for 32x32x3 inputs, 10 classes, with non-trivial mean and std
    (module scope: tests are grouped by model, so one big model is alive at a time)."""
    torch.manual_seed(0)
    return create_model(request.param, 10, 3, (32, 32), MEAN, STD).eval()


@pytest.mark.parametrize("name,channels,side", list(_forward_cases()))
def test_forward_at_each_supported_size(name, channels, side):
    spec = model_spec(name)
    if side < spec.min_size:
        with pytest.raises(UserError, match=f"'{name}' needs inputs of at least {spec.min_size}x{spec.min_size}"):
            create_model(name, 10, channels, (side, side))
        return
    model = create_model(name, 10, channels, (side, side)).train()  # batch statistics: the hardest case
    out = model(torch.rand(2, channels, side, side))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", [n for n in list_models() if n not in BIG])
def test_min_size_is_accepted(name):
    side = model_spec(name).min_size
    model = create_model(name, 4, 1, (side, side)).eval()
    assert _run(model, torch.rand(2, 1, side, side)).shape == (2, 4)


def _kaiming_fan_out_std(conv: nn.Conv2d) -> float:
    return math.sqrt(2 / (conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]))


# The rule each torchvision architecture applies to its first convolution: std of the weights.
FIRST_CONV_STD = {
    "resnet18": _kaiming_fan_out_std,
    "vgg19_bn": _kaiming_fan_out_std,
    "mobilenet_v3_large": _kaiming_fan_out_std,
    "convnext_tiny": lambda conv: 0.02,
    "vit_b_16": lambda conv: math.sqrt(1 / (conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1])),
}


@pytest.mark.parametrize("name", list_models())
def test_any_channel_count(name):
    side = max(8, model_spec(name).min_size)
    torch.manual_seed(0)
    model = create_model(name, 7, 2, (side, side), (0.5, 0.5), (0.5, 0.5)).eval()
    n = 1 if name in BIG else 3
    assert _run(model, torch.rand(n, 2, side, side)).shape == (n, 7)
    first = next(m for m in model.net.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 2
    if name in FIRST_CONV_STD:  # initialised like the architecture's own, not PyTorch's default
        assert first.weight.std().item() == pytest.approx(FIRST_CONV_STD[name](first), rel=0.25)
        assert first.bias is None or not first.bias.any()


def test_normalize_is_the_first_operation(built):
    plain = Classifier(built.spec, built.net, (0.0,) * 3, (1.0,) * 3).eval()  # the same weights
    x = torch.rand(_batch(built.name), 3, 32, 32)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    expected = _trace(plain, (x - mean) / std, built.spec.stages)
    got, unnormalised = _trace(built, x, built.spec.stages), _trace(plain, x, built.spec.stages)
    for key in expected:
        assert _close(got[key], expected[key]), f"'{key}' differs"
    assert not _close(unnormalised[built.spec.stages[0]], expected[built.spec.stages[0]])  # the constants matter


def test_normalisation_is_not_saved(built):
    state = built.state_dict()
    assert all(key.startswith("net.") for key in state), [k for k in state if not k.startswith("net.")][:3]
    assert {"normalize.mean", "normalize.std"} <= {name for name, _ in built.named_buffers()}
    if built.name not in BIG:  # loading weights keeps the receiving model's own constants
        other = load_weights(create_model(built.name, 10, 3, (32, 32)), state)
        assert torch.equal(other.normalize.mean.flatten(), torch.zeros(3))


def test_forward_at_32x32x3_through_the_named_layers(built):
    spec, n = built.spec, _batch(built.name)
    assert spec.stages, f"{spec.name} declares no stages"
    names = [*spec.stages, *([spec.feature_layer] if spec.feature_layer else [])]
    outputs = _trace(built, torch.rand(n, 3, 32, 32), names)
    assert outputs[""].shape == (n, 10) and torch.isfinite(outputs[""]).all()
    assert set(outputs) == {"", *names}  # each named layer is a submodule on the forward path
    assert [m for m in built.stage_modules()] == [built.net.get_submodule(s) for s in spec.stages]
    if spec.feature_layer:
        assert outputs[spec.feature_layer].dim() == 4  # channels to prune
        assert built.feature_module() is built.net.get_submodule(spec.feature_layer)
    else:
        with pytest.raises(UserError, match="no feature layer"):
            built.feature_module()


# -- channel masks and load_weights ---------------------------------------------------------------

MASKABLE = [n for n in list_models() if model_spec(n).feature_layer and n not in BIG]


def _features(model: Classifier, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (masked) output of the feature layer, and the logits."""
    outputs = _trace(model, x, [model.spec.feature_layer])
    return outputs[model.spec.feature_layer], outputs[""]


@pytest.mark.parametrize("name", MASKABLE)
def test_mask_zeroes_channels_and_survives_load_weights(name):
    torch.manual_seed(0)
    model = create_model(name, 5, 1, (16, 16), (0.5,), (0.5,)).eval()
    x = torch.rand(2, 1, 16, 16)
    features, before = _features(model, x)
    channels = features.shape[1]
    mask = torch.ones(channels)
    mask[::2] = 0
    layer = model.spec.feature_layer
    model.set_mask(layer, mask)
    features, after = _features(model, x)
    assert not features[:, ::2].any() and features[:, 1::2].any()
    assert not _close(before, after)

    state = model.state_dict()
    assert torch.equal(state["masks." + layer.replace(".", "__")], mask)
    fresh = load_weights(create_model(name, 5, 1, (16, 16), (0.5,), (0.5,)).eval(), state)
    assert torch.equal(fresh.mask(layer), mask)
    assert _close(_run(fresh, x), after)

    model.set_mask(layer, torch.ones(channels))  # a second call updates the same mask
    assert _close(_run(model, x), before)


def test_a_copy_applies_its_own_mask():
    model = create_model("cnn", 3, 1, (8, 8)).eval()
    layer, x = model.spec.feature_layer, torch.rand(2, 1, 8, 8)
    model.set_mask(layer, torch.zeros(128))
    masked = _run(model, x)
    clone = copy.deepcopy(model)
    clone.set_mask(layer, torch.ones(128))
    assert _features(clone, x)[0].any()  # the copy's hook reads the copy's mask
    assert not _features(model, x)[0].any() and torch.equal(_run(model, x), masked)


def _state(**changes) -> dict:
    state = create_model("cnn", 3, 1, (8, 8)).state_dict()
    state.update(changes)
    return {k: v for k, v in state.items() if v is not None}


@pytest.mark.parametrize(
    "state,complaint",
    [
        (_state(**{"net.linear.weight": torch.zeros(5, 128)}), "size mismatch"),
        (_state(**{"net.linear.bias": None}), "missing: net.linear.bias"),
        (_state(**{"net.extra": torch.zeros(1)}), "unexpected: net.extra"),
        (_state(**{"masks.layer9": torch.ones(128)}), "mask for unknown layer 'layer9'"),
    ],
    ids=["shape", "missing", "unexpected", "unknown-mask-layer"],
)
def test_load_weights_mismatch_is_user_error(state, complaint):
    with pytest.raises(UserError, match=complaint) as err:
        load_weights(create_model("cnn", 3, 1, (8, 8)), state, source="rec/x.pt")
    assert str(err.value).startswith("rec/x.pt: ") and "\n" not in str(err.value)


def test_mask_of_wrong_length_is_user_error():
    state = _state(**{"masks.layer3": torch.ones(5)})
    model = create_model("cnn", 3, 1, (8, 8))
    model.set_mask("layer3", torch.ones(128))
    with pytest.raises(UserError, match="rec: the mask of layer 'layer3' has 128 values, got 5"):
        load_weights(model, state, source="rec")
    fresh = load_weights(create_model("cnn", 3, 1, (8, 8)), state, source="rec")  # found at the first forward
    with pytest.raises(UserError, match="'layer3' has 5 values, but the layer has 128 channels"):
        fresh(torch.rand(2, 1, 8, 8))


# -- PreAct-ResNet18: BackdoorBench's layout ------------------------------------------------------

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def test_preactresnet18_has_backdoorbench_keys():
    model = create_model("preactresnet18", 10, 3, (32, 32))
    keys = set(model.state_dict())
    block = {f"{bn}.{k}" for bn in ("bn1", "bn2") for k in BN} | {"conv1.weight", "conv2.weight"}
    assert {k[len("net.layer1.0.") :] for k in keys if k.startswith("net.layer1.0.")} == block
    assert {k[len("net.layer2.0.") :] for k in keys if k.startswith("net.layer2.0.")} == block | {"shortcut.0.weight"}
    assert {k for k in keys if ".shortcut." in k} == {f"net.layer{i}.0.shortcut.0.weight" for i in (2, 3, 4)}
    assert model.net.layer2[0].shortcut[0].stride == (2, 2) and model.net.layer2[0].shortcut[0].kernel_size == (1, 1)
    top = {k for k in keys if k.count(".") == 2}  # net.<module>.<tensor>: no final BatchNorm before pooling
    assert top == {"net.conv1.weight", "net.linear.weight", "net.linear.bias"}
    assert [name for name, _ in model.net.named_children()] == [
        "conv1",
        "layer1",
        "layer2",
        "layer3",
        "layer4",
        "avgpool",
        "linear",
    ]
    assert len(keys) == 1 + 4 * 2 * 12 + 3 + 2  # stem, 8 blocks, 3 shortcuts, head
    assert sum(p.numel() for p in model.parameters()) == 11_171_146


def test_unknown_model_suggests_close_names():
    with pytest.raises(UserError, match="unknown model 'resnet19'; did you mean resnet18"):
        create_model("resnet19", 10)
