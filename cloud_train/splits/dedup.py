"""Exact and near-duplicate clustering of images, near-linear in the dataset size.

- Exact duplicates: sha256 over the decoded pixels (shape + dtype + bytes), so the same
  picture saved as PNG and PPM is one image, whatever the container bytes. Only one image
  per digest goes on to the near-duplicate search.
- Near duplicates: a 64-bit DCT perceptual hash (pHash). The image is turned grey
  (ITU-R BT.601 luma of RGB), resized to 32x32 (cv2.INTER_AREA), and the 8x8 lowest DCT-II
  frequencies are thresholded at the median of the 63 AC ones: one bit per coefficient.
- Views: a copy may be moved, mirrored or cropped, and any of these moves a plain pHash by
  20 bits or more. So each image is also hashed under a fixed set of views
  (``cloud_train.splits.views.make_probes``: shifts, mirrors, zooms). Each view is a
  separable linear resampling, so the DCT is folded into it and all views sharing a zoom
  cost two GEMMs per image; a mirror only negates the odd horizontal frequencies. A view of
  one image within ``PROBE_THRESHOLD`` bits of another image's plain hash is a candidate.
- Index: the 64 bits are cut into bands; items sharing one band value are compared by
  Hamming distance. With ``bands = threshold + 1`` the pigeonhole principle makes the index
  exact: any pair within ``threshold`` bits agrees on at least one band. Plain hashes are
  matched to each other within ``NEAR_THRESHOLD`` bits (re-encodes, brightness); views to
  plain hashes within ``PROBE_THRESHOLD`` bits through direct-addressed band tables, so
  looking up N x K views costs two array gathers per band.
- Pixel check: every candidate is confirmed on the pixels under the view that matched
  (``cloud_train.splits.pixel_check``): renders of one sign share their low frequencies, so
  hash matches alone would chain distinct images into big clusters.
- Clusters: union-find over exact and confirmed near pairs.

Figures: ``scripts/bench_dedup.py`` (throughput at 100,000 images), ``--recall`` (catch
rate per variant kind of ``cloud_train.splits.variants`` on rendered signs, false merges
among distinct renders), ``--clean-split`` (distinct renders joined across train and test).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from cloud_train.splits.pixel_check import VerifyLimits, verify_matches
from cloud_train.splits.views import (
    HASH_SIDE,
    Probes,
    as_batch,
    grey32,
    make_probes,
    resample_matrix,
    subset,
)
from roadshield_base.errors import ConfigError

__all__ = ["NEAR_THRESHOLD", "PROBE_THRESHOLD", "DedupResult", "Probes", "UnionFind",
           "VerifyLimits", "dedup", "grey32", "hamming", "make_probes", "near_pairs", "phash",
           "pixel_sha256", "probe_pairs", "probe_phashes", "verify_matches"]

LOW = 8  # 8x8 low-frequency block -> 64 bits
NEAR_THRESHOLD = 10  # max Hamming distance (of 64 bits) between plain hashes still "near"
PROBE_THRESHOLD = 2  # max distance between a view of one image and another's plain hash
TABLE_BITS = 22  # direct-addressed band tables hold 2^22 buckets (wider bands are hashed)


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix, n x n float32: row k is basis k."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m.astype(np.float32)


_D = _dct_matrix(HASH_SIDE)[:LOW]  # LOW x HASH_SIDE
# a left-right mirror multiplies DCT column frequency v by (-1)^v
_MIRROR_SIGN = np.where(np.arange(LOW) % 2, -1.0, 1.0).astype(np.float32)


def pixel_sha256(image: np.ndarray) -> str:
    """sha256 hex of the decoded pixels (shape, dtype and C-order bytes)."""
    arr = np.ascontiguousarray(image)
    h = hashlib.sha256(f"{arr.shape}|{arr.dtype.str}|".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def _pack(coef: np.ndarray) -> np.ndarray:
    """(..., 64) DCT coefficients -> uint64 hashes: bit k set where coefficient k > median.

    The median is over the 63 AC coefficients (DC left out), i.e. their 32nd smallest.
    """
    med = np.partition(coef[..., 1:], 31, axis=-1)[..., 31:32]
    packed = np.packbits(coef > med, axis=-1, bitorder="little")  # (..., 8) uint8
    return np.ascontiguousarray(packed).view("<u8")[..., 0].astype(np.uint64)


def phash(images: np.ndarray | Sequence[np.ndarray], chunk: int = 8192) -> np.ndarray:
    """64-bit DCT perceptual hashes of RGB images: uint64 (N,). Deterministic."""
    batch = as_batch(images)
    out = np.empty(len(batch), np.uint64)
    for a in range(0, len(batch), chunk):
        coef = _D @ grey32(batch[a:a + chunk]) @ _D.T  # (n, 8, 8)
        out[a:a + chunk] = _pack(coef.reshape(len(coef), LOW * LOW))
    return out


def probe_phashes(images: np.ndarray | Sequence[np.ndarray], probes: Probes | None = None,
                  chunk: int = 2048) -> np.ndarray:
    """pHashes of every image under every view: uint64 (N, K); column 0 is ``phash``.

    Views sharing a zoom are one pair of GEMMs: the DCT rows are folded into the resampling
    matrices of every offset, so the (offsets x 8) square of coefficients of all shifts comes
    out at once; mirrored views reuse it with the odd column frequencies negated.
    """
    probes = make_probes() if probes is None else probes
    batch = as_batch(images)
    out = np.empty((len(batch), len(probes)), np.uint64)
    for z in np.unique(probes.zoom):
        cols = np.flatnonzero(probes.zoom == z)
        ys, yi = np.unique(probes.dy[cols], return_inverse=True)
        xs, xi = np.unique(probes.dx[cols], return_inverse=True)
        cell = yi * len(xs) + xi  # each view's place in the ys x xs grid
        ry = np.concatenate([_D @ resample_matrix(float(z), float(o)) for o in ys])
        rx = np.concatenate([_D @ resample_matrix(float(z), float(o)) for o in xs])
        flips = [f for f in (False, True) if (probes.mirror[cols] == f).any()]
        for a in range(0, len(batch), chunk):  # chunks keep the float copies small
            g = grey32(batch[a:a + chunk])
            n = len(g)
            t = ((ry @ g) @ rx.T).reshape(n, len(ys), LOW, len(xs), LOW)
            t = t.transpose(0, 1, 3, 2, 4).reshape(n, len(ys) * len(xs), LOW, LOW)
            for f in flips:
                sel = probes.mirror[cols] == f
                packed = _pack((t * _MIRROR_SIGN if f else t).reshape(n, -1, LOW * LOW))
                out[a:a + n, cols[sel]] = packed[:, cell[sel]]
    return out


def hamming(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
    """Bit differences between uint64 hashes (broadcasting)."""
    return np.bitwise_count(np.bitwise_xor(np.asarray(a, np.uint64), np.asarray(b, np.uint64)))


def _band_edges(bands: int) -> list[tuple[int, int]]:
    """64 bits in ``bands`` contiguous bands (sizes differ by at most one)."""
    edges = np.linspace(0, 64, bands + 1).round().astype(int)
    return list(zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True))


def _band(hashes: np.ndarray, lo: int, hi: int) -> np.ndarray:
    mask = np.uint64((1 << (hi - lo)) - 1)
    return (hashes >> np.uint64(lo)) & mask


def near_pairs(hashes: np.ndarray, threshold: int = NEAR_THRESHOLD,
               bands: int | None = None) -> np.ndarray:
    """Index pairs (i < j) whose hashes differ in <= ``threshold`` bits: int64 (P, 2).

    Banded LSH: candidates share a band value; ``bands`` defaults to ``threshold + 1``,
    which finds every such pair (pigeonhole). Pairs are unique and sorted.
    """
    hashes = np.asarray(hashes, np.uint64)
    if not 0 <= threshold < 64:
        raise ConfigError(f"near threshold {threshold} is out of range", "use 0-63 bits")
    bands = threshold + 1 if bands is None else int(bands)
    if not 1 <= bands <= 64:
        raise ConfigError(f"{bands} bands is out of range", "use 1-64 bands")
    found: list[np.ndarray] = []
    for lo, hi in _band_edges(bands):
        vals = _band(hashes, lo, hi)
        order = np.argsort(vals, kind="stable")
        sv = vals[order]
        cut = np.flatnonzero(np.diff(sv)) + 1
        starts = np.concatenate(([0], cut))
        ends = np.concatenate((cut, [len(sv)]))
        big = (ends - starts) > 1
        for s, e in zip(starts[big], ends[big], strict=True):
            idx = order[s:e]
            h = hashes[idx]
            d = hamming(h[:, None], h[None, :])
            ii, jj = np.nonzero(np.triu(d <= threshold, k=1))
            if len(ii):
                a, b = idx[ii], idx[jj]
                found.append(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1))
    if not found:
        return np.empty((0, 2), np.int64)
    pairs = np.concatenate(found).astype(np.int64)
    return np.unique(pairs, axis=0)


def _bucket(vals: np.ndarray, bits: int) -> np.ndarray:
    """Band values -> table slots in [0, 2^min(bits, TABLE_BITS)): the value itself when it
    fits, else a multiplicative hash of it (collisions only cost extra Hamming checks)."""
    if bits <= TABLE_BITS:
        return vals.astype(np.int64)
    mixed = vals * np.uint64(0x9E3779B97F4A7C15)  # wraps mod 2^64 (Fibonacci hashing)
    return (mixed >> np.uint64(64 - TABLE_BITS)).astype(np.int64)


def probe_pairs(hashes: np.ndarray, threshold: int = PROBE_THRESHOLD, bands: int | None = None,
                chunk: int = 1 << 20) -> np.ndarray:
    """View matches: rows (i, j, k) where view k of image i is within ``threshold`` bits of
    image j's plain hash (i != j). ``hashes``: ``probe_phashes`` output (N, K). int64 (P, 3),
    unique rows sorted by (i, k, j).

    Each band of the N plain hashes goes into a direct-addressed table (counts and starts
    per band value), so looking up all N * K views is two gathers per band, not a search.
    ``bands`` defaults to ``threshold + 1``: no match within ``threshold`` bits is missed.
    """
    hashes = np.asarray(hashes, np.uint64)
    if hashes.ndim != 2 or not len(hashes):
        raise ConfigError(f"view hashes have shape {hashes.shape}",
                          "pass the (N, K) output of probe_phashes")
    if not 0 <= threshold < 64:
        raise ConfigError(f"probe threshold {threshold} is out of range", "use 0-63 bits")
    bands = threshold + 1 if bands is None else int(bands)
    if not 1 <= bands <= 64:
        raise ConfigError(f"{bands} bands is out of range", "use 1-64 bands")
    n, k = hashes.shape
    base = np.ascontiguousarray(hashes[:, 0])
    queries = hashes.reshape(-1)
    keys: list[np.ndarray] = []
    for lo, hi in _band_edges(bands):
        slots = _bucket(_band(base, lo, hi), hi - lo)
        order = np.argsort(slots, kind="stable")
        counts = np.bincount(slots, minlength=1 << min(hi - lo, TABLE_BITS))
        starts = np.cumsum(counts) - counts
        for a in range(0, len(queries), chunk):
            q = queries[a:a + chunk]
            qs = _bucket(_band(q, lo, hi), hi - lo)
            cnt = counts[qs]
            hit = np.flatnonzero(cnt)
            if not len(hit):
                continue
            reps = cnt[hit]
            qi = np.repeat(hit, reps)
            offs = np.arange(len(qi)) - np.repeat(np.cumsum(reps) - reps, reps)
            j = order[np.repeat(starts[qs[hit]], reps) + offs]
            flat = qi + a  # index into queries: i * k + view
            keep = (flat // k != j) & (hamming(q[qi], base[j]) <= threshold)
            keys.append(flat[keep] * n + j[keep])
    if not keys:
        return np.empty((0, 3), np.int64)
    key = np.unique(np.concatenate(keys))
    flat, j = np.divmod(key, n)
    i, view = np.divmod(flat, k)
    return np.stack([i, j, view], axis=1).astype(np.int64)


# --- clusters -------------------------------------------------------------------------

class UnionFind:
    """Disjoint sets over 0..n-1 with path halving and union by size."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)
        self.size = np.ones(n, dtype=np.int64)

    def find(self, x: int) -> int:
        p = self.parent
        while p[x] != x:
            p[x] = p[p[x]]
            x = int(p[x])
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]

    def labels(self) -> np.ndarray:
        """Cluster id per element: 0..K-1, numbered by each cluster's smallest member."""
        roots = np.array([self.find(i) for i in range(len(self.parent))], np.int64)
        _, first, inv = np.unique(roots, return_index=True, return_inverse=True)
        rank = np.argsort(np.argsort(first))
        return rank[inv].astype(np.int64)


