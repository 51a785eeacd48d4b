"""Sign classifiers chosen by name (a timm-style registry).

Every model takes float32 NCHW **RGB in [0, 1]** and starts with a ``Normalize``
module holding the mean/std as buffers, so the normalisation is saved with the
weights and travels into the ONNX graph: the edge feeds raw [0, 1] pixels and
never needs to know the constants.

Each model records ``arch`` (its registry name), ``num_classes``, ``input_size``
(``(3, H, W)``, the size it is trained and exported at) and ``model_kwargs`` (the
keyword arguments that rebuild it), which the checkpoint stores beside the weights.

A model may also expose ``embed(x) -> [N, D]`` float32, the features its classifier head
reads (for ``SignNet`` the pooled last conv stage, in eval mode), and
``classify(features) -> [N, C]`` logits, with
``classify(embed(x)) == forward(x)`` in eval mode. ``distill.export`` adds a ``"features"``
output to the ONNX graph of a model with ``embed`` (for the Mahalanobis detector of
``edge_runtime.detectors``); ``classify`` lets it trace the trunk once for both outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from roadshield_base.errors import ConfigError

#: Per-channel RGB statistics of GTSRB training crops (scale [0, 1]); any value near them works
#: because the first conv layer adapts, but they must be the same at training and at inference,
#: which is why they live in the model's buffers.
DEFAULT_MEAN: tuple[float, float, float] = (0.34, 0.31, 0.32)
DEFAULT_STD: tuple[float, float, float] = (0.27, 0.26, 0.27)

ModelFactory = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelFactory] = {}


def register_model(fn: ModelFactory) -> ModelFactory:
    """Register ``fn(num_classes, **kw) -> nn.Module`` under its function name."""
    name = fn.__name__
    if name in _REGISTRY:
        raise ConfigError(f"model {name!r} is registered twice", "give the factory a unique name")
    _REGISTRY[name] = fn
    return fn


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int, **kw: Any) -> nn.Module:
    """Build the registered model ``name`` with ``num_classes`` outputs.

    Keyword arguments go to the factory (for the built-in models: ``input_size``
    (int or ``(H, W)``), ``dropout``, ``mean``, ``std``). Raises ConfigError for an
    unknown name, a class count below 2 or an argument the factory does not take.
    """
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}",
                          f"choose one of: {', '.join(list_models())}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}",
                          "pass the number of sign classes in the dataset")
    try:
        model = _REGISTRY[name](num_classes, **kw)
    except TypeError as err:
        raise ConfigError(f"model {name!r} rejected its arguments {sorted(kw)}: {err}",
                          "check the keyword names against the model factory") from err
    if not hasattr(model, "input_size"):
        raise ConfigError(f"model {name!r} does not set input_size",
                          "set self.input_size = (3, H, W) in the model's constructor")
    # plain attributes (not tensors or modules), so they go into the instance dict
    vars(model).update(arch=name, num_classes=num_classes, model_kwargs=dict(kw))
    return model


def _square(size: int | Sequence[int]) -> tuple[int, int]:
    hw = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
    if len(hw) != 2 or min(hw) < 16:
        raise ConfigError(f"input_size must be an int or (H, W) with sides >= 16, got {size!r}",
                          "use e.g. 32 or 48")
    return hw[0], hw[1]


class Normalize(nn.Module):
    """``(x - mean) / std`` per RGB channel; x is float32 NCHW RGB in [0, 1]."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ConfigError(f"mean/std need 3 values with std > 0, got {mean!r} / {std!r}",
                              "give one value per RGB channel")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 conv (no bias: BN supplies it), batch norm, ReLU; keeps H and W."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class PooledClassifier(nn.Module):
    """Normalize -> ``features`` (conv stages) -> ``pool`` (global average) -> ``head``
    (a Flatten first, then the classifier layers); subclasses build the four parts."""

    normalize: Normalize
    features: nn.Sequential
    pool: nn.AdaptiveAvgPool2d
    head: nn.Sequential

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(self.normalize(x))))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Features ``[N, D]`` for the Mahalanobis detector: the globally average-pooled
        output of the last conv stage, the input of the head (D = the last stage's width;
        where a ResNet's penultimate layer sits). On the red team's PGD 8/255 examples
        these separated from clean images better than the hidden layer's output."""
        return self.head[0](self.pool(self.features(self.normalize(x))))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, C]`` from ``embed``'s features (the rest of the head)."""
        return self.head[1:](features)


