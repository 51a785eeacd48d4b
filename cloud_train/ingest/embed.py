"""A learned feature space for the label-consistency screen, trained on trusted data only.

A small CNN (``cloud_train.models`` ``signnet_tiny``, about 48k parameters) is trained on the
fit part of the trusted reference (never on batch data), seeded, on the CPU: AdamW with a
one-cycle learning rate for ``epochs`` passes (more for a small reference, so at least
``min_steps`` batches), each image randomly zoomed (``1 +- scale``) and shifted (up to
``shift`` pixels, reflected border) so the features do not hinge on sign size or placement.
Its outputs feed the screen:

- the penultimate features (global-average-pooled, 64 per image), L2-normalised, for the kNN
  share of neighbours that carry the given label;
- the softmax, for the model's posterior of the given label.

Training takes seconds to a minute on 2 cores, so the weights are cached beside the
reference as a safetensors checkpoint (``cloud_train.checkpoint``; no pickles) together with
its sha256 and the digest of what it was trained on (``training_digest``); a cache whose
digest or file hash does not match is retrained, never trusted.

For ingest the network is also exported once to ONNX (``export_onnx``: uint8 NHWC images in,
normalised features and softmax out, batch-norm folded) and run with ONNX Runtime
(``Embedder``), which starts in about a tenth of a second where importing torch takes about
two; without onnxruntime the torch model is used (same outputs to float rounding).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from roadshield_base.errors import ConfigError, DatasetError, ModelLoadError
from roadshield_base.trust import canonical_json

EMBED_ARCH = "signnet_tiny"
EMBED_NAME = "embed.safetensors"
ONNX_NAME = "embed.onnx"
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedConfig:
    """How the embedding network is trained (part of the screening reference's config)."""

    epochs: int = 10
    min_steps: int = 150  # small references get more passes, so the net still learns
    lr: float = 0.01
    batch: int = 128
    shift: int = 3  # max random shift in pixels, both axes
    scale: float = 0.15  # random zoom in [1 - scale, 1 + scale]
    weight_decay: float = 5e-4
    seed: int = 0

    def check(self) -> None:
        if self.epochs < 1 or self.min_steps < 0 or self.batch < 8 or self.lr <= 0 \
                or self.shift < 0 or not 0 <= self.scale < 0.5:
            raise ConfigError(f"embedding config {self} is out of range",
                              "use epochs >= 1, min_steps >= 0, batch >= 8, lr > 0, "
                              "shift >= 0, 0 <= scale < 0.5")


def training_digest(images: np.ndarray, labels: np.ndarray, n_classes: int,
                    cfg: EmbedConfig) -> str:
    """sha256 naming exactly what the network is trained on and how."""
    h = hashlib.sha256(canonical_json({"arch": EMBED_ARCH, "n_classes": int(n_classes),
                                       "config": vars(cfg), "shape": list(images.shape)}))
    h.update(np.ascontiguousarray(images, np.uint8).tobytes())
    h.update(np.ascontiguousarray(labels, np.int64).tobytes())
    return h.hexdigest()


def _tensor(images: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


def _jitter(x: Any, cfg: EmbedConfig, gen: Any) -> Any:
    """Per-image random zoom and shift of a float N x 3 x H x W batch (bilinear, reflected)."""
    import torch
    import torch.nn.functional as F

    n, _, h, w = x.shape
    zoom = 1.0 / (1.0 - cfg.scale + 2 * cfg.scale * torch.rand(n, generator=gen))
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = zoom
    # affine_grid works in [-1, 1]: one pixel is 2 / side
    theta[:, 0, 2] = (2 * torch.rand(n, generator=gen) - 1) * cfg.shift * 2 / w
    theta[:, 1, 2] = (2 * torch.rand(n, generator=gen) - 1) * cfg.shift * 2 / h
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection",
                         align_corners=False)


def train_embedding(images: np.ndarray, labels: np.ndarray, n_classes: int,
                    cfg: EmbedConfig | None = None) -> Any:
    """Train the embedding CNN on n x 32 x 32 x 3 uint8 RGB images with int labels.

    Seeded: the global torch RNG is left as it was (``fork_rng``). Returns the model in
    eval mode on the CPU.
    """
    import torch
    import torch.nn.functional as F

    from cloud_train.models import create_model

    cfg = cfg or EmbedConfig()
    cfg.check()
    n = len(labels)
    if n < 2 or len(images) != n:
        raise DatasetError(f"cannot train the label screen on {len(images)} images and {n} "
                           "labels", "build the reference from at least a few images per class")
    # uint8 N x 3 x H x W view; each batch is converted to float on its own (memory)
    x = torch.from_numpy(np.ascontiguousarray(images, np.uint8)).permute(0, 3, 1, 2)
    y = torch.as_tensor(np.asarray(labels, np.int64))
    batch = min(cfg.batch, n)
    steps_per_epoch = max(1, n // batch)  # drop the ragged tail: no 1-sample BN batches
    epochs = max(cfg.epochs, -(-cfg.min_steps // steps_per_epoch))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        model = create_model(EMBED_ARCH, int(n_classes), input_size=32)
        opt = torch.optim.AdamW(model.parameters(), cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, cfg.lr, total_steps=epochs * steps_per_epoch, pct_start=0.25)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen)
            for k in range(steps_per_epoch):
                idx = order[k * batch:(k + 1) * batch]
                xb = x[idx].float() / 255.0
                if cfg.shift or cfg.scale:
                    xb = _jitter(xb, cfg, gen)
                loss = F.cross_entropy(model(xb), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return model.eval()


def for_inference(model: Any) -> Any:
    """A copy of the trained model for fast CPU inference: each conv + batch-norm pair folded
    into one conv (same outputs to float rounding), weights in channels-last layout."""
    import copy

    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    fast = copy.deepcopy(model).eval()
    for i, block in enumerate(fast.features):
        if isinstance(block, torch.nn.Sequential) and len(block) == 3 \
                and isinstance(block[0], torch.nn.Conv2d) \
                and isinstance(block[1], torch.nn.BatchNorm2d):
            fast.features[i] = torch.nn.Sequential(fuse_conv_bn_eval(block[0], block[1]),
                                                   block[2])
    return fast.to(memory_format=torch.channels_last)


def embed(model: Any, images: np.ndarray, batch: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """(L2-normalised penultimate features (n, 64) float32, softmax (n, C) float32) of
    n x 32 x 32 x 3 uint8 RGB images."""
    import torch

    feats, probs = [], []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            x = _tensor(images[i:i + batch]).contiguous(memory_format=torch.channels_last)
            f = model.pool(model.features(model.normalize(x))).flatten(1)
            probs.append(torch.softmax(model.head(f), dim=1).numpy())
            feats.append(torch.nn.functional.normalize(f, dim=1).numpy())
    if not feats:
        return np.zeros((0, 64), np.float32), np.zeros((0, model.num_classes), np.float32)
    return np.concatenate(feats), np.concatenate(probs)


def save_embedding(model: Any, path: str | os.PathLike[str], trained_on: str,
                   cfg: EmbedConfig) -> str:
    """Write the weights (atomic, safetensors); returns the file's sha256."""
    from cloud_train.checkpoint import save_checkpoint

    names = [str(c) for c in range(model.num_classes)]
    return save_checkpoint(model, Path(path), {"class_names": names, "train_config": vars(cfg),
                                         "trained_on": trained_on,
                                         "purpose": "ingest label-consistency screen"})


def load_embedding(path: str | os.PathLike[str], sha256: str | None,
                   trained_on: str) -> Any | None:
    """The cached model, or None (with a warning) when it is missing, altered or stale."""
    from cloud_train.checkpoint import load_checkpoint

    if not sha256 or not Path(path).is_file():
        return None
    try:
        model, meta = load_checkpoint(Path(path), expected_sha256=sha256)
    except ModelLoadError as err:
        _log.warning("retraining the screening embedding: %s", str(err).splitlines()[0])
        return None
    if meta.get("trained_on") != trained_on or meta.get("arch") != EMBED_ARCH:
        _log.warning("retraining the screening embedding: %s was trained on other data", path)
        return None
    return model


def export_onnx(model: Any) -> bytes:
    """The trained network as ONNX bytes: input ``images`` (n x 32 x 32 x 3 uint8 RGB), outputs
    ``features`` (n x 64, L2-normalised) and ``probs`` (n x C softmax), as ``embed``."""
    import io
    import warnings

    import torch

    class _Graph(torch.nn.Module):
        def __init__(self, net: Any) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: Any) -> Any:
            x = x.permute(0, 3, 1, 2).float() / 255.0
            f = self.net.pool(self.net.features(self.net.normalize(x))).flatten(1)
            return (torch.nn.functional.normalize(f, dim=1),
                    torch.softmax(self.net.head(f), dim=1))

    graph = _Graph(for_inference(model).to(memory_format=torch.contiguous_format)).eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(graph, (torch.zeros(2, 32, 32, 3, dtype=torch.uint8),), buf,
                          dynamo=False, opset_version=17, input_names=["images"],
                          output_names=["features", "probs"],
                          dynamic_axes={"images": {0: "n"}, "features": {0: "n"},
                                        "probs": {0: "n"}})
    return buf.getvalue()


def have_onnxruntime() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


# Images per ONNX Runtime call: small enough that a layer's activations stay in cache (about
# a sixth less CPU than 2,048 at once); each image's outputs are the same at any size.
_ORT_BATCH = 64


class Embedder:
    """Runs the embedding network on n x 32 x 32 x 3 uint8 RGB images: ``(features,
    probs)`` as ``embed``. ONNX Runtime on ``onnx_bytes`` when onnxruntime is installed,
    else the torch model ``model()`` returns (called only then)."""

    def __init__(self, onnx_bytes: bytes | None, model: Any) -> None:
        self._onnx, self._model_fn = onnx_bytes, model
        self._session: Any = None
        self._lock = threading.Lock()
        self._torch: Any = None
        self.engine = "onnxruntime" if onnx_bytes and have_onnxruntime() else "torch"

    def ready(self) -> None:
        """Build the ONNX Runtime session now (the torch model loads on first use)."""
        if self.engine == "onnxruntime" and self._session is None:
            with self._lock:  # one session, whichever thread asks first
                if self._session is None:
                    self._session = self._new_session()

    def _new_session(self) -> Any:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.inter_op_num_threads = 1
        # one thread: the gate runs the network beside its other screens, one per core, and
        # a second thread gains this small network nothing (the outputs are the same)
        opts.intra_op_num_threads = 1
        # no busy-waiting between ops: on a shared 2-core machine spinning threads
        # steal the cores the rest of the gate needs
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        return ort.InferenceSession(self._onnx, opts, providers=["CPUExecutionProvider"])

    def __call__(self, images: np.ndarray, batch: int = 2048) -> tuple[np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(images, np.uint8)
        if self.engine == "torch":
            if self._torch is None:
                self._torch = for_inference(self._model_fn())
            return embed(self._torch, x, batch)
        self.ready()
        if not len(x):
            n_out = self._session.get_outputs()[1].shape[1]
            return np.zeros((0, 64), np.float32), np.zeros((0, n_out), np.float32)
        step = min(batch, _ORT_BATCH)
        parts = [self._session.run(None, {"images": x[i:i + step]})
                 for i in range(0, len(x), step)]
        return (np.concatenate([p[0] for p in parts]).astype(np.float32),
                np.concatenate([p[1] for p in parts]).astype(np.float32))