@dataclass
class DedupResult:
    """Clusters of an image set. cluster[i] is image i's cluster (0..K-1); sha256[i] its pixel
    digest; phash[i] its 64-bit hash; exact_pairs / near_pairs the (P, 2) links found;
    near_kind[p] the view kind that confirmed near pair p ('plain', 'shift', 'mirror',
    'zoom')."""

    cluster: np.ndarray
    sha256: list[str]
    phash: np.ndarray
    exact_pairs: np.ndarray
    near_pairs: np.ndarray
    threshold: int
    seconds: dict[str, float] = field(default_factory=dict)
    candidates: int = 0  # hash-matched pairs before the pixel check
    near_kind: np.ndarray = field(default_factory=lambda: np.empty(0, object))

    @property
    def n_clusters(self) -> int:
        return int(self.cluster.max()) + 1 if len(self.cluster) else 0

    def groups(self) -> list[np.ndarray]:
        """Member indices of each cluster with more than one image."""
        order = np.argsort(self.cluster, kind="stable")
        cut = np.flatnonzero(np.diff(self.cluster[order])) + 1
        return [g for g in np.split(order, cut) if len(g) > 1]

    def summary(self) -> dict[str, object]:
        sizes = np.bincount(self.cluster) if len(self.cluster) else np.zeros(0, int)
        kinds, counts = np.unique(self.near_kind.astype(str), return_counts=True)
        return {"images": len(self.cluster), "clusters": self.n_clusters,
                "duplicate_clusters": int((sizes > 1).sum()),
                "images_in_duplicate_clusters": int(sizes[sizes > 1].sum()),
                "largest_cluster": int(sizes.max()) if len(sizes) else 0,
                "exact_pairs": len(self.exact_pairs), "near_pairs": len(self.near_pairs),
                "near_pairs_by_view": {str(k): int(c) for k, c in zip(kinds, counts,
                                                                       strict=True)},
                "candidate_pairs": self.candidates,
                "threshold_bits": self.threshold,
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}


