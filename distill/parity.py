"""Parity of two runners on the same inputs, output by output, in Polygraphy's manner.

The candidate (a TensorRT engine, an INT8 model) and the reference (ONNX Runtime on the
float model) each run the same batches through the runner contract
(``activate / infer(dict) -> dict``). Per output the report gives what Polygraphy's
``CompareFunc.simple`` records: the largest absolute and relative difference (the smallest
tolerances that would pass), the mean and median absolute difference, and whether every
element is within tolerance, here ``|candidate - reference| <= atol + rtol * |reference|``
(``numpy.isclose``'s rule). For a logits output it also counts top-1 agreement, which is
what the car acts on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from roadshield_base.errors import ConfigError, ModelLoadError

# (rtol, atol) per engine precision: float32 kernels differ from ONNX Runtime's only in
# summation order; FP16 keeps ~3 decimal digits; INT8 is compared with ONNX Runtime running
# the same Q/DQ graph, whose rounding of each requantization can differ by a step
DEFAULT_TOLERANCES = {"fp32": (1e-3, 1e-3), "fp16": (1e-2, 1e-2), "int8": (0.1, 0.1)}


@dataclass(frozen=True)
class OutputParity:
    name: str
    shape: tuple[int, ...]
    max_absdiff: float
    max_reldiff: float
    mean_absdiff: float
    median_absdiff: float
    mismatched: int  # elements outside atol + rtol * |reference|
    passed: bool
    top1_agreement: float | None = None  # for a [N, C] logits output


@dataclass(frozen=True)
class ParityReport:
    rtol: float
    atol: float
    batches: int
    outputs: list[OutputParity] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.outputs) and all(o.passed for o in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        return {"rtol": self.rtol, "atol": self.atol, "batches": self.batches,
                "passed": self.passed, "outputs": [asdict(o) for o in self.outputs]}

    def format(self) -> str:
        lines = [f"parity at rtol {self.rtol:g}, atol {self.atol:g} over {self.batches} "
                 f"batch(es): {'PASSED' if self.passed else 'FAILED'}"]
        for o in self.outputs:
            top1 = "" if o.top1_agreement is None else \
                f", top-1 agreement {100 * o.top1_agreement:.1f} %"
            lines.append(f"  {o.name} {list(o.shape)}: max abs {o.max_absdiff:.3g}, max rel "
                         f"{o.max_reldiff:.3g}, mean abs {o.mean_absdiff:.3g}, median abs "
                         f"{o.median_absdiff:.3g}, {o.mismatched} outside tolerance{top1} "
                         f"-> {'ok' if o.passed else 'MISMATCH'}")
        return "\n".join(lines)


def compare_outputs(name: str, candidate: np.ndarray, reference: np.ndarray, rtol: float,
                    atol: float, logits: bool = False) -> OutputParity:
    """One output of every batch, concatenated, against the reference's."""
    cand = np.asarray(candidate, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    if cand.shape != ref.shape:
        raise ModelLoadError(f"output {name!r} has shape {cand.shape} against the "
                             f"reference's {ref.shape}",
                             "the two models are not the same network: rebuild from one ONNX")
    absdiff = np.abs(cand - ref)
    reldiff = absdiff / np.maximum(np.abs(ref), np.finfo(np.float64).tiny)
    mismatched = int((absdiff > atol + rtol * np.abs(ref)).sum()) + \
        int((~np.isfinite(cand)).sum())
    top1 = None
    if logits and cand.ndim == 2 and len(cand):
        top1 = float((cand.argmax(1) == ref.argmax(1)).mean())
    empty = absdiff.size == 0
    return OutputParity(
        name=name, shape=tuple(cand.shape),
        max_absdiff=0.0 if empty else float(absdiff.max()),
        max_reldiff=0.0 if empty else float(reldiff.max()),
        mean_absdiff=0.0 if empty else float(absdiff.mean()),
        median_absdiff=0.0 if empty else float(np.median(absdiff)),
        mismatched=mismatched, passed=mismatched == 0, top1_agreement=top1)


def compare_runners(candidate: Any, reference: Any, batches: Sequence[Mapping[str, np.ndarray]],
                    *, rtol: float = 1e-3, atol: float = 1e-3,
                    logits_output: str = "logits") -> ParityReport:
    """Run ``batches`` (each ``{input name: array}``) through both active runners and
    compare every output the reference gives; the candidate must give them too."""
    if rtol < 0 or atol < 0:
        raise ConfigError(f"tolerances rtol={rtol}, atol={atol}", "use values >= 0")
    if not batches:
        raise ConfigError("no batches to compare", "pass at least one input batch")
    got: dict[str, list[np.ndarray]] = {}
    want: dict[str, list[np.ndarray]] = {}
    for feed in batches:
        ref_out, cand_out = reference.infer(dict(feed)), candidate.infer(dict(feed))
        missing = sorted(set(ref_out) - set(cand_out))
        if missing:
            raise ModelLoadError(f"the candidate does not give output(s) {missing}",
                                 "build it from the same ONNX as the reference")
        for name, value in ref_out.items():
            want.setdefault(name, []).append(np.asarray(value))
            got.setdefault(name, []).append(np.asarray(cand_out[name]))
    outputs = [compare_outputs(name, np.concatenate(got[name]), np.concatenate(want[name]),
                               rtol, atol, logits=name == logits_output)
               for name in want]
    return ParityReport(rtol=rtol, atol=atol, batches=len(batches), outputs=outputs)


def random_batches(input_name: str, size: int, *, batch: int = 8, count: int = 4,
                   seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Uniform [0, 1] float32 N x 3 x S x S batches (Polygraphy's default data loader also
    feeds uniform random inputs), seeded so a rerun compares the same data."""
    rng = np.random.default_rng(seed)
    return [{input_name: rng.random((batch, 3, size, size), dtype=np.float32)}
            for _ in range(count)]


def engine_parity(onnx_path: Any, engine_path: Any, *, max_batch: int = 8,
                  rtol: float = 1e-3, atol: float = 1e-3, count: int = 4,
                  seed: int = 0) -> ParityReport:
    """A TensorRT engine against ONNX Runtime (CPU) on the ONNX it was built from, on
    ``count`` seeded random batches of ``max_batch`` (the engine's largest batch)."""
    from edge_runtime.model_info import read_model_info
    from edge_runtime.runners.registry import create_runner

    info = read_model_info(onnx_path)
    batches = random_batches(info.input_name, info.input_size, batch=max_batch, count=count,
                             seed=seed)
    with create_runner("onnxruntime", onnx_path, providers=["CPUExecutionProvider"]) as ref, \
            create_runner("tensorrt", engine_path) as engine:
        return compare_runners(engine, ref, batches, rtol=rtol, atol=atol,
                               logits_output=info.output_name)
