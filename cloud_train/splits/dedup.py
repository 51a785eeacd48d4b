"""Exact and near-duplicate clustering of images, near-linear in the dataset size.

- Exact duplicates: sha256 over the decoded pixels (shape + dtype + bytes), so the same
  picture saved as PNG and PPM is one image, whatever the container bytes.
- Near duplicates: a 64-bit DCT perceptual hash (pHash). The image is turned grey
  (ITU-R BT.601 luma of RGB), resized to 32x32 (cv2.INTER_AREA), and the 8x8 lowest DCT-II
  frequencies are thresholded at the median of the 63 AC ones: one bit per coefficient.
- Shifts: a plain 64-bit pHash of a 32x32 image moves ~22 bits under a 3 px shift, so the
  pHash is also taken under every integer shift of up to ``MAX_SHIFT`` px (one separable GEMM
  over an edge-padded image); a shifted probe within ``SHIFT_THRESHOLD`` bits of another
  image's hash is a match.
- Index: the 64 bits are cut into ``bands`` bands; items sharing one band value land in the
  same bucket and only those candidate pairs are compared by Hamming distance. With
  ``bands = threshold + 1`` the pigeonhole principle makes the index exact: any pair within
  ``threshold`` bits agrees on at least one band. Cost ~ sum over buckets of size^2.
- Pixel check: renders of one class share their low frequencies, so hash matches alone chain
  distinct images into big clusters (10,000 rendered signs at 8 bits: one cluster of 3,256).
  Every hash match is confirmed on the blurred grey pixels (``verify_matches``).
- Clusters: union-find over exact and confirmed near pairs.

Thresholds (``scripts/bench_dedup.py --recall``, 2,000 rendered signs per kind): 10 bits,
shift probes 2 bits, residual 4.5 grey levels catch 100% of JPEG re-encodes (q 50-90) and
1-3 px shifts, 99.5% of brightness x0.90-0.95 / x1.05-1.10 (clipping costs the rest) and
99.95% of 70-90% rescale round trips; a 4-10% centre zoom (a crop) is caught ~54% of the time
and is not claimed. 17 of 2,000 distinct renders (0.85%) were merged with another.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from roadshield_base.errors import ConfigError, DatasetError

HASH_SIDE = 32  # grey image side the DCT runs on
LOW = 8  # 8x8 low-frequency block -> 64 bits
NEAR_THRESHOLD = 10  # max Hamming distance (of 64 bits) still called "near"
SHIFT_THRESHOLD = 2  # max distance between a shifted probe and another image's hash
MAX_SHIFT = 3  # probes cover shifts of -3..3 pixels on both axes (at 32x32)
VERIFY_SIGMA = 1.5  # blur before the pixel check, so sensor noise and JPEG do not count
VERIFY_RESIDUAL = 4.5  # max RMS grey-level residual (after a gain fit) of a true duplicate


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix, n x n float32: row k is basis k."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m.astype(np.float32)


_D = _dct_matrix(HASH_SIDE)[:LOW]  # LOW x HASH_SIDE


def pixel_sha256(image: np.ndarray) -> str:
    """sha256 hex of the decoded pixels (shape, dtype and C-order bytes)."""
    arr = np.ascontiguousarray(image)
    h = hashlib.sha256(f"{arr.shape}|{arr.dtype.str}|".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def _as_batch(images: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray] | np.ndarray:
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise DatasetError(f"images have shape {images.shape} dtype {images.dtype}",
                               "pass N x H x W x 3 uint8 RGB images")
        return images
    out = list(images)
    for i, img in enumerate(out):
        if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[-1] != 3 \
                or img.dtype != np.uint8:
            raise DatasetError(f"image {i} is not an H x W x 3 uint8 array",
                               "pass H x W x 3 uint8 RGB images")
    return out


def grey32(images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """N x 32 x 32 float32 luma in [0, 255] of RGB images (any size, resized INTER_AREA)."""
    batch = _as_batch(images)
    if isinstance(batch, np.ndarray) and batch.shape[1:3] == (HASH_SIDE, HASH_SIDE):
        rgb = batch.astype(np.float32)
        return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    out = np.empty((len(batch), HASH_SIDE, HASH_SIDE), np.float32)
    for i, img in enumerate(batch):
        g = img.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        interp = cv2.INTER_AREA if min(g.shape) >= HASH_SIDE else cv2.INTER_LINEAR
        out[i] = cv2.resize(g, (HASH_SIDE, HASH_SIDE), interpolation=interp)
    return out


def _pack(coef: np.ndarray) -> np.ndarray:
    """(..., 64) DCT coefficients -> uint64 hashes: bit k set where coefficient k > median.

    The median is over the 63 AC coefficients (DC left out), i.e. their 32nd smallest.
    """
    med = np.partition(coef[..., 1:], 31, axis=-1)[..., 31:32]
    packed = np.packbits(coef > med, axis=-1, bitorder="little")  # (..., 8) uint8
    return np.ascontiguousarray(packed).view("<u8")[..., 0].astype(np.uint64)


def shifted_phashes(images: np.ndarray | Sequence[np.ndarray], max_shift: int = MAX_SHIFT,
                    chunk: int = 4096) -> np.ndarray:
    """pHashes of every image under every integer shift: uint64 (N, (2s+1)^2).

    Column ``(dy + s) * (2s + 1) + (dx + s)`` hashes the 32x32 grey image moved by
    (-dx, -dy) with edges replicated; the centre column is the plain pHash. Computed as two
    large GEMMs over an edge-padded image (the DCT is separable), so all shifts cost about
    four plain hashes.
    """
    batch = _as_batch(images)
    s = int(max_shift)
    k = 2 * s + 1
    side = HASH_SIDE + 2 * s
    shifted_d = np.zeros((k * LOW, side), np.float32)  # row block o = DCT rows at offset o
    for o in range(k):
        shifted_d[o * LOW:(o + 1) * LOW, o:o + HASH_SIDE] = _D
    out = np.empty((len(batch), k * k), np.uint64)
    for a in range(0, len(batch), chunk):  # chunks keep the float copies small
        g = np.pad(grey32(batch[a:a + chunk]), ((0, 0), (s, s), (s, s)), mode="edge")
        n = len(g)
        t = shifted_d @ g.transpose(1, 0, 2).reshape(side, n * side)  # (kL, n*side)
        t = t.reshape(k * LOW, n, side).reshape(k * LOW * n, side) @ shifted_d.T  # (kL*n, kL)
        t = t.reshape(k, LOW, n, k, LOW).transpose(2, 0, 3, 1, 4)  # n, oy, ox, 8, 8
        out[a:a + n] = _pack(t.reshape(n, k * k, LOW * LOW))
    return out


def phash(images: np.ndarray | Sequence[np.ndarray], chunk: int = 8192) -> np.ndarray:
    """64-bit DCT perceptual hashes of RGB images: uint64 (N,). Deterministic."""
    batch = _as_batch(images)
    out = np.empty(len(batch), np.uint64)
    for a in range(0, len(batch), chunk):
        coef = _D @ grey32(batch[a:a + chunk]) @ _D.T  # (n, 8, 8)
        out[a:a + chunk] = _pack(coef.reshape(len(coef), LOW * LOW))
    return out


def hamming(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
    """Bit differences between uint64 hashes (broadcasting)."""
    return np.bitwise_count(np.bitwise_xor(np.asarray(a, np.uint64), np.asarray(b, np.uint64)))


def _band_values(hashes: np.ndarray, bands: int) -> list[np.ndarray]:
    """Split 64 bits into ``bands`` contiguous bands (sizes differ by at most one)."""
    edges = np.linspace(0, 64, bands + 1).round().astype(int)
    vals = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        mask = np.uint64((1 << int(hi - lo)) - 1)
        vals.append((hashes >> np.uint64(lo)) & mask)
    return vals


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
    for vals in _band_values(hashes, bands):
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


def shift_pairs(shifted: np.ndarray, threshold: int = SHIFT_THRESHOLD, bands: int = 4,
                chunk: int = 1 << 20) -> np.ndarray:
    """Probe matches: rows (i, j, q) where shifted probe q of image i is within ``threshold``
    bits of image j's plain hash (i != j). int64 (P, 3), unique rows.

    ``shifted`` is ``shifted_phashes`` output (N, K); its centre column is the index. Bands
    of 64/bands bits; with ``bands = threshold + 1`` no such match is missed (pigeonhole),
    with fewer bands a match further than ``bands - 1`` bits may be missed.
    """
    n, k = shifted.shape
    base = np.ascontiguousarray(shifted[:, k // 2])
    queries = shifted.reshape(-1)
    found: list[np.ndarray] = []
    for vals, qvals in zip(_band_values(base, bands), _band_values(queries, bands),
                           strict=True):
        order = np.argsort(vals, kind="stable")
        sv = vals[order]
        for a in range(0, len(qvals), chunk):
            q = qvals[a:a + chunk]
            lo = np.searchsorted(sv, q, "left")
            hi = np.searchsorted(sv, q, "right")
            cnt = hi - lo
            hit = np.flatnonzero(cnt)
            if not len(hit):
                continue
            reps = cnt[hit]
            qi = np.repeat(hit, reps) + a  # flat probe index
            offs = np.arange(int(reps.sum())) - np.repeat(np.cumsum(reps) - reps, reps)
            j = order[np.repeat(lo[hit], reps) + offs]
            i, col = np.divmod(qi, k)
            keep = (i != j) & (hamming(queries[qi], base[j]) <= threshold)
            found.append(np.stack([i[keep], j[keep], col[keep]], axis=1))
    if not found:
        return np.empty((0, 3), np.int64)
    return np.unique(np.concatenate(found).astype(np.int64), axis=0)


def _padded_blurred(images: np.ndarray | list[np.ndarray], idx: np.ndarray,
                    pad: int) -> np.ndarray:
    """Blurred (VERIFY_SIGMA), edge-padded grey 32x32 of images[idx]: float32 (n, 32+2p, 32+2p)."""
    sub = images[idx] if isinstance(images, np.ndarray) else [images[i] for i in idx]
    g = np.pad(grey32(sub), ((0, 0), (pad, pad), (pad, pad)), mode="edge")
    for m in range(len(g)):
        g[m] = cv2.GaussianBlur(g[m], (0, 0), VERIFY_SIGMA, borderType=cv2.BORDER_REPLICATE)
    return g


def verify_matches(images: np.ndarray | Sequence[np.ndarray], matches: np.ndarray,
                   max_shift: int, max_residual: float = VERIFY_RESIDUAL) -> np.ndarray:
    """Keep the hash matches whose pixels agree: rows (i, j, q) as from ``shift_pairs``.

    Image i moved as probe q prescribes and image j are compared on the blurred grey 32x32
    (Gaussian sigma VERIFY_SIGMA px), central (32 - 2 * max_shift)^2 window, after fitting a
    gain (so a brightness change costs nothing): residual = RMS(a - g * b) in grey levels,
    the smaller of the two directions (a onto b, b onto a).
    Returns the kept pairs (i < j), int64 (P, 2), unique.
    """
    if not len(matches):
        return np.empty((0, 2), np.int64)
    batch = _as_batch(images)
    s = int(max_shift)
    k = 2 * s + 1
    used, inv = np.unique(matches[:, :2], return_inverse=True)
    grey = _padded_blurred(batch, used, s)
    ii, jj = inv.reshape(-1, 2).T
    lo, hi = 2 * s, HASH_SIDE  # central window in padded coordinates: [2s, 32) for s-shifts
    keep = np.zeros(len(matches), bool)
    for q in np.unique(matches[:, 2]):
        rows = np.flatnonzero(matches[:, 2] == q)
        oy, ox = divmod(int(q), k)
        a = grey[ii[rows], oy + s:oy + HASH_SIDE - s, ox + s:ox + HASH_SIDE - s]
        b = grey[jj[rows], lo:hi, lo:hi]
        a = a.reshape(len(rows), -1)
        b = b.reshape(len(rows), -1)
        ab = (a * b).sum(1)
        aa, bb = (a * a).sum(1), (b * b).sum(1)
        # least-squares gain each way; the smaller residual keeps the check symmetric, so
        # the clusters do not depend on the order of the images
        res_ab = np.maximum(aa - ab * ab / np.maximum(bb, 1e-6), 0.0)
        res_ba = np.maximum(bb - ab * ab / np.maximum(aa, 1e-6), 0.0)
        res = np.sqrt(np.minimum(res_ab, res_ba) / a.shape[1])
        keep[rows] = res <= max_residual
    m = matches[keep]
    pairs = np.stack([np.minimum(m[:, 0], m[:, 1]), np.maximum(m[:, 0], m[:, 1])], axis=1)
    return np.unique(pairs, axis=0).reshape(-1, 2)


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
    digest; phash[i] its 64-bit hash; exact_pairs / near_pairs the (P, 2) links found."""

    cluster: np.ndarray
    sha256: list[str]
    phash: np.ndarray
    exact_pairs: np.ndarray
    near_pairs: np.ndarray
    threshold: int
    seconds: dict[str, float] = field(default_factory=dict)
    candidates: int = 0  # hash-matched pairs before the pixel check

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
        return {"images": len(self.cluster), "clusters": self.n_clusters,
                "duplicate_clusters": int((sizes > 1).sum()),
                "images_in_duplicate_clusters": int(sizes[sizes > 1].sum()),
                "largest_cluster": int(sizes.max()) if len(sizes) else 0,
                "exact_pairs": len(self.exact_pairs), "near_pairs": len(self.near_pairs),
                "candidate_pairs": self.candidates,
                "threshold_bits": self.threshold,
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}