def _exact_pairs(digests: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(pairs (first, i) for each repeat of a digest, indices of first occurrences)."""
    first: dict[str, int] = {}
    pairs = []
    for i, d in enumerate(digests):
        j = first.setdefault(d, i)
        if j != i:
            pairs.append((j, i))
    return np.array(pairs, np.int64).reshape(-1, 2), np.array(sorted(first.values()), np.int64)


def dedup(images: np.ndarray | Sequence[np.ndarray], threshold: int = NEAR_THRESHOLD,
          bands: int | None = None, probe_threshold: int = PROBE_THRESHOLD,
          probes: Probes | None = None, verify: bool = True,
          limits: VerifyLimits | None = None, progress: bool = False) -> DedupResult:
    """Cluster exact and near duplicates among RGB uint8 images (N x H x W x 3 or a list).

    Two images are linked when their pixel sha256 agree, or when a hash match (plain pHashes
    within ``threshold`` bits, or a view of one (``probes``, default ``make_probes()``)
    within ``probe_threshold`` bits of the other's pHash) passes the pixel check of
    ``verify_matches`` (skipped with ``verify=False``). Only the first image of each
    sha256 is hashed. seconds holds 'hash' (sha256 + view hashes), 'index' (banded LSH +
    Hamming checks), 'verify' and 'cluster' (union-find); ``progress`` shows these steps.
    """
    from cloud_train.progress import step_ticker

    probes = make_probes() if probes is None else probes
    with step_ticker(4, "dedup", progress) as tick:
        t0 = time.perf_counter()
        batch = as_batch(images)
        digests = [pixel_sha256(img) for img in batch]
        exact, uniq = _exact_pairs(digests)
        view_hashes = (probe_phashes(subset(batch, uniq), probes) if len(uniq)
                       else np.zeros((0, len(probes)), np.uint64))
        hashes = np.zeros(len(digests), np.uint64)
        if len(exact):  # repeats share their first copy's hash
            hashes[exact[:, 1]] = view_hashes[np.searchsorted(uniq, exact[:, 0]), 0]
        hashes[uniq] = view_hashes[:, 0]
        tick("hash")
        t1 = time.perf_counter()
        near = near_pairs(view_hashes[:, 0], threshold, bands)
        matches = np.concatenate([near, np.zeros((len(near), 1), np.int64)], axis=1)
        if len(probes) > 1 and len(uniq):
            matches = np.concatenate([matches, probe_pairs(view_hashes, probe_threshold)])
        candidates = (len(np.unique(np.sort(matches[:, :2], axis=1), axis=0))
                      if len(matches) else 0)
        tick("index")
        tv = time.perf_counter()
        if verify and len(matches):
            near, first_view = verify_matches(subset(batch, uniq), matches, probes, limits)
        else:
            near, pos = np.unique(np.sort(matches[:, :2], axis=1).reshape(-1, 2), axis=0,
                                  return_index=True)
            first_view = matches[pos, 2]
        near = uniq[near].reshape(-1, 2)  # back to indices of ``images``
        kinds = probes.kinds()[first_view]
        tick("verify")
        t2 = time.perf_counter()
        uf = UnionFind(len(digests))
        for a, b in np.concatenate([exact, near]).tolist():
            uf.union(a, b)
        cluster = uf.labels()
        t3 = time.perf_counter()
        tick("cluster")
    return DedupResult(cluster, digests, hashes, exact, near, int(threshold),
                       {"hash": t1 - t0, "index": tv - t1, "verify": t2 - tv,
                        "cluster": t3 - t2}, candidates, kinds)
