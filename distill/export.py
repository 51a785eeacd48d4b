"""Export a trained classifier for the edge: ONNX (with metadata) and torch.export (.pt2).

The ONNX contract the edge runtime relies on:

- input ``"input"``: float32 ``[N, 3, H, W]``, RGB in [0, 1], N dynamic;
- output 0 ``"logits"``: float32 ``[N, C]``;
- output 1 ``"features"`` (only for a model with an ``embed`` method, see
  ``cloud_train.models``): float32 ``[N, D]``, the penultimate features the final linear
  layer reads, N dynamic. Readers that want the logits take output 0 or the name "logits";
- normalisation is inside the graph (the model's ``Normalize`` module);
- ``metadata_props``: ``class_names`` (JSON list, label order), ``input_size``
  (the square side S as a decimal integer, as ``edge_runtime.model_info`` reads it),
  ``num_classes``, ``input_format`` ("float32 NCHW RGB [0,1]"), ``normalization``
  ("inside graph": feed raw [0, 1] pixels), ``normalization_mean`` /
  ``normalization_std`` (JSON lists, the constants the graph applies, for reference),
  ``arch``, ``source_sha256`` (sha256 of the checkpoint it came from, or "" when unknown);
  with the features output also ``features_output`` ("features") and ``features_dim``
  (D as a decimal integer). ``distill.detector_fit`` may later add ``detectors`` (the
  fitted adversarial-input detectors; format in ``edge_runtime.detectors``).

The classic TorchScript-based exporter (``dynamo=False``) is used: it still works in
torch 2.x, gives a compact graph of standard ops and keeps the names we choose.
Files are written atomically.
"""

from __future__ import annotations

import copy
import io
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from roadshield_base.errors import BackendUnavailableError, ConfigError, ModelLoadError
from roadshield_base.fileio import atomic_write_bytes

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
FEATURES_NAME = "features"
INPUT_FORMAT = "float32 NCHW RGB [0,1]"
NORMALIZATION = "inside graph"
PT2_META_FILE = "roadshield_meta.json"


def _side(model: nn.Module, input_size: int | Sequence[int] | None) -> int:
    """Square side S from an int, (S, S), (3, S, S) or the model's ``input_size``."""
    size = input_size if input_size is not None else getattr(model, "input_size", None)
    if size is None:
        raise ConfigError(f"{type(model).__name__} has no input_size and none was given",
                          "pass input_size=(3, H, W) or build the model with create_model")
    dims = [int(size)] * 2 if isinstance(size, int) else [int(s) for s in size]
    if len(dims) == 2:
        dims = [3, *dims]
    if len(dims) != 3 or dims[0] != 3 or min(dims) < 1:
        raise ConfigError(f"input_size must be S, (S, S) or (3, S, S), got {size!r}",
                          "e.g. input_size=32")
    if dims[1] != dims[2]:
        raise ConfigError(f"input_size {tuple(dims)} is not square",
                          "the edge runtime crops square signs; export at S x S")
    return dims[1]


def _normalization(model: nn.Module) -> dict[str, str]:
    """The mean/std buffers of the model's first Normalize-like module, as JSON lists."""
    for m in model.modules():
        mean, std = getattr(m, "mean", None), getattr(m, "std", None)
        if isinstance(mean, torch.Tensor) and isinstance(std, torch.Tensor):
            return {"normalization_mean": json.dumps([round(float(v), 6) for v in mean.flatten()]),
                    "normalization_std": json.dumps([round(float(v), 6) for v in std.flatten()])}
    return {}


