"""Shared fixtures: a CUDA ``device`` that skips itself, ``one_torch_thread`` for files of
small models, and a tiny classifier
exported once per session as ONNX (with the metadata ``roadshield distill export``
writes) and as a ``torch.export`` ``.pt2`` program.

torch and onnx are imported inside the fixtures so tests that need neither
never pay for them; both are installed wherever the tests run (``.[cpu,cloud,dev]``), so
a missing one fails the tests that use them rather than skipping them. Only the hardware
is allowed to be absent: ``strict_skips`` (on in ``make test``) fails any other skip.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

# pytester: the strict-skips hook is tested on a throwaway test tree
pytest_plugins = ["pytester", "strict_skips"]

TINY_CLASSES = ("stop", "yield", "no_entry", "speed_limit_30", "priority_road")
TINY_SIZE = 16
TINY_ARCH = "tiny_cnn"
TINY_MEAN = (0.485, 0.456, 0.406)
TINY_STD = (0.229, 0.224, 0.225)


def tiny_metadata() -> dict[str, str]:
    """metadata_props as the exporter writes them (values are strings)."""
    return {
        "class_names": json.dumps(list(TINY_CLASSES)),
        "input_size": str(TINY_SIZE),
        "num_classes": str(len(TINY_CLASSES)),
        "input_format": "float32 NCHW RGB [0,1]",
        "normalization": "inside graph",
        "normalization_mean": json.dumps(list(TINY_MEAN)),
        "normalization_std": json.dumps(list(TINY_STD)),
        "arch": TINY_ARCH,
        "source_sha256": "0" * 64,
    }


def build_tiny_model() -> Any:
    """A seeded 2-conv classifier with normalisation inside, in eval mode."""
    import torch
    from torch import nn

    class TinyNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.tensor(TINY_MEAN).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(TINY_STD).view(1, 3, 1, 1))
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
            self.head = nn.Linear(8, len(TINY_CLASSES))

        # The argument is named "input" so the exported program's signature says so.
        def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002
            x = (input - self.mean) / self.std
            x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
            return self.head(x.mean(dim=(2, 3)))

    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture
def device() -> str:
    """"cuda" where a CUDA device is present; the test is skipped elsewhere (mark it
    ``gpu``: strict skips fail an unmarked one)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return "cuda"


@pytest.fixture(scope="session")
def tiny_model() -> Any:
    return build_tiny_model()


def export_tiny_onnx(model: Any, path: Path, metadata: dict[str, str] | None) -> Path:
    """Export ``model`` to ``path``: input "input" [N,3,S,S], output "logits" [N,C]."""
    import onnx
    import torch

    example = torch.rand(1, 3, TINY_SIZE, TINY_SIZE)
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated but needs no onnxscript and is fast.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (example,), str(path), input_names=["input"],
                          output_names=["logits"], dynamo=False, opset_version=17,
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    if metadata is not None:
        proto = onnx.load(str(path))
        onnx.helper.set_model_props(proto, metadata)
        onnx.save(proto, str(path))
    return path


@pytest.fixture(scope="session")
def tiny() -> SimpleNamespace:
    """What the tiny model fixtures were built with, and the ONNX export helper."""
    return SimpleNamespace(classes=TINY_CLASSES, size=TINY_SIZE, arch=TINY_ARCH,
                           metadata=tiny_metadata(), export_onnx=export_tiny_onnx)


@pytest.fixture(scope="session")
def tiny_onnx(tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as ONNX with export metadata (shared: do not modify)."""
    folder = tmp_path_factory.mktemp("tiny_onnx")
    return export_tiny_onnx(tiny_model, folder / "tiny.onnx", tiny_metadata())


@pytest.fixture(scope="session")
def tiny_pt2(tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as a torch.export program with a dynamic batch (shared)."""
    import torch

    example = (torch.rand(2, 3, TINY_SIZE, TINY_SIZE),)
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(tiny_model, example, dynamic_shapes={"input": {0: batch}})
    path = tmp_path_factory.mktemp("tiny_pt2") / "tiny.pt2"
    torch.export.save(program, str(path))
    return path


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op torch thread for a test module (``pytestmark = pytest.mark.usefixtures(
    "one_torch_thread")``): small models gain nothing from a second thread, and one keeps
    the file fast when the cores are shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
