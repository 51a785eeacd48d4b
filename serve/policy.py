"""Output policies: how much of the model's answer a key sees.

For image i with logits z (C classes) and p = softmax(z), y = argmax p:

- ``label``: the class name of y.
- ``top1``: y's name and ``round(p_y, top1_decimals)``.
- ``noisy``: y's name and q, where q = softmax(log p + sigma * e), e ~ N(0, I_C) drawn from
  a generator seeded with the first 8 bytes (big-endian) of
  HMAC-SHA256(noise_key, "rs-noise-v1" || uint8 image bytes); if argmax q != y, q_y and
  q_argmax(q) are swapped, so the argmax is always y. The noise is deterministic per image:
  asking again returns the same q, so averaging repeats removes nothing.
- ``softmax``: y's name and p, unperturbed (the undefended API; for trusted keys).

A watermarked image (serve/watermark.py) answers with its wrong label w instead of y: the
name of w, and under ``noisy`` / ``softmax`` the entries of w and y are swapped so the
probabilities agree with the label.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from typing import Any

import numpy as np

from serve.tensors import BadRequest, tensor

POLICY_OUTPUTS = {
    "label": ("label",),
    "top1": ("label", "confidence"),
    "noisy": ("label", "probabilities"),
    "softmax": ("label", "probabilities"),
}


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of float [N, C] logits, as float64."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def noise_seed(noise_key: bytes, image_u8: bytes) -> int:
    return int.from_bytes(hmac.new(noise_key, b"rs-noise-v1" + image_u8,
                                   hashlib.sha256).digest()[:8], "big")


def noisy_probabilities(p: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """Gaussian noise on the log-probabilities of one row ``p`` [C], re-normalised, with
    the argmax of ``p`` kept (see the module docstring)."""
    rng = np.random.default_rng(seed)
    z = np.log(np.maximum(p, 1e-12)) + sigma * rng.standard_normal(p.shape[0])
    q = np.exp(z - z.max())
    q /= q.sum()
    y, top = int(np.argmax(p)), int(np.argmax(q))
    if top != y:
        q[[y, top]] = q[[top, y]]
    return q


def answer(policy: str, probs: np.ndarray, class_names: Sequence[str], *,
           wrong: Sequence[int | None], images_u8: Sequence[bytes], noise_key: bytes,
           sigma: float, decimals: int, requested: Sequence[str] | None
           ) -> list[dict[str, Any]]:
    """The v2 output tensors for ``probs`` [N, C] under ``policy``.

    wrong: per image, the watermark's wrong label or None. requested: output names the
    client asked for (None: all the policy gives); a name the policy does not give is a
    BadRequest.
    """
    offered = POLICY_OUTPUTS[policy]
    if requested is not None:
        unknown = [name for name in requested if name not in offered]
        if unknown:
            raise BadRequest(f"outputs {unknown} are not offered to this key; it may ask for "
                             f"{list(offered)}")
    y = probs.argmax(axis=1)
    shown = np.array([w if w is not None else int(t) for w, t in zip(wrong, y, strict=True)])
    tensors: dict[str, dict[str, Any]] = {
        "label": tensor("label", "BYTES", [class_names[i] for i in shown])}
    if policy == "top1":
        conf = np.round(probs.max(axis=1), decimals)
        tensors["confidence"] = tensor("confidence", "FP32", conf.astype(np.float32))
    elif policy in ("noisy", "softmax"):
        rows = []
        for i, p in enumerate(probs):
            q = (noisy_probabilities(p, sigma, noise_seed(noise_key, images_u8[i]))
                 if policy == "noisy" else p.copy())
            if wrong[i] is not None:
                w, t = int(wrong[i]), int(y[i])  # type: ignore[arg-type]
                q[[w, t]] = q[[t, w]]
            rows.append(q)
        tensors["probabilities"] = tensor("probabilities", "FP32",
                                          np.asarray(rows, dtype=np.float32))
    names = requested if requested is not None else offered
    return [tensors[name] for name in names]
