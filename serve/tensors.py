"""The v2 JSON tensor format: parse and check an inference request, build the answer.

Request (KServe v2 / Open Inference Protocol, JSON only)::

    {"id": "optional, <= 128 chars, unique per key (replay refusal)",
     "inputs": [{"name": "<model input>", "shape": [N, 3, S, S], "datatype": "FP32",
                 "data": [N*3*S*S numbers in [0, 1], flat or nested row-major]}],
     "outputs": [{"name": "label"}, ...]}      # optional: a subset of the policy's outputs

Anything else is a BadRequest (status 400, or 413 for size) whose reason says what was
wrong; nothing of it is counted against the key.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_ID_CHARS = 128


class BadRequest(Exception):
    """A refused request: ``status`` (4xx) and a ``reason`` for the client."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass(frozen=True)
class InferRequest:
    """A checked request: images float32 [N, 3, S, S] in [0, 1]; outputs None = all."""

    images: np.ndarray
    request_id: str | None
    outputs: tuple[str, ...] | None


def _reject_constant(name: str) -> float:
    raise BadRequest(f"malformed JSON: {name} is not a number (NaN and Infinity are refused)")


def parse_infer_request(body: bytes, *, input_name: str, size: int,
                        max_batch: int) -> InferRequest:
    """Parse and check ``body``; BadRequest naming the first problem found."""
    try:
        doc = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as err:
        raise BadRequest(f"body is not UTF-8 JSON: {err.reason} at byte {err.start}") from err
    except json.JSONDecodeError as err:
        raise BadRequest(f"malformed JSON: {err.msg} at line {err.lineno} column "
                         f"{err.colno} (a truncated body ends like this)") from err
    except RecursionError as err:
        raise BadRequest("malformed JSON: nested too deeply") from err
    if not isinstance(doc, dict):
        raise BadRequest("the body must be a JSON object with \"inputs\"")
    request_id = doc.get("id")
    if request_id is not None and (not isinstance(request_id, str)
                                   or len(request_id) > MAX_ID_CHARS):
        raise BadRequest(f"\"id\" must be a string of at most {MAX_ID_CHARS} characters")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadRequest(f"\"inputs\" must be a list of exactly one tensor named {input_name!r}")
    tensor = inputs[0]
    if tensor.get("name") != input_name:
        raise BadRequest(f"input tensor is named {tensor.get('name')!r}, the model's input is "
                         f"{input_name!r}")
    params = tensor.get("parameters")
    if isinstance(params, dict) and "binary_data_size" in params:
        raise BadRequest("the binary tensor extension is not supported; send \"data\" as JSON "
                         "(tritonclient: set_data_from_numpy(x, binary_data=False))")
    if tensor.get("datatype") != "FP32":
        raise BadRequest(f"input datatype is {tensor.get('datatype')!r}, expected \"FP32\"")
    shape = tensor.get("shape")
    if (not isinstance(shape, list) or len(shape) != 4
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)):
        raise BadRequest(f"input shape must be 4 integers [N, 3, {size}, {size}], got {shape!r}")
    n = shape[0]
    if list(shape[1:]) != [3, size, size] or not 1 <= n <= max_batch:
        raise BadRequest(f"input shape {shape} is not [N, 3, {size}, {size}] with 1 <= N <= "
                         f"{max_batch}")
    data = tensor.get("data")
    if not isinstance(data, list):
        raise BadRequest("input \"data\" must be a JSON list of numbers")
    try:
        array = np.asarray(data, dtype=np.float32)
    except (ValueError, TypeError) as err:
        raise BadRequest("input \"data\" must hold numbers only, in a flat or regular nested "
                         "list") from err
    expected = n * 3 * size * size
    if array.size != expected:
        raise BadRequest(f"input \"data\" holds {array.size} values; shape {shape} needs "
                         f"{expected}")
    if not np.isfinite(array).all():
        raise BadRequest("input \"data\" holds a non-finite value (NaN, Infinity or a number "
                         "beyond float32)")
    if array.min() < 0.0 or array.max() > 1.0:
        raise BadRequest("input values must lie in [0, 1] (float32 RGB, as the model takes)")
    outputs = doc.get("outputs")
    names: tuple[str, ...] | None = None
    if outputs is not None:
        if not isinstance(outputs, list) or not all(
                isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs):
            raise BadRequest("\"outputs\" must be a list of {\"name\": ...} objects")
        names = tuple(o["name"] for o in outputs)
    return InferRequest(array.reshape(n, 3, size, size), request_id, names)


def tensor(name: str, datatype: str, values: np.ndarray | Sequence[Any]) -> dict[str, Any]:
    """One v2 output tensor (row-major flat data)."""
    array = np.asarray(values)
    data: list[Any]
    if datatype == "BYTES":
        data = [str(v) for v in array.reshape(-1)]
    else:
        data = [float(v) if math.isfinite(float(v)) else 0.0 for v in array.reshape(-1)]
    return {"name": name, "datatype": datatype, "shape": list(array.shape), "data": data}
