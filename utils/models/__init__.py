"""Model registry. Every model takes float images in [0, 1]: normalisation is its first
layer (:class:`Normalize`), so triggers and adversarial perturbations live in pixel space.

    create_model("preactresnet18", num_classes=10, in_channels=3, img_size=(32, 32),
                 mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
    list_models()

A :class:`Classifier` holds ``normalize`` (no parameters, no state) and ``net`` (the
architecture), so state_dict keys are ``net.<the architecture's own keys>``. Each
architecture declares the names of its feature stages (attention distillation) and of
the layer whose output channels feed the classifier (pruning).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from utils.errors import UserError, unknown_name


class Normalize(nn.Module):
    """(x - mean) / std per channel; the constants are buffers that are not saved."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


@dataclass(frozen=True)
class ModelSpec:
    """A registered architecture. ``build(num_classes, in_channels, img_size)`` returns
    the network without normalisation; ``stages`` and ``feature_layer`` name modules of
    that network (for defenses that look inside: NAD, FP)."""

    name: str
    build: Callable[[int, int, tuple[int, int]], nn.Module]
    stages: tuple[str, ...] = ()
    feature_layer: str | None = None
    min_size: int = 1  # smallest input side the architecture accepts


_MODELS: dict[str, ModelSpec] = {}


def register_model(name: str, *, stages: Sequence[str] = (), feature_layer: str | None = None, min_size: int = 1):
    """Decorator: register ``build(num_classes, in_channels, img_size) -> nn.Module``."""

    def wrap(build: Callable[[int, int, tuple[int, int]], nn.Module]):
        _MODELS[name] = ModelSpec(name, build, tuple(stages), feature_layer, min_size)
        return build

    return wrap


def list_models(pattern: str = "*") -> list[str]:
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def model_spec(name: str) -> ModelSpec:
    if name not in _MODELS:
        raise unknown_name("model", name, _MODELS)
    return _MODELS[name]


