"""The final evaluation: open the sealed held-out set once for a model and keep the evidence.

``evaluate_sealed`` checks everything it can before the set is opened (the checkpoint loads,
its class list matches the sealed manifest, the log key loads, the output folder is
writable), because an opening is used up once logged. It then calls ``open_sealed`` (which
refuses a second opening for the same model digest unless forced, and logs every attempt),
predicts every sealed image, and writes into ``out_dir``:

- ``predictions.json``: per sample id, label and prediction (``audit.write_predictions``);
- ``metrics.json``: accuracy, macro recall, macro F1, per-class accuracy (from those
  predictions), clean / FGSM / PGD accuracy from ``cloud_train.evaluate.evaluate``, the
  predictions' and model's sha256, and the opening log's head digest after this opening.

``roadshield data audit predictions.json metrics.json`` recomputes the metrics from the
predictions on its own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from roadshield_base.errors import ConfigError, DatasetError

LOG_NAME = "openings.jsonl"


def _manifest(sealed_dir: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((sealed_dir / "manifest.json").read_text()))
    except (OSError, ValueError, TypeError) as err:
        raise DatasetError(f"cannot read {sealed_dir / 'manifest.json'}: {err}",
                           "point at a folder written by `roadshield data seal`") from err


def _resize(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """N x H x W x 3 uint8 RGB to N x size x 3 with cv2.INTER_AREA (as load_gtsrb does)."""
    if images.shape[1:3] == size:
        return images
    import cv2

    return np.stack([cv2.resize(im, (size[1], size[0]), interpolation=cv2.INTER_AREA)
                     for im in images])


def predict(model: Any, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Arg-max class (int64, N) of ``model`` on N x H x W x 3 uint8 RGB images (CPU)."""
    import torch

    from cloud_train.tensors import to_tensor

    out = []
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            out.append(model(to_tensor(images[i:i + batch_size])).argmax(1).numpy())
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


def evaluate_sealed(sealed_dir: str | os.PathLike[str], key_path: str | os.PathLike[str],
                    checkpoint: str | os.PathLike[str], log_key: str | os.PathLike[str],
                    out_dir: str | os.PathLike[str], log: str | os.PathLike[str] | None = None,
                    force: bool = False, eps: float = 8 / 255, pgd_steps: int = 10
                    ) -> dict[str, Any]:
    """Open the sealed set for ``checkpoint``'s digest, evaluate, write the evidence.

    key_path: the AES key file (mode 0600); log_key: the Ed25519 private key (PEM) that signs
    the opening log; log: the log file (default ``<sealed_dir>/openings.jsonl``). Returns
    the metrics written to ``out_dir/metrics.json`` (see the module doc). A second opening
    for the same model raises ``SealedSetError`` unless ``force`` (logged either way).
    """
    from cloud_train.checkpoint import load_checkpoint
    from cloud_train.evaluate import evaluate
    from cloud_train.splits.audit import compute_metrics, write_metrics, write_predictions
    from cloud_train.splits.sealed import load_key, log_head, open_sealed
    from roadshield_base.trust import load_private_key

    sealed, out = Path(sealed_dir), Path(out_dir)
    log_path = Path(log) if log is not None else sealed / LOG_NAME
    model, meta = load_checkpoint(Path(checkpoint))
    names = list(meta["class_names"])
    sealed_names = _manifest(sealed).get("class_names")
    if sealed_names is not None and list(sealed_names) != names:
        raise ConfigError(f"checkpoint {checkpoint} predicts {len(names)} classes "
                          f"({names[:3]}...) but the sealed set {sealed} is labelled with "
                          f"{len(sealed_names)} ({list(sealed_names)[:3]}...)",
                          "evaluate a model trained on the same class list; the set was not "
                          "opened")
    aes_key, signer = load_key(key_path), load_private_key(log_key)
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise ConfigError(f"cannot write to {out}", "choose a writable --out; the set was "
                          "not opened")
    data = open_sealed(sealed, aes_key, meta["sha256"], log_path, signer, force=force)
    images = _resize(np.asarray(data.images, np.uint8), tuple(meta["input_size"][1:]))
    preds = predict(model, images)
    pred_path = out / "predictions.json"
    labels = [int(v) for v in data.labels]
    write_predictions(pred_path, data.ids, labels, preds.tolist(), meta["sha256"], len(names))
    metrics = compute_metrics(labels, preds.tolist(), len(names))
    robust = evaluate(model, images, data.labels, eps=eps, pgd_steps=pgd_steps)
    metrics.update({k: robust[k] for k in ("clean_acc", "fgsm_acc", "pgd_acc", "eps",
                                           "pgd_steps")})
    metrics.update({"checkpoint": str(checkpoint), "sealed_dir": str(sealed),
                    "sealed_manifest_sha256": _manifest_digest(sealed),
                    "opening_log": str(log_path), "opening_log_head": log_head(log_path),
                    "forced": bool(force)})
    return write_metrics(out / "metrics.json", pred_path, metrics)


def _manifest_digest(sealed: Path) -> str:
    from roadshield_base.trust import canonical_json, sha256_hex

    return sha256_hex(canonical_json(_manifest(sealed)))
