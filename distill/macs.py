"""Multiply-accumulates of one forward pass, counted from the layers that actually run.

A student for the Jetson is judged by its arithmetic against the teacher's: forward hooks
on every Conv2d and Linear count, for one image, ``output elements x (input channels /
groups) x kernel area`` (convolutions) and ``in x out`` (linear layers). Norms, activations
and pooling are left out, as the usual MAC counts leave them out: they are a few percent
of a conv net's work.
"""

from __future__ import annotations

from typing import Any


def count_macs(model: Any, input_size: int = 32, channels: int = 3) -> int:
    """MACs of ``model`` (a torch module) for one ``channels x input_size x input_size``
    image; the model's mode is restored afterwards."""
    import torch

    total = 0

    def conv(mod: torch.nn.Conv2d, _: Any, out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = mod.kernel_size
        total += out[0].numel() * (mod.in_channels // mod.groups) * kh * kw

    def linear(mod: torch.nn.Linear, _: Any, out: torch.Tensor) -> None:
        nonlocal total
        total += mod.in_features * mod.out_features * (out[0].numel() // mod.out_features)

    hooks = []
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_hook(conv))
        elif isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_hook(linear))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, channels, input_size, input_size))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return int(total)