class _ChannelMask:
    """Forward hook that multiplies a layer's output channels by the buffer ``masks.<key>``.
    The buffer is looked up on each call through ``masks`` (not through the model that
    installed the hook), so a deep copy of the model applies its own masks."""

    def __init__(self, masks: nn.Module, key: str, layer: str):
        self.masks, self.key, self.layer = masks, key, layer

    def __call__(self, module: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        mask = getattr(self.masks, self.key)
        if mask.numel() != out.shape[1]:
            raise UserError(
                f"the mask of layer '{self.layer}' has {mask.numel()} values, but the layer has {out.shape[1]} channels"
            )
        return out * mask.to(out.dtype).view(1, -1, *([1] * (out.dim() - 2)))


class Polarizer(nn.Module):
    """A learnable linear transform of a feature map: a 1x1 convolution (C -> C, no bias)
    followed by BatchNorm2d(C), the convolution initialised to the identity (Zhu et al.'s
    neural polarizer, NPD). At initialisation, in eval mode, it is the identity up to BN's
    eps (x / sqrt(1 + eps))."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class _PolarizeInput:
    """Forward pre-hook that passes a layer's input through ``polarizers.<key>``, looked up
    on each call (so a deep copy of the model applies its own polarizer)."""

    def __init__(self, polarizers: nn.Module, key: str):
        self.polarizers, self.key = polarizers, key

    def __call__(self, module: nn.Module, inputs: tuple) -> tuple:
        return (getattr(self.polarizers, self.key)(inputs[0]), *inputs[1:])


class Classifier(nn.Module):
    """Normalisation followed by a registered architecture.

    Channel masks (pruning) are part of the model: :meth:`set_mask` multiplies the output
    channels of a named layer of ``net`` by a 0/1 mask kept as a buffer, so the mask is in
    the state_dict (``masks.<layer>``) and is applied again when the weights are loaded.
    So are polarizers (NPD): :meth:`insert_polarizer` passes the input of a named layer
    through a :class:`Polarizer`, kept as ``polarizers.<layer>``."""

    def __init__(self, spec: ModelSpec, net: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.spec = spec
        self.normalize = Normalize(mean, std)
        self.net = net
        self.masks = nn.Module()
        self._mask_hooks: dict[str, object] = {}
        self.polarizers = nn.Module()

    def set_mask(self, layer: str, mask: torch.Tensor) -> None:
        """Multiply the output channels of ``net.<layer>`` by ``mask`` (1-D, one value a channel)."""
        key = layer.replace(".", "__")
        module = self.net.get_submodule(layer)
        mask = mask.detach().float().flatten().to(next(self.parameters()).device)
        if hasattr(self.masks, key):
            current = getattr(self.masks, key)
            if current.shape != mask.shape:
                raise ValueError(f"the mask of layer '{layer}' has {current.numel()} values, got {mask.numel()}")
            current.copy_(mask)
            return
        self.masks.register_buffer(key, mask)
        self._mask_hooks[layer] = module.register_forward_hook(_ChannelMask(self.masks, key, layer))

    def insert_polarizer(self, layer: str, channels: int) -> Polarizer:
        """Pass the input of ``net.<layer>`` (``channels`` channels) through a new
        identity-initialised :class:`Polarizer` (replacing any the layer had); returns it."""
        key = layer.replace(".", "__")
        module = self.net.get_submodule(layer)
        expected = getattr(module, "in_channels", channels)
        if expected != channels:
            raise ValueError(f"layer '{layer}' takes {expected} channels, the polarizer has {channels}")
        param = next(self.parameters())
        polarizer = Polarizer(channels).to(param.device)
        new = not hasattr(self.polarizers, key)
        self.polarizers.add_module(key, polarizer)
        if new:
            module.register_forward_pre_hook(_PolarizeInput(self.polarizers, key))
        return polarizer

    def polarizer(self, layer: str) -> Polarizer | None:
        return getattr(self.polarizers, layer.replace(".", "__"), None)

    def mask(self, layer: str) -> torch.Tensor | None:
        return getattr(self.masks, layer.replace(".", "__"), None)

    @property
    def name(self) -> str:
        return self.spec.name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))

    def stage_modules(self) -> list[nn.Module]:
        return [self.net.get_submodule(s) for s in self.spec.stages]

    def classifier_layer(self) -> nn.Linear:
        """The last linear layer of ``net`` (the classifier head): its input is the
        penultimate representation (spectral signatures, activation clustering)."""
        linear = [m for m in self.net.modules() if isinstance(m, nn.Linear)]
        if not linear:
            raise UserError(f"model '{self.name}' has no linear classifier layer")
        return linear[-1]

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        """The input of :meth:`classifier_layer` for images ``x`` (float [0, 1]), flattened
        to (N, D)."""
        seen: list[torch.Tensor] = []
        hook = self.classifier_layer().register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0]))
        try:
            self(x)
        finally:
            hook.remove()
        return seen[-1].flatten(1)

    def feature_module(self) -> nn.Module:
        if self.spec.feature_layer is None:
            raise UserError(f"model '{self.name}' declares no feature layer")
        return self.net.get_submodule(self.spec.feature_layer)


def create_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    img_size: tuple[int, int] = (32, 32),
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Classifier:
    spec = model_spec(name)
    if min(img_size) < spec.min_size:
        raise UserError(f"model '{name}' needs inputs of at least {spec.min_size}x{spec.min_size}, got {img_size}")
    mean = tuple(mean) if mean is not None else (0.0,) * in_channels
    std = tuple(std) if std is not None else (1.0,) * in_channels
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError("mean and std need one value per input channel")
    return Classifier(spec, spec.build(num_classes, in_channels, tuple(img_size)), mean, std)


NET_PREFIX = "net."
MASK_PREFIX = "masks."
POLARIZER_PREFIX = "polarizers."
DATA_PARALLEL_PREFIX = "module."


def bare_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A :class:`Classifier`'s state_dict in its architecture's own key layout (the layout
    of BackdoorBench's and torchvision's models): ``net.`` removed; channel masks stay
    ``masks.<layer>``, polarizers ``polarizers.<layer>.*``."""
    return {k[len(NET_PREFIX) :] if k.startswith(NET_PREFIX) else k: v for k, v in state.items()}


def classifier_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`bare_state`: architecture keys (with or without DataParallel's
    ``module.`` prefix) as a :class:`Classifier`'s keys, ``net.<key>``."""
    out = {}
    for key, value in state.items():
        if key.startswith(DATA_PARALLEL_PREFIX):
            key = key[len(DATA_PARALLEL_PREFIX) :]
        out[key if key.startswith((MASK_PREFIX, POLARIZER_PREFIX)) else NET_PREFIX + key] = value
    return out


def load_weights(model: Classifier, state: dict[str, torch.Tensor], source: str = "the record") -> Classifier:
    """Load ``state`` strictly (channel masks in it are installed first); a mismatch is a
    user-facing error naming ``source``."""
    for key, value in state.items():
        if key.startswith(POLARIZER_PREFIX) and key.endswith(".conv.weight"):
            layer = key[len(POLARIZER_PREFIX) : -len(".conv.weight")].replace("__", ".")
            try:
                model.insert_polarizer(layer, int(value.shape[0]))
            except AttributeError:
                raise UserError(f"{source}: polarizer for unknown layer '{layer}' of model '{model.name}'") from None
            except ValueError as exc:
                raise UserError(f"{source}: {exc}") from None
        if key.startswith(MASK_PREFIX):
            layer = key[len(MASK_PREFIX) :].replace("__", ".")
            try:
                model.set_mask(layer, value)
            except AttributeError:
                raise UserError(f"{source}: mask for unknown layer '{layer}' of model '{model.name}'") from None
            except ValueError as exc:
                raise UserError(f"{source}: {exc}") from None
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), "")
        raise UserError(f"{source}: the weights do not fit model '{model.name}' ({detail[:160]})") from None
    if result.missing_keys or result.unexpected_keys:
        missing = ", ".join(result.missing_keys[:3]) or "none"
        unexpected = ", ".join(result.unexpected_keys[:3]) or "none"
        raise UserError(
            f"{source}: the weights do not fit model '{model.name}' (missing: {missing}; unexpected: {unexpected})"
        )
    return model


# Register the architectures (each module registers itself on import).
from utils.models import cnn, preactresnet, torchvision_models  # noqa: E402,F401