class SignNet(PooledClassifier):
    """Plain CNN: Normalize, conv stages separated by 2x2 max-pooling, global average
    pooling (so 32x32 and 48x48 inputs both work), dropout and a linear head.

    Input float32 ``[N, 3, H, W]`` RGB in [0, 1]; output logits ``[N, num_classes]``.
    """

    def __init__(self, num_classes: int, stages: Sequence[Sequence[int]], hidden: int,
                 input_size: int | Sequence[int] = 32, dropout: float = 0.3,
                 mean: Sequence[float] = DEFAULT_MEAN, std: Sequence[float] = DEFAULT_STD) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}", "use e.g. 0.3")
        h, w = _square(input_size)
        self.input_size = (3, h, w)
        self.normalize = Normalize(mean, std)
        layers: list[nn.Module] = []
        c_in = 3
        for i, stage in enumerate(stages):
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            for c_out in stage:
                layers.append(conv_bn_relu(c_in, c_out))
                c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)  # exports as GlobalAveragePool for any H, W
        head: list[nn.Module] = [nn.Flatten()]
        if hidden:
            head += [nn.Linear(c_in, hidden), nn.ReLU(inplace=True)]
            c_in = hidden
        head += [nn.Dropout(dropout), nn.Linear(c_in, num_classes)]
        self.head = nn.Sequential(*head)



@register_model
def signnet(num_classes: int, **kw: Any) -> nn.Module:
    """Teacher, about 0.31M parameters: stages 32-32 / 64-64 / 128-128, a 128-unit hidden layer."""
    return SignNet(num_classes, stages=((32, 32), (64, 64), (128, 128)), hidden=128, **kw)


@register_model
def signnet_tiny(num_classes: int, **kw: Any) -> nn.Module:
    """Distillation student, about 48k parameters: one conv per stage, 16-32-48-64 channels."""
    kw.setdefault("dropout", 0.1)
    return SignNet(num_classes, stages=((16,), (32,), (48,), (64,)), hidden=0, **kw)


def depthwise_separable(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    """MobileNet's block: 3x3 depthwise conv (stride ``stride``), BN, ReLU6, then a 1x1
    pointwise conv, BN, ReLU6. TensorRT runs both as fused conv + activation kernels."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_in, 3, stride=stride, padding=1, groups=c_in, bias=False),
        nn.BatchNorm2d(c_in), nn.ReLU6(inplace=True),
        nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU6(inplace=True))


class MobileSignNet(PooledClassifier):
    """A MobileNet-style (Howard et al. 2017) student shaped for the Jetson: a 3x3 stem,
    depthwise-separable blocks that halve H and W where ``stride`` is 2, global average
    pooling and a linear head. Input float32 ``[N, 3, H, W]`` RGB in [0, 1]; output logits
    ``[N, num_classes]``; ``embed`` / ``classify`` as ``SignNet``'s."""

    def __init__(self, num_classes: int, blocks: Sequence[tuple[int, int]], stem: int = 16,
                 input_size: int | Sequence[int] = 32, dropout: float = 0.1,
                 mean: Sequence[float] = DEFAULT_MEAN, std: Sequence[float] = DEFAULT_STD) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}", "use e.g. 0.1")
        h, w = _square(input_size)
        self.input_size = (3, h, w)
        self.normalize = Normalize(mean, std)
        layers: list[nn.Module] = [nn.Conv2d(3, stem, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(stem), nn.ReLU6(inplace=True)]
        c_in = stem
        for c_out, stride in blocks:
            layers.append(depthwise_separable(c_in, c_out, stride))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(c_in, num_classes))



@register_model
def signnet_mobile(num_classes: int, **kw: Any) -> nn.Module:
    """Jetson-shaped distillation student, about 49k parameters: a 16-channel stem and six
    depthwise-separable blocks (32, 64 /2, 64, 96 /2, 128 /2, 128)."""
    return MobileSignNet(num_classes, blocks=((32, 1), (64, 2), (64, 1), (96, 2), (128, 2),
                                              (128, 1)), **kw)


@register_model
def signnet_mobile_wide(num_classes: int, **kw: Any) -> nn.Module:
    """The same depthwise-separable shape with more channels where the image is small, about
    0.16M parameters and just under a quarter of ``signnet``'s multiply-adds: a 24-channel
    stem and blocks (48, 96 /2, 96, 192 /2, 256 /2, 256)."""
    return MobileSignNet(num_classes, stem=24, blocks=((48, 1), (96, 2), (96, 1), (192, 2),
                                                       (256, 2), (256, 1)), **kw)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (buffers such as mean/std and BN statistics excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
