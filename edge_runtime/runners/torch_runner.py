"""PyTorch backend: a ``.pt2`` ExportedProgram (``torch.export``) or an ``nn.Module``.

torch is imported when a runner is built, never at module level, so the edge
runtime loads on a device without torch.

A program written by ``roadshield distill export --pt2`` (``distill.export.
export_torch_program``) carries the export metadata as the extra file
``roadshield_meta.json`` inside the archive: a JSON object with ``class_names`` (list),
``input_size`` (int), ``num_classes``, ``input_format``, ``normalization`` (and the
``normalization_mean`` / ``normalization_std`` lists), ``arch`` and ``source_sha256``.
``TorchRunner.model_info`` reports it in the same form as the ONNX reader.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_runtime.model_info import (
    EXPORT_HINT,
    ModelInfo,
    TensorSpec,
    check_feed,
    model_info_from_metadata,
)
from edge_runtime.runners.base import BaseRunner, RunnerStateError
from roadshield_base.errors import BackendUnavailableError, ConfigError, ModelLoadError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

INSTALL_HINT = ("pip install torch (see pytorch.org for the CUDA build); on a Jetson install "
                "NVIDIA's torch wheel for your JetPack, or use the onnxruntime backend")
#: the single-output name every backend reports, matching the ONNX export
LOGITS = "logits"
#: model input layout when the model itself does not say (nn.Module): N x 3 x H x W
_DEFAULT_INPUT = TensorSpec("input", (None, 3, None, None))
#: the extra file of a .pt2 archive holding the export metadata (distill.export writes it)
PT2_META_FILE = "roadshield_meta.json"
PT2_HINT = f"{EXPORT_HINT} --pt2"


def import_torch() -> Any:
    """Import torch or raise ``BackendUnavailableError`` saying what to install."""
    try:
        import torch
    except ImportError as err:
        raise BackendUnavailableError(f"torch is not installed ({err})", INSTALL_HINT) from err
    return torch


def resolve_device(device: str, cuda_available: bool) -> str:
    """Map "auto" / "cpu" / "cuda" / "cuda:N" to the device to run on.

    "auto" is "cuda" when CUDA is available, else "cpu". Asking for CUDA where it
    is not available raises ``BackendUnavailableError``; anything else ``ConfigError``.
    """
    if device == "auto":
        return "cuda" if cuda_available else "cpu"
    if device == "cpu":
        return device
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not cuda_available:
            raise BackendUnavailableError(f"device {device!r} asked for but CUDA is not available",
                                          "use device='cpu' or 'auto', or install a CUDA build "
                                          "of torch (NVIDIA's wheel on a Jetson)")
        return device
    raise ConfigError(f"unknown torch device {device!r}",
                      "use 'auto', 'cpu', 'cuda' or 'cuda:N'")


class TorchRunner(BaseRunner):
    """Run a classifier with PyTorch under ``torch.inference_mode``.

    model_path_or_module: a ``.pt2`` file written by ``torch.export.save`` or an
        ``nn.Module`` (put in eval mode and moved to ``device`` in place).
    device: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N".
    Input: float32 N x 3 x S x S RGB in [0, 1]; input names come from the
    program's signature ("input" for a module), the single output is "logits".
    A program exported with a fixed batch of 1 is run sample by sample.
    """

    name = "torch"

    def __init__(self, model_path_or_module: str | os.PathLike[str] | torch.nn.Module,
                 device: str = "auto") -> None:
        super().__init__()
        torch = import_torch()
        self._torch = torch
        self.device = resolve_device(device, torch.cuda.is_available())
        self.name = f"torch:{self.device}"
        self.model_path: Path | None = None
        self._given_module: Any = None
        if isinstance(model_path_or_module, (str, os.PathLike)):
            self.model_path = Path(model_path_or_module)
            if not self.model_path.is_file():
                raise ModelLoadError(f"torch program {self.model_path} does not exist",
                                     f"check the path, or {EXPORT_HINT} --pt2")
            if self.model_path.suffix.lower() != ".pt2":
                raise ModelLoadError(f"{self.model_path} is not a .pt2 ExportedProgram",
                                     "TorchRunner loads torch.export .pt2 files; run .onnx "
                                     "files with the onnxruntime backend")
        elif isinstance(model_path_or_module, torch.nn.Module):
            self._given_module = model_path_or_module
        else:
            raise ConfigError(f"TorchRunner got a {type(model_path_or_module).__name__}",
                              "pass a .pt2 path or a torch.nn.Module")
        self._module: Any = None
        self._specs: list[TensorSpec] = [_DEFAULT_INPUT]
        self._outputs: list[str] = [LOGITS]
        self._static_batch: int | None = None
        self._metadata: dict[str, str] | None = None  # from the archive; None: it has none
        self._sha256 = ""

    @property
    def model_info(self) -> ModelInfo:
        """The export metadata read from the loaded program's ``roadshield_meta.json``
        (valid once active); ``ModelLoadError`` for a module or a program saved without it."""
        if not self.is_active:
            raise RunnerStateError(f"runner {self.name} has not loaded its model yet",
                                   "activate it (or enter its context) first")
        what = (f"torch program {self.model_path}" if self.model_path is not None
                else f"torch module {type(self._given_module).__name__}")
        if self._metadata is None:
            raise ModelLoadError(f"{what} carries no {PT2_META_FILE} (class names, input size)",
                                 f"export it with `roadshield distill export --pt2`, which "
                                 f"embeds them; {PT2_HINT}")
        return model_info_from_metadata(self._metadata, what, input_name=self._specs[0].name,
                                        outputs=self._outputs, width=None, sha256=self._sha256,
                                        hint=PT2_HINT)

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self._specs]

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    def _load_program(self) -> Any:
        torch = self._torch
        path = self.model_path
        if path is None:
            raise RunnerStateError(f"runner {self.name} runs a module, not a program",
                                   "pass a .pt2 path to load a program")
        try:
            data = path.read_bytes()
        except OSError as err:
            raise ModelLoadError(f"cannot read torch program {path}: {err}",
                                 "check the path and its permissions") from err
        # one read: the digest and the metadata belong to the very bytes that run
        self._sha256 = hashlib.sha256(data).hexdigest()
        extra: dict[str, Any] = {PT2_META_FILE: ""}
        try:
            program = torch.export.load(io.BytesIO(data), extra_files=extra)
        except Exception as err:  # torch raises zipfile / pickle / runtime errors here
            raise ModelLoadError(f"cannot load torch program {path}: {err}",
                                 f"the file is corrupt or from another torch; {PT2_HINT}"
                                 ) from err
        self._metadata = _program_metadata(extra[PT2_META_FILE], path)
        signature = program.graph_signature
        users = list(signature.user_inputs)
        specs = []
        for node in program.graph.nodes:
            if node.op == "placeholder" and node.name in users:
                val = node.meta.get("val")
                shape = (tuple(d if isinstance(d, int) else None for d in val.shape)
                         if val is not None else _DEFAULT_INPUT.shape)
                specs.append(TensorSpec(node.name, shape))
        if not specs:
            raise ModelLoadError(f"torch program {self.model_path} takes no tensor input",
                                 EXPORT_HINT + " --pt2")
        # Output node names in an ExportedProgram are internal FX names; one output is logits.
        outputs = list(signature.user_outputs)
        self._outputs = [LOGITS] if len(outputs) == 1 else outputs
        self._static_batch = specs[0].shape[0] if len(specs) == 1 else None
        if self._static_batch is not None:
            specs = [TensorSpec(specs[0].name, (None,) + specs[0].shape[1:])]
        self._specs = specs
        if self.device != "cpu":
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, self.device)
        return program.module()

    def activate_impl(self) -> None:
        if self.model_path is not None:
            module = self._load_program()
        else:
            module = self._given_module.eval().to(self.device)
        self._module = module
        log.info("torch runner for %s on %s",
                 self.model_path.name if self.model_path else type(module).__name__, self.device)

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        checked = check_feed(feed, self._specs, self.name)
        batch = next(iter(checked.values())).shape[0]
        if self._static_batch is not None and batch != self._static_batch:
            if self._static_batch != 1:
                raise ConfigError(f"{self.name}: {self.model_path} was exported for a batch of "
                                  f"{self._static_batch}, got {batch}",
                                  "feed that batch size, or re-export with a dynamic batch")
            rows = [self._run({k: v[i:i + 1] for k, v in checked.items()}) for i in range(batch)]
            return {name: np.concatenate([r[name] for r in rows]) for name in self._outputs}
        return self._run(checked)

    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        args = [torch.from_numpy(feed[spec.name]).to(self.device) for spec in self._specs]
        with torch.inference_mode():
            result = self._module(*args)
        if isinstance(result, dict):
            values = [result[name] for name in self._outputs]
        elif isinstance(result, (tuple, list)):
            values = list(result)
        else:
            values = [result]
        if len(values) != len(self._outputs):
            raise ModelLoadError(f"{self.name}: model returned {len(values)} outputs, expected "
                                 f"{self._outputs}", "export a model with a single logits output")
        return {name: _to_numpy(value) for name, value in zip(self._outputs, values, strict=True)}

    def deactivate_impl(self) -> None:
        self._module = None
        if self.device != "cpu" and self.model_path is not None:
            self._torch.cuda.empty_cache()


def _program_metadata(text: str | bytes, path: Path) -> dict[str, str] | None:
    """The archive's ``roadshield_meta.json`` in ``metadata_props`` form (every value a
    string, lists as JSON), or None when the archive has none. Entries that are null
    (a program exported without class names) are dropped, so the check names them."""
    if not text:
        return None
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{PT2_META_FILE} in {path} is not JSON: {err}", PT2_HINT) from err
    if not isinstance(meta, dict):
        raise ModelLoadError(f"{PT2_META_FILE} in {path} is not a JSON object", PT2_HINT)
    return {str(k): v if isinstance(v, str) else json.dumps(v)
            for k, v in meta.items() if v is not None}


def _to_numpy(value: Any) -> np.ndarray:
    array = value.detach().cpu()
    if array.is_floating_point():
        array = array.float()  # half-precision models still report float32 logits
    return array.numpy()
