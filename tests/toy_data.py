"""Small, learnable data and models shared by the cloud-tier and export tests."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

COLOURS = np.array([[220, 40, 40], [40, 40, 220], [40, 200, 40], [230, 200, 30]])


def toy_shapes(n: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """n uint8 RGB images of 4 classes (red disc, blue square, green triangle, yellow cross)
    on a random grey background with Gaussian pixel noise; labels are int64."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    yy, xx = np.mgrid[:size, :size]
    images = np.empty((n, size, size, 3), np.uint8)
    for i, k in enumerate(labels):
        img = np.empty((size, size, 3), np.float32)
        img[:] = rng.integers(60, 160, 3)
        cy, cx = size / 2 + rng.uniform(-3, 3, 2)
        r = size * rng.uniform(0.28, 0.38)
        dy, dx = yy - cy, xx - cx
        mask = [dy**2 + dx**2 < r**2,
                (abs(dy) < 0.8 * r) & (abs(dx) < 0.8 * r),
                (dy < 0.7 * r) & (dy > -r) & (abs(dx) < 0.6 * (dy + r)),
                ((abs(dy) < 0.3 * r) | (abs(dx) < 0.3 * r)) & (abs(dy) < r) & (abs(dx) < r)][k]
        img[mask] = COLOURS[k]
        images[i] = (img + rng.normal(0, 20, img.shape)).clip(0, 255)
    return images, labels


def used_model(arch: str, names: Sequence[str], size: int = 32, seed: int = 0):
    """A registry model whose BN running statistics moved away from their defaults, in eval
    mode, so a save/load or export round trip that drops buffers shows up."""
    import torch

    from cloud_train.models import create_model

    torch.manual_seed(seed)
    model = create_model(arch, len(names), input_size=size)
    model.train()
    with torch.no_grad():
        model(torch.rand(4, 3, size, size))
    return model.eval()


def trained_toy_model(n_test: int):
    """signnet_tiny trained (standard, 4 epochs) on 600 toy shapes to ~100 % clean accuracy,
    in eval mode, with ``n_test`` held-out images as (model, x float NCHW, y int64)."""
    import torch

    from cloud_train.models import create_model
    from cloud_train.tensors import make_loader, to_tensor
    from cloud_train.train import TrainConfig, train

    torch.manual_seed(0)
    xtr, ytr = toy_shapes(600, seed=10)
    xte, yte = toy_shapes(n_test, seed=11)
    model = create_model("signnet_tiny", 4)
    cfg = TrainConfig(trainer="standard", epochs=4, batch_size=64, device="cpu")
    train(model, make_loader(xtr, ytr, 64, shuffle=True, augment=True), cfg, progress=False)
    return model.eval(), to_tensor(xte), torch.as_tensor(yte)


def fake_runner_base():
    """A BaseRunner with the model's tensor names and no resources: tests subclass it and
    write ``infer_impl``. Imported lazily so this module needs no edge_runtime."""
    from edge_runtime.runners.base import BaseRunner

    class FakeRunner(BaseRunner):
        """Input "input" (N, 3, S, S) float32, output "logits" (N, C)."""

        calls = 0

        @property
        def input_names(self) -> list[str]:
            return ["input"]

        @property
        def output_names(self) -> list[str]:
            return ["logits"]

        def activate_impl(self) -> None:
            self.calls = 0

        def deactivate_impl(self) -> None:
            self.calls = -1  # marks "released" for tests that check it

    return FakeRunner