class _NamedInput(nn.Module):
    """Wraps a model so an exported program's input is called "input", as in the ONNX file."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.net(input)


class _WithFeatures(nn.Module):
    """``x -> (logits, features)`` for a model with ``embed``. With ``classify`` as well the
    trunk is traced once; otherwise the graph may hold it twice (ONNX Runtime's common
    subexpression elimination merges the copies in its session; other backends may not)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net: Any = net  # a model with embed (and maybe classify), beyond nn.Module's API

    def forward(self, input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.net.embed(input)
        if callable(getattr(self.net, "classify", None)):
            return self.net.classify(features), features
        return self.net(input), features


def has_embed(model: nn.Module) -> bool:
    """Whether ``model`` exposes ``embed(x) -> [N, D]`` (its export gets a features output)."""
    return callable(getattr(model, "embed", None))


def _cpu_eval_copy(model: nn.Module) -> nn.Module:
    """Export from a CPU copy in eval mode, leaving the caller's model untouched."""
    return copy.deepcopy(model).to("cpu").eval()


def _embedding_dim(net: Any, dummy: torch.Tensor, logits: torch.Tensor) -> int:
    """D of ``net.embed``; ConfigError unless it is ``[N, D]`` and (with ``classify``)
    ``classify(embed(x))`` reproduces ``forward(x)``."""
    with torch.no_grad():
        feats = net.embed(dummy)
        if not isinstance(feats, torch.Tensor) or feats.ndim != 2 \
                or feats.shape[0] != dummy.shape[0] or feats.shape[1] < 1:
            raise ConfigError(f"{type(net).__name__}.embed returned "
                              f"{getattr(feats, 'shape', type(feats).__name__)}, expected [N, D]",
                              "embed must return the penultimate features, one row per image")
        if callable(getattr(net, "classify", None)):
            again = net.classify(feats)
            if again.shape != logits.shape or not torch.allclose(again, logits, atol=1e-5,
                                                                 rtol=1e-4):
                raise ConfigError(f"{type(net).__name__}.classify(embed(x)) differs from "
                                  "forward(x)", "classify must be the layers after embed")
    return int(feats.shape[1])


def export_onnx(model: nn.Module, class_names: Sequence[str], out_path: str | Path,
                input_size: int | Sequence[int] | None = None, opset: int = 17,
                source_sha256: str | None = None, *, features: bool = True) -> Path:
    """Write ``model`` as ONNX with the edge contract above; return the path written.

    ``class_names`` must have one name per model output. ``input_size`` (square side)
    defaults to the model's own. With ``features`` (the default) a model that has ``embed``
    gets the second output "features"; ``features=False`` writes logits only. The graph is
    checked with ``onnx.checker`` before it is written.
    """
    out = Path(out_path)
    names = [str(n) for n in class_names]
    side = _side(model, input_size)
    if opset < 13:
        raise ConfigError(f"opset {opset} is too old", "use opset 13 or newer (17 by default)")
    net = _cpu_eval_copy(model)
    dummy = torch.rand(2, 3, side, side)
    with torch.no_grad():
        logits = net(dummy)
    n_out = int(logits.shape[1])
    if len(names) != n_out:
        raise ConfigError(f"{len(names)} class names for a model with {n_out} outputs",
                          "pass exactly one name per class, in label order")
    feature_dim = _embedding_dim(net, dummy, logits) if features and has_embed(net) else None
    traced = net if feature_dim is None else _WithFeatures(net).eval()
    outputs = [OUTPUT_NAME] if feature_dim is None else [OUTPUT_NAME, FEATURES_NAME]
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # the legacy exporter announces its deprecation on every call
        warnings.simplefilter("ignore", DeprecationWarning)
        # the legacy exporter writes to file objects too; its annotation says paths only
        torch.onnx.export(traced, (dummy,), buf,  # type: ignore[arg-type]
                          dynamo=False, input_names=[INPUT_NAME], output_names=outputs,
                          opset_version=opset,
                          dynamic_axes={name: {0: "N"} for name in (INPUT_NAME, *outputs)},
                          do_constant_folding=True)
    proto = onnx.load_from_string(buf.getvalue())
    props = {"class_names": json.dumps(names), "input_size": str(side),
             "num_classes": str(n_out), "input_format": INPUT_FORMAT,
             "normalization": NORMALIZATION, **_normalization(net),
             "arch": str(getattr(model, "arch", type(model).__name__)),
             "source_sha256": source_sha256 or ""}
    if feature_dim is not None:
        props.update(features_output=FEATURES_NAME, features_dim=str(feature_dim))
    onnx.helper.set_model_props(proto, props)
    proto.doc_string = f"roadshield sign classifier, {n_out} classes, input {INPUT_FORMAT}"
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as err:
        raise ModelLoadError(f"the exported graph for {out} fails onnx.checker: {err}",
                             "the model uses an op the exporter cannot express") from err
    atomic_write_bytes(out, proto.SerializeToString())
    return out


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """``metadata_props`` of an ONNX file, decoded: ``class_names`` and the normalisation
    constants lists, ``input_size``, ``num_classes`` and ``features_dim`` ints, the rest
    strings."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"ONNX file {path} does not exist", "check the path or export again")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf raises DecodeError and friends
        raise ModelLoadError(f"{path} is not a readable ONNX file: {err}",
                             "export it again") from err
    meta: dict[str, Any] = {p.key: p.value for p in proto.metadata_props}
    try:
        for key in ("class_names", "normalization_mean", "normalization_std"):
            if key in meta:
                meta[key] = list(json.loads(meta[key]))
        for key in ("input_size", "num_classes", "features_dim"):
            if key in meta:
                meta[key] = int(meta[key])
    except (ValueError, TypeError) as err:
        raise ModelLoadError(f"{path} has malformed metadata: {err}", "export it again") from err
    return meta


def check_parity(model: nn.Module, onnx_path: str | Path, x: np.ndarray,
                 atol: float = 1e-4) -> float:
    """Max abs difference between torch and ONNX Runtime (CPU) logits on ``x`` (and, when
    the file has the "features" output and the model ``embed``, between the features too).

    x: float32 ``[N, 3, H, W]`` RGB in [0, 1]. Raises ModelLoadError when the
    difference exceeds ``atol`` or the outputs' shapes differ.
    """
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise BackendUnavailableError("onnxruntime is not installed",
                                      "pip install onnxruntime (or the Jetson wheel)") from err
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ConfigError(f"parity input must be float32 [N, 3, H, W], got {x.shape}",
                          "convert images with cloud_train.tensors.to_tensor(...).numpy()")
    try:
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT raises its own Fail / InvalidGraph types
        raise ModelLoadError(f"onnxruntime cannot load {onnx_path}: {err}",
                             "export it again") from err
    net: Any = _cpu_eval_copy(model)
    names = [OUTPUT_NAME]
    if FEATURES_NAME in {o.name for o in sess.get_outputs()} and has_embed(net):
        names.append(FEATURES_NAME)
    got = sess.run(names, {INPUT_NAME: x})
    with torch.no_grad():
        xt = torch.from_numpy(x)
        ref = [net(xt).numpy()] + ([net.embed(xt).numpy()] if len(names) > 1 else [])
    diff = 0.0
    for name, g, r in zip(names, got, ref, strict=True):
        if g.shape != r.shape:
            raise ModelLoadError(f"{onnx_path} returns {name} {g.shape}, torch returns "
                                 f"{r.shape}", "the ONNX file was exported from another model")
        d = float(np.max(np.abs(g.astype(np.float64) - r))) if r.size else 0.0
        diff = d if np.isnan(d) else max(diff, d)
        if not diff <= atol:  # also catches NaN
            raise ModelLoadError(f"{onnx_path} differs from the torch model by {diff:.3g} "
                                 f"(max abs on {name}, tolerance {atol:.3g})",
                                 "export again from the same checkpoint")
    return diff


def export_torch_program(model: nn.Module, out_path: str | Path,
                         input_size: int | Sequence[int] | None = None, *,
                         class_names: Sequence[str] | None = None,
                         source_sha256: str | None = None) -> Path:
    """Save a ``torch.export`` ExportedProgram (.pt2) with a dynamic batch dimension.

    Load it with ``torch.export.load(path).module()``; no roadshield code is needed to
    run it. Input "input": float32 ``[N, 3, S, S]`` RGB in [0, 1]; output logits ``[N, C]``. The
    same metadata as the ONNX file is embedded as the extra file ``roadshield_meta.json``
    (read it with ``torch.export.load(path, extra_files={"roadshield_meta.json": ""})``).
    """
    out = Path(out_path)
    side = _side(model, input_size)
    net = _NamedInput(_cpu_eval_copy(model)).eval()
    example = torch.rand(2, 3, side, side)
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        program = torch.export.export(net, (example,), dynamic_shapes=({0: batch},))
    except Exception as err:  # torch.export raises several internal error types
        raise ModelLoadError(f"torch.export failed for {type(model).__name__}: {err}",
                             "the model's forward must be traceable without Python "
                             "control flow on tensor values") from err
    with torch.no_grad():
        n_out = int(net(example).shape[1])
    meta = {"input_size": side, "num_classes": n_out, "input_format": INPUT_FORMAT,
            "normalization": NORMALIZATION,
            **{k: json.loads(v) for k, v in _normalization(net).items()},
            "arch": str(getattr(model, "arch", type(model).__name__)),
            "class_names": list(class_names) if class_names is not None else None,
            "source_sha256": source_sha256 or ""}
    buf = io.BytesIO()
    torch.export.save(program, buf, extra_files={PT2_META_FILE: json.dumps(meta)})
    atomic_write_bytes(out, buf.getvalue())
    return out


def write_metadata(model: str | Path, key: str, text: str) -> Path:
    """Set ``metadata_props[key] = text`` in the ONNX file ``model``, keeping every other
    entry, the graph and the file's permissions; the write is atomic."""
    import onnx

    path = Path(model)
    proto = onnx.load(str(path), load_external_data=False)
    for prop in proto.metadata_props:
        if prop.key == key:
            prop.value = text
            break
    else:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, text
    atomic_write_bytes(path, proto.SerializeToString(), mode=path.stat().st_mode & 0o777)
    return path
