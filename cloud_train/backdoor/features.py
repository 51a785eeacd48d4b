"""Penultimate-layer activations: the representation backdoor scans look at.

"Penultimate" means the input of the model's last ``nn.Linear`` (the classifier layer), caught
with a forward hook, so it works for any model whose logits come from a final linear layer.
For ``SignNet`` that is the pooled features after the hidden layer's ReLU (``signnet``:
128 values) or the global-average-pooled convolution features (``signnet_tiny``: 64 values).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cloud_train.attacks import eval_mode
from cloud_train.tensors import check_arrays, to_tensor
from roadshield_base.errors import ConfigError


def last_linear(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` in ``model.modules()`` order (ConfigError when there is none)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"{type(model).__name__} has no nn.Linear layer",
                          "penultimate features need a model whose logits come from nn.Linear")
    return linears[-1]


def penultimate(model: nn.Module, x: torch.Tensor | np.ndarray,
                batch_size: int = 256) -> torch.Tensor:
    """Activations feeding the last ``nn.Linear``: float32 ``N x D`` on the CPU.

    x: float32 ``N x 3 x H x W`` RGB in [0, 1] (a uint8 NHWC RGB array is converted). The
    model runs in eval mode (dropout off, batch-norm running statistics) on its own device,
    and its training flags are restored afterwards.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}", "use e.g. 256")
    xt = to_tensor(x)
    layer = last_linear(model)
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    caught: list[torch.Tensor] = []

    def hook(_m: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        caught.append(inputs[0].detach().flatten(1).float().cpu())

    handle = layer.register_forward_pre_hook(hook)
    try:
        with eval_mode(model), torch.no_grad():
            for i in range(0, len(xt), batch_size):
                model(xt[i:i + batch_size].to(device))
    finally:
        handle.remove()
    if not caught:
        return torch.empty(0, layer.in_features)
    return torch.cat(caught)


def dataset_features(model: nn.Module, images: np.ndarray, labels: np.ndarray,
                     features: torch.Tensor | np.ndarray | None = None,
                     batch_size: int = 256) -> np.ndarray:
    """Penultimate activations of a uint8 N x H x W x 3 RGB set as float64 N x D.

    Computed with :func:`penultimate` unless ``features`` (N x D) is given, in which case only
    its shape is checked; the scans take it so that one pass serves several of them.
    """
    check_arrays(images, labels)
    if features is None:
        features = penultimate(model, to_tensor(images), batch_size)
    feats = features.numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    if feats.ndim != 2 or len(feats) != len(images):
        raise ConfigError(f"features must be N x D with N = {len(images)}, got "
                          f"{feats.shape}", "compute them with backdoor.features.penultimate")
    return feats.astype(np.float64)


def robust_whiten(feats: np.ndarray, n_components: int = 10, seed: int = 0,
                  support_fraction: float | None = None) -> np.ndarray:
    """Reduce one class's activations (n x D float) to ``n_components`` with PCA, then whiten
    them with a robust covariance estimate (minimum covariance determinant), as SPECTRE does
    (Hayase et al. 2021): the clean majority becomes an isotropic cloud, so a small group of
    poisoned examples stands out along its own direction however little variance it adds.
    Returns float64 n x k (k <= n_components, limited by the data's numerical rank and by
    n / 2); falls back to the ordinary covariance when the robust estimate is singular or the
    class is too small for it. ``support_fraction``: share of the rows the robust estimate
    rests on (None: scikit-learn's default, about half, which tolerates the most poison).
    """
    import warnings

    from sklearn.covariance import MinCovDet
    from sklearn.decomposition import PCA

    centred = feats - feats.mean(axis=0, keepdims=True)
    centred = centred[:, centred.std(axis=0) > 1e-8]  # dead units carry nothing
    if centred.shape[1] == 0 or len(centred) < 3:
        return np.zeros((len(feats), 1))
    s = np.linalg.svd(centred, compute_uv=False)
    rank = int((s > 1e-6 * s[0]).sum()) if s[0] > 0 else 0
    k = max(1, min(n_components, rank, len(centred) // 2 - 1))
    z = PCA(n_components=k, random_state=seed).fit_transform(centred)
    loc, cov = z.mean(axis=0), np.cov(z, rowvar=False).reshape(k, k)
    if len(z) > 2 * k + 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MCD warns when the support is near singular
            try:
                mcd = MinCovDet(random_state=seed, support_fraction=support_fraction).fit(z)
                loc, cov = mcd.location_, mcd.covariance_
            except (ValueError, np.linalg.LinAlgError):
                pass
    evals, evecs = np.linalg.eigh(cov)
    if evals.min() <= 1e-10 * max(evals.max(), 1e-300):
        loc, cov = z.mean(axis=0), np.cov(z, rowvar=False).reshape(k, k)
        evals, evecs = np.linalg.eigh(cov)
    return (z - loc) @ evecs / np.sqrt(np.maximum(evals, 1e-12))