def _exact_pairs(digests: Sequence[str]) -> np.ndarray:
    first: dict[str, int] = {}
    pairs = []
    for i, d in enumerate(digests):
        j = first.setdefault(d, i)
        if j != i:
            pairs.append((j, i))
    return np.array(pairs, np.int64).reshape(-1, 2)


def dedup(images: np.ndarray | Sequence[np.ndarray], threshold: int = NEAR_THRESHOLD,
          bands: int | None = None, shift_threshold: int = SHIFT_THRESHOLD,
          max_shift: int = MAX_SHIFT, verify: bool = True,
          max_residual: float = VERIFY_RESIDUAL) -> DedupResult:
    """Cluster exact and near duplicates among RGB uint8 images (N x H x W x 3 or a list).

    Two images are linked when their pixel sha256 agree, or when a hash match (pHashes
    within ``threshold`` bits, or a shift of one by up to ``max_shift`` pixels (0 disables)
    bringing its pHash within ``shift_threshold`` bits of the other's) passes the pixel check
    of ``verify_matches`` (skipped with ``verify=False``). seconds holds 'hash' (sha256 +
    pHashes), 'index' (banded LSH + Hamming checks), 'verify' and 'cluster' (union-find).
    """
    t0 = time.perf_counter()
    batch = _as_batch(images)
    digests = [pixel_sha256(img) for img in batch]
    shifted = shifted_phashes(batch, max_shift) if len(digests) else np.zeros((0, 1), np.uint64)
    hashes = np.ascontiguousarray(shifted[:, shifted.shape[1] // 2])
    t1 = time.perf_counter()
    exact = _exact_pairs(digests)
    near = near_pairs(hashes, threshold, bands)
    centre = shifted.shape[1] // 2
    matches = np.concatenate([near, np.full((len(near), 1), centre, np.int64)], axis=1)
    if max_shift > 0 and len(digests):
        matches = np.concatenate([matches, shift_pairs(shifted, shift_threshold)])
    candidates = len(np.unique(np.sort(matches[:, :2], axis=1), axis=0)) if len(matches) else 0
    tv = time.perf_counter()
    if verify and len(matches):
        near = verify_matches(batch, matches, max_shift, max_residual)
    elif len(matches):
        near = np.unique(np.sort(matches[:, :2], axis=1), axis=0)
    t2 = time.perf_counter()
    uf = UnionFind(len(digests))
    for a, b in np.concatenate([exact, near]).tolist():
        uf.union(a, b)
    cluster = uf.labels()
    t3 = time.perf_counter()
    return DedupResult(cluster, digests, hashes, exact, near, int(threshold),
                       {"hash": t1 - t0, "index": tv - t1, "verify": t2 - tv,
                        "cluster": t3 - t2}, candidates)
