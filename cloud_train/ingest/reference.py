"""The trusted screening reference and the per-sample and per-batch screens fitted on it.

The reference is a set of trusted, labelled n x 32 x 32 x 3 uint8 RGB images. A seeded fifth
is held out for calibration; on the rest the gate fits:

- from the hand-made features (``screens.image_features``, z-scored, PCA): an Isolation
  Forest (OUTLIER), a per-statistic range (OUT_OF_RANGE) and, per batch, a KS test on the
  first principal components (BATCH_DISTRIBUTION_SHIFT);
- a learned feature space (``embed``: a small CNN trained on these images only) for label
  consistency (LABEL_INCONSISTENT), confident-learning style: the agreement of a sample with
  its given label is the mean of the share of its k nearest reference neighbours (cosine, in
  the penultimate features) that carry that label and the network's softmax posterior of it.

- per batch and class, the residual-spectrum trigger screen (``batch_screens``:
  TRIGGER_CLUSTER), its null calibrated on the reference's own images.

Thresholds are calibrated on the held-out fifth to target false-quarantine rates.

On disk (``save`` / ``load``): ``images.npy``, ``labels.npy``, ``embed.safetensors`` (the
network), ``embed.onnx`` (the same network for ONNX Runtime), ``screens.npz`` (everything
fitted: z-scoring, PCA, the Isolation Forest's trees as arrays (``forest``), ranges,
thresholds, the fit part's embeddings, the trigger screen's null) and ``reference.json``
(class count, config, every file's sha256, the embedding's training digest, and the digest
of what ``screens.npz`` was fitted from). ``load`` checks every hash and, when the fitted
state matches, restores it without refitting and without importing torch or scikit-learn;
otherwise it refits with fixed seeds and rewrites the cache. No pickles.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from cloud_train.ingest import forest
from cloud_train.ingest.batch_screens import (
    TriggerScreen,
    TriggerScreenConfig,
    calibrate,
    single_thread_native,
)
from cloud_train.ingest.embed import (
    EMBED_NAME,
    ONNX_NAME,
    EmbedConfig,
    Embedder,
    export_onnx,
    have_onnxruntime,
    load_embedding,
    save_embedding,
    train_embedding,
    training_digest,
)
from cloud_train.ingest.screens import (
    FEATURE_SIDE,
    N_STATS,
    image_features,
    ks_2samp,
    ks_2samp_weighted,
)
from roadshield_base.errors import DatasetError
from roadshield_base.fileio import atomic_write_bytes, atomic_write_json
from roadshield_base.trust import canonical_json, sha256_hex

_REBUILD = "rebuild it with `roadshield data reference --store STORE` (build_reference())"
DERIVED_NAME = "screens.npz"
DERIVED_VERSION = 1  # bump when what screens.npz holds, or how it is fitted, changes
_STATE = ("mu", "sd", "pcs", "ref_proj", "lo", "hi", "fit_emb", "fit_labels")


@dataclass
class ScreenConfig:
    target_fp: float = 0.001    # Isolation Forest, on held-out reference samples
    label_fp: float = 0.002     # label-consistency screen, on held-out reference samples
    k: int = 20                 # neighbours in the learned feature space
    n_components: int = 128     # PCA of the hand-made features (Isolation Forest, KS)
    range_q: float = 0.0005     # per-stat two-sided range screen quantile
    ks_alpha: float = 1e-3      # family-wise, Bonferroni over features
    ks_min_effect: float = 0.2  # a batch shift must also be large to quarantine a batch
    ks_features: int = 16       # KS on the first principal components
    seed: int = 0
    embed_epochs: int = 10      # the label screen's CNN (see ``embed.EmbedConfig``)
    embed_min_steps: int = 150
    embed_lr: float = 0.01
    embed_batch: int = 128
    embed_shift: int = 3
    embed_scale: float = 0.15
    trigger_margin: float = 1.5   # the trigger screen (``batch_screens.TriggerScreenConfig``)
    trigger_z: float = 4.0
    trigger_min_class: int = 8
    trigger_max_ref: int = 256

    def trigger_config(self) -> TriggerScreenConfig:
        return TriggerScreenConfig(margin=self.trigger_margin, z_min=self.trigger_z,
                                   min_class=self.trigger_min_class,
                                   max_ref=self.trigger_max_ref, seed=self.seed)

    def embed_config(self) -> EmbedConfig:
        return EmbedConfig(epochs=self.embed_epochs, min_steps=self.embed_min_steps,
                           lr=self.embed_lr, batch=self.embed_batch, shift=self.embed_shift,
                           scale=self.embed_scale, seed=self.seed)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScreenConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _check_images(images: np.ndarray) -> np.ndarray:
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[1:] != (FEATURE_SIDE, FEATURE_SIDE, 3) or x.dtype != np.uint8:
        raise DatasetError(f"the reference needs n x 32 x 32 x 3 uint8 RGB images, got "
                           f"{x.shape} {x.dtype}", "resize with screens.to_feature_size() first")
    return x


class Reference:
    """Trusted images + labels and the screens fitted on them (see the module doc).

    ``images``: (n, 32, 32, 3) uint8 RGB; ``labels``: (n,) class indices. ``embedding``: an
    already trained label-screen CNN for exactly these images and config (else one is
    trained). ``features`` is (n, 859) float32 from ``image_features``.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, n_classes: int,
                 config: ScreenConfig | None = None, embedding: Any = None) -> None:
        from sklearn.ensemble import IsolationForest

        self.images = _check_images(images)
        self.labels = np.asarray(labels, np.int64)
        if len(self.labels) != len(self.images):
            raise DatasetError(f"{len(self.images)} reference images, {len(self.labels)} labels",
                               "give one label per image")
        self.n_classes = int(n_classes)
        self.cfg = config or ScreenConfig()
        self._features: np.ndarray | None = image_features(self.images)
        hold = self._hold()
        fit_x, fit_y = self.features[~hold], self.labels[~hold]
        self.mu = fit_x.mean(axis=0)
        self.sd = fit_x.std(axis=0) + 1e-3
        z = self._z(fit_x)
        _, vecs = np.linalg.eigh(z.T @ z)  # PCA via the covariance: cheap for D ~ 900
        self.pcs = np.ascontiguousarray(vecs[:, ::-1][:, : self.cfg.n_components])
        self.ref_proj = (z @ self.pcs)[:, : self.cfg.ks_features]
        self.forest = forest.to_arrays(
            IsolationForest(n_estimators=100, random_state=self.cfg.seed).fit(z))
        stats = fit_x[:, -N_STATS:]
        self.lo = np.quantile(stats, self.cfg.range_q, axis=0)
        self.hi = np.quantile(stats, 1 - self.cfg.range_q, axis=0)

        ecfg = self.cfg.embed_config()
        self.embed_digest = training_digest(self.images[~hold], fit_y, self.n_classes, ecfg)
        self.embed_trained = embedding is None
        self._embedding = (embedding if embedding is not None else
                           train_embedding(self.images[~hold], fit_y, self.n_classes, ecfg))
        self.onnx = export_onnx(self._embedding) if have_onnxruntime() else None
        self._embed = Embedder(self.onnx, lambda: self._embedding)
        self.fit_emb, _ = self._embed(self.images[~hold])
        self._fit_pad: np.ndarray | None = None
        self.fit_labels = fit_y

        held_x, held_y = self.features[hold], self.labels[hold]
        self.if_threshold = float(np.quantile(forest.score_samples(self.forest,
                                                                   self._z(held_x)),
                                              self.cfg.target_fp))
        self.label_threshold = float(np.quantile(
            self.label_scores(self.images[hold], held_y), self.cfg.label_fp))
        try:
            self.trigger_null = calibrate(self.images, self.labels, self.cfg.trigger_config())
        except DatasetError:
            self.trigger_null = {"k": None, "points": [], "skipped": _TOO_SMALL}
        self._trigger: TriggerScreen | None = None
        self._folder: Path | None = None
        self._meta_embed_sha256: str | None = None

    def _hold(self) -> np.ndarray:
        """The seeded held-out fifth (calibration), the same at every fit and load."""
        return np.random.default_rng(self.cfg.seed).random(len(self.labels)) < 0.2

    @property
    def features(self) -> np.ndarray:
        """(n, 859) hand features of the reference images (computed when first asked for
        after a cached load)."""
        if self._features is None:
            self._features = image_features(self.images)
        return self._features

    @property
    def embedding(self) -> Any:
        """The label screen's torch model (after a cached load, read from
        ``embed.safetensors`` when first asked for)."""
        if self._embedding is None:
            if self._folder is None:
                raise DatasetError("this reference has no embedding model", _REBUILD)
            model = load_embedding(self._folder / EMBED_NAME, self._meta_embed_sha256,
                                   self.embed_digest)
            if model is None:
                raise DatasetError(f"the embedding in {self._folder} no longer matches its "
                                   "reference", _REBUILD)
            self._embedding = model
        return self._embedding

    @property
    def trigger(self) -> TriggerScreen:
        """The batch trigger screen on these images (``batch_screens``)."""
        if self._trigger is None:
            self._trigger = TriggerScreen(self.images, self.labels, self.trigger_null["k"],
                                          self.cfg.trigger_config())
        return self._trigger

    def _z(self, feats: np.ndarray) -> np.ndarray:
        return (np.asarray(feats, np.float32) - self.mu) / self.sd

    def embed_ready(self) -> None:
        """Start the label screen's network (import its runtime, build the session) ahead
        of the first ``embed``."""
        self._embed.ready()

    def embed(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(features, softmax) of the label screen's network for n x 32 x 32 x 3 uint8 RGB
        images (``embed.Embedder``)."""
        return self._embed(_check_images(images))

    def label_scores(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Agreement with the given label in [0, 1] per image: the mean of the kNN share
        and the CNN posterior (n x 32 x 32 x 3 uint8 RGB images, n labels)."""
        labels = np.asarray(labels, np.int64)
        if not len(labels):
            return np.zeros(0)
        emb, post = self.embed(images)
        with single_thread_native():  # one small matmul: extra threads only wait
            share = (self.fit_labels[self._neighbours(emb)] == labels[:, None]).mean(axis=1)
        ok = (labels >= 0) & (labels < post.shape[1])
        p = np.where(ok, post[np.arange(len(labels)), labels.clip(0, post.shape[1] - 1)], 0.0)
        return 0.5 * share + 0.5 * p

    def _neighbours(self, emb: np.ndarray, chunk: int = 256, block: int = 32) -> np.ndarray:
        """Indices (n, k) of the k most cosine-similar fit samples (unit vectors: a matmul).

        Exact, in two steps: the fit samples in blocks of ``block``; every one of a row's k
        best lies in one of the k blocks with the highest maxima, so only those blocks are
        searched (about a tenth of the work of a full partial sort). Batch rows go in
        chunks of ``chunk``, so each chunk's similarities (a few MB) stay in cache."""
        k = min(self.cfg.k, len(self.fit_labels))
        n_fit = len(self.fit_emb)
        nb = -(-n_fit // block)
        if nb <= k:
            block, nb = n_fit, 1  # too few blocks to gain anything: one partial sort
        fit = self._padded_fit(nb * block)  # whole blocks; the padding scores -inf
        out = []
        for i in range(0, len(emb), chunk):
            sims = emb[i:i + chunk] @ fit.T
            sims[:, n_fit:] = -np.inf
            if nb == 1:
                out.append(np.argpartition(-sims, k - 1, axis=1)[:, :k])
                continue
            tiles = sims.reshape(len(sims), nb, block)
            best = np.argpartition(-tiles.max(axis=2), k - 1, axis=1)[:, :k]
            cand = np.take_along_axis(tiles, best[:, :, None], axis=1).reshape(len(sims), -1)
            top = np.argpartition(-cand, k - 1, axis=1)[:, :k]
            out.append(best[np.arange(len(sims))[:, None], top // block] * block + top % block)
        return np.concatenate(out) if out else np.zeros((0, k), np.int64)

    def _padded_fit(self, rows: int) -> np.ndarray:
        """The fit embeddings padded with zero rows to ``rows``, made once (the gate asks
        for neighbours chunk by chunk)."""
        fit = self._fit_pad
        if fit is None or len(fit) != rows:
            fit = np.zeros((rows, self.fit_emb.shape[1]), np.float32)
            fit[:len(self.fit_emb)] = self.fit_emb
            self._fit_pad = fit
        return fit

    def batch_shift(self, feats: np.ndarray, labels: np.ndarray | None = None
                    ) -> dict[str, Any]:
        """KS per principal component, batch vs reference; 'shifted' if significant and large.

        With ``labels`` the test is class-conditional: the reference is weighted to the
        batch's own class mix (each reference sample of class c by share_batch(c) /
        n_reference(c)), so a batch of one class (a camera that sees only stop signs) is
        compared with that class, not with the mixture of all classes. Batch samples of a
        class the reference lacks are left out of this test (their labels are screened).
        """
        proj = (self._z(feats) @ self.pcs)[:, : self.cfg.ks_features]
        weights = None
        if labels is not None:
            labels = np.asarray(labels, np.int64)
            ref_counts = np.bincount(self.fit_labels, minlength=self.n_classes)
            known = (labels >= 0) & (labels < len(ref_counts))
            known[known] = ref_counts[labels[known]] > 0
            proj, labels = proj[known], labels[known]
            share = np.bincount(labels, minlength=len(ref_counts)) / max(len(labels), 1)
            weights = share[self.fit_labels] / np.maximum(ref_counts[self.fit_labels], 1)
        worst_d, worst_p, worst_j = 0.0, 1.0, -1
        for j in range(proj.shape[1]):
            d, p = (ks_2samp(proj[:, j], self.ref_proj[:, j]) if weights is None else
                    ks_2samp_weighted(proj[:, j], self.ref_proj[:, j], weights))
            if d > worst_d:
                worst_d, worst_p, worst_j = d, p, j
        alpha = self.cfg.ks_alpha / max(proj.shape[1], 1)
        shifted = len(proj) >= 20 and worst_p < alpha and worst_d >= self.cfg.ks_min_effect
        return {"shifted": bool(shifted), "max_ks": round(worst_d, 4), "p": worst_p,
                "feature": f"pc{worst_j}", "class_conditional": weights is not None}

    def sample_flags(self, feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(OUTLIER, OUT_OF_RANGE) per sample from its ``image_features``: the Isolation
        Forest's score under its threshold; a global statistic outside the reference's
        range (with a 5 % margin). Each sample is judged alone, so chunks of a batch give
        the same flags as the whole."""
        if not len(feats):
            return np.zeros(0, bool), np.zeros(0, bool)
        iso = forest.score_samples(self.forest, self._z(feats))
        stats = feats[:, -N_STATS:]
        span = self.hi - self.lo
        outside = (stats < self.lo - 0.05 * span) | (stats > self.hi + 0.05 * span)
        return iso < self.if_threshold, np.asarray(outside.any(axis=1))

    def reasons(self, outlier: np.ndarray, off: np.ndarray, scores: np.ndarray
                ) -> list[list[str]]:
        """Reason codes per sample from ``sample_flags`` and ``label_scores``."""
        out: list[list[str]] = []
        for o, r, a in zip(outlier.tolist(), off.tolist(), np.asarray(scores).tolist(),
                           strict=True):
            out.append((["OUTLIER"] if o else []) + (["OUT_OF_RANGE"] if r else [])
                       + (["LABEL_INCONSISTENT"] if a < self.label_threshold or a == 0.0
                          else []))
        return out

    def screen(self, feats: np.ndarray, labels: np.ndarray, images: np.ndarray
               ) -> list[list[str]]:
        """Reason codes per sample: OUTLIER (Isolation Forest), OUT_OF_RANGE (global stats
        outside the reference's range), LABEL_INCONSISTENT (learned neighbours and posterior
        disagree with the label). ``feats`` from ``image_features(images)``."""
        if not len(labels):
            return []
        return self.reasons(*self.sample_flags(feats), self.label_scores(images, labels))

    def prepare_trigger(self, labels: np.ndarray) -> None:
        """Compute the reference side of the trigger screen for a batch with these labels
        ahead of it (``TriggerScreen.prepare``); nothing when the screen is off."""
        if self.trigger_null.get("k") is not None:
            self.trigger.prepare(labels)

    def trigger_screen(self, images: np.ndarray, labels: np.ndarray
                       ) -> tuple[np.ndarray, dict[str, Any]]:
        """(held per image, report) of the batch trigger screen (``batch_screens``); off,
        saying why, when the reference was too small to calibrate it."""
        if self.trigger_null.get("k") is None:
            return np.zeros(len(labels), bool), {
                "classes": [], "flagged": [], "skipped": self.trigger_null.get("skipped", "")}
        return self.trigger.screen(images, labels)

    # ------------------------------------------------------------ on disk
    def _meta(self) -> dict[str, Any]:
        return {"n_classes": self.n_classes, "config": asdict(self.cfg),
                "embed_trained_on": self.embed_digest}

    def save(self, folder: str | os.PathLike[str]) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = self._meta()
        for name, arr in (("images", self.images), ("labels", self.labels)):
            data = _npy_bytes(arr)
            atomic_write_bytes(folder / f"{name}.npy", data)
            meta[f"{name}_sha256"] = sha256_hex(data)
        meta["embed_sha256"] = save_embedding(self.embedding, folder / EMBED_NAME,
                                              self.embed_digest, self.cfg.embed_config())
        self._save_state(folder, meta)
        atomic_write_json(folder / "reference.json", meta)  # last: it vouches for the rest
        self._folder, self._meta_embed_sha256 = folder, meta["embed_sha256"]

    def _save_state(self, folder: Path, meta: dict[str, Any]) -> None:
        """Write embed.onnx and screens.npz and record their hashes in ``meta``."""
        meta.pop("onnx_sha256", None)
        if self.onnx is not None:
            atomic_write_bytes(folder / ONNX_NAME, self.onnx)
            meta["onnx_sha256"] = sha256_hex(self.onnx)
        k = self.trigger_null.get("k")
        arrays = {name: getattr(self, name) for name in _STATE} | self.forest | {
            "if_threshold": np.array(self.if_threshold),
            "label_threshold": np.array(self.label_threshold),
            "trigger_k": np.array(np.nan if k is None else k),
            "trigger_points": np.array(self.trigger_null.get("points", []),
                                       np.float64).reshape(-1, 3)}
        data = _npz_bytes(arrays)
        atomic_write_bytes(folder / DERIVED_NAME, data)
        meta["derived_sha256"] = sha256_hex(data)
        meta["derived_of"] = _derived_digest(meta)

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> Reference:
        """Load; the fitted state comes from ``screens.npz`` when every hash matches (no
        refit, no torch), else everything is refitted and the cache rewritten. The embedding
        comes from its cache when its sha256 and training digest match (else it is
        retrained)."""
        folder = Path(folder)
        try:
            meta = json.loads((folder / "reference.json").read_text())
            if "images_sha256" not in meta:
                raise DatasetError(f"the screening reference in {folder} predates the learned "
                                   "label screen (it holds no images.npy)", _REBUILD)
            arrays = {}
            for name in ("images", "labels"):
                data = (folder / f"{name}.npy").read_bytes()
                if sha256_hex(data) != meta[f"{name}_sha256"]:
                    raise DatasetError(f"reference {folder / name}.npy does not match its hash",
                                       _REBUILD)
                arrays[name] = _npy_view(data)
            cfg = ScreenConfig.from_dict(meta["config"])
            n_classes = int(meta["n_classes"])
        except (OSError, KeyError, ValueError, TypeError) as err:
            raise DatasetError(f"no usable screening reference in {folder}: {err}",
                               _REBUILD) from err
        state = _read_state(folder, meta)
        if state is not None:
            return cls._restore(folder, meta, arrays["images"], arrays["labels"], n_classes,
                                cfg, *state)
        hold = np.random.default_rng(cfg.seed).random(len(arrays["labels"])) < 0.2
        digest = training_digest(arrays["images"][~hold], arrays["labels"][~hold], n_classes,
                                 cfg.embed_config())
        cached = load_embedding(folder / EMBED_NAME, meta.get("embed_sha256"), digest)
        ref = cls(arrays["images"], arrays["labels"], n_classes, cfg, embedding=cached)
        if cached is None:  # rewrite the cache so the next load does not train again
            meta.update(ref._meta(), embed_sha256=save_embedding(
                ref.embedding, folder / EMBED_NAME, ref.embed_digest, cfg.embed_config()))
        ref._save_state(folder, meta)
        atomic_write_json(folder / "reference.json", meta)
        ref._folder, ref._meta_embed_sha256 = folder, meta["embed_sha256"]
        return ref

    @classmethod
    def _restore(cls, folder: Path, meta: dict[str, Any], images: np.ndarray,
                 labels: np.ndarray, n_classes: int, cfg: ScreenConfig,
                 state: dict[str, np.ndarray], onnx: bytes | None) -> Reference:
        """A reference rebuilt from its saved fitted state (see ``load``)."""
        ref = cls.__new__(cls)
        ref.images, ref.labels = _check_images(images), np.asarray(labels, np.int64)
        ref.n_classes, ref.cfg = n_classes, cfg
        ref._features = None
        for name in _STATE:
            setattr(ref, name, state[name])
        ref._fit_pad = None
        ref.forest = {k: state[k] for k in forest.KEYS}
        ref.if_threshold = float(state["if_threshold"])
        ref.label_threshold = float(state["label_threshold"])
        k = float(state["trigger_k"])
        ref.trigger_null = {"k": None if np.isnan(k) else k,
                            "points": state["trigger_points"].tolist()}
        if np.isnan(k):
            ref.trigger_null["skipped"] = _TOO_SMALL
        ref.embed_digest, ref.embed_trained = str(meta["embed_trained_on"]), False
        ref._embedding, ref._trigger = None, None
        ref._folder, ref._meta_embed_sha256 = folder, str(meta["embed_sha256"])
        ref.onnx = onnx
        ref._embed = Embedder(onnx, lambda: ref.embedding)
        return ref


_TOO_SMALL = ("the reference has no class with 16 or more images, too few to calibrate the "
              "trigger screen")


def _derived_digest(meta: dict[str, Any]) -> str:
    """What screens.npz was fitted from: the data, the network, the config, the version."""
    return sha256_hex(canonical_json({
        "version": DERIVED_VERSION, "n_classes": meta.get("n_classes"),
        "config": meta.get("config"), "images": meta.get("images_sha256"),
        "labels": meta.get("labels_sha256"), "embed": meta.get("embed_sha256"),
        "onnx": meta.get("onnx_sha256"), "state": meta.get("derived_sha256")}))


def _read_state(folder: Path, meta: dict[str, Any]
                ) -> tuple[dict[str, np.ndarray], bytes | None] | None:
    """(screens.npz arrays, embed.onnx bytes or None) when every file matches the hashes in
    ``meta`` and ``meta`` names what they were fitted from; else None (refit)."""
    try:
        if meta.get("derived_of") != _derived_digest(meta):
            return None
        if sha256_hex((folder / EMBED_NAME).read_bytes()) != meta.get("embed_sha256"):
            return None
        onnx = None
        if meta.get("onnx_sha256"):
            onnx = (folder / ONNX_NAME).read_bytes()
            if sha256_hex(onnx) != meta["onnx_sha256"]:
                return None
        data = (folder / DERIVED_NAME).read_bytes()
        if sha256_hex(data) != meta.get("derived_sha256"):
            return None
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            state = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, KeyError):
        return None
    needed = {*_STATE, *forest.KEYS, "if_threshold", "label_threshold", "trigger_k",
              "trigger_points"}
    return (state, onnx) if needed <= set(state) else None


def _npy_view(data: bytes) -> np.ndarray:
    """The array in .npy ``data`` as a read-only view of those bytes (no copy: the
    reference's images are tens of MB); object arrays are refused (no pickles)."""
    buf = io.BytesIO(data)
    version = np.lib.format.read_magic(buf)
    header = {(1, 0): np.lib.format.read_array_header_1_0,
              (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if header is None:
        raise ValueError(f"unsupported .npy format version {version}")
    shape, fortran, dtype = header(buf)
    if dtype.hasobject:
        raise ValueError("the .npy holds Python objects")
    count = int(np.prod(shape, dtype=np.int64))
    arr = np.frombuffer(data, dtype, count=count, offset=buf.tell())
    return arr.reshape(shape, order="F" if fortran else "C")


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    return buf.getvalue()


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()
