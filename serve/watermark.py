"""A DAWN-style watermark (Szyller et al. 2021, "DAWN: Dynamic Adversarial Watermarking of
Neural Networks"): a keyed hash of each query picks a few answers to be wrong on purpose.

For an image x (float32 [3, S, S] in [0, 1]) the service takes u = uint8 round(255 * x)
(row-major bytes) and h = HMAC-SHA256(watermark_key, "rs-wm-v1" || S as 2 bytes big-endian
|| u). The image is watermarked when int(h[0:8]) / 2**64 < rate (rate <= 0.005). Its
answer is then w = (y + 1 + int(h[8:16]) mod (C - 1)) mod C instead of the model's class
y: never y, uniform over the other C - 1 classes, the same every time x is asked again.
The service stores (key id, sha256(u), shape, u, y, w) in its ``watermark`` table.

Verification replays the stored images against a suspect model and counts how many it
labels w. For a model made without the watermark key, w is uniform over the classes other
than y and independent of the model's answer s: on an image where s != y, P(s == w) is
exactly 1 / (C - 1); where s == y it is 0. With m the images where the suspect did not say
y, the p-value is the binomial tail P(X >= k), X ~ Binomial(m, 1 / (C - 1)), exact
whatever the suspect's own error rate. A clone trained on the service's answers
learned w for those images and agrees far more often.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

DOMAIN = b"rs-wm-v1"


def quantise(image: np.ndarray) -> bytes:
    """uint8 round(255 * x) bytes of a float32 [3, S, S] image in [0, 1]."""
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8).tobytes()


def digest(key: bytes, size: int, image_u8: bytes) -> bytes:
    return hmac.new(key, DOMAIN + size.to_bytes(2, "big") + image_u8, hashlib.sha256).digest()


def wrong_label(key: bytes, size: int, image_u8: bytes, true_label: int, num_classes: int,
                rate: float) -> int | None:
    """The watermark's label for this image, or None when it is not selected."""
    if num_classes < 2 or rate <= 0.0:
        return None
    h = digest(key, size, image_u8)
    if int.from_bytes(h[:8], "big") / 2.0**64 >= rate:
        return None
    return (true_label + 1 + int.from_bytes(h[8:16], "big") % (num_classes - 1)) % num_classes


def watermark_row(size: int, image_u8: bytes, true_label: int, wrong: int
                  ) -> tuple[str, str, bytes, int, int]:
    """(sha256 of the bytes, shape json, bytes, y, w) as the store keeps it."""
    return (hashlib.sha256(image_u8).hexdigest(), json.dumps([3, size, size]), image_u8,
            true_label, wrong)


@dataclass(frozen=True)
class Verdict:
    """Result of replaying the watermark against a suspect.

    queries: watermark images replayed; agree: the suspect said the wrong label w;
    agree_true: it said the victim's own label y; tested: the images where it said
    anything but y (only there can it say w); chance: the null agreement 1/(C-1) on each
    of those; p_value: P(X >= agree), X ~ Binomial(tested, chance); skipped: stored rows
    the key does not reproduce (another key, or altered rows), left out.
    """

    queries: int
    agree: int
    agree_true: int
    tested: int
    chance: float
    p_value: float
    skipped: int

    def as_dict(self) -> dict[str, float | int]:
        return dict(self.__dict__)


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p) (scipy.stats.binom.sf)."""
    from scipy.stats import binom

    return 1.0 if k <= 0 else float(binom.sf(k - 1, n, p))


def verify(rows: Sequence[tuple[str, str, str, bytes, int, int]], key: bytes, num_classes: int,
           predict: Callable[[np.ndarray], np.ndarray], rate: float = 0.005,
           max_queries: int = 200, batch: int = 64) -> Verdict:
    """Replay up to ``max_queries`` stored watermark rows (the store's ``watermark_rows``)
    against ``predict`` (float32 [N, 3, S, S] -> int labels [N]).

    A row counts only if ``key`` selects its image at ``rate`` (the largest rate the
    service allows, by default) and gives its stored wrong label."""
    if num_classes < 2:
        raise ValueError("a watermark needs at least two classes")
    seen: set[str] = set()
    images: list[np.ndarray] = []
    wrongs: list[int] = []
    trues: list[int] = []
    skipped = 0
    for _, sha, shape_json, image_u8, y, w in rows:
        if sha in seen:
            continue  # the same image sent by two clients is one query
        shape = json.loads(shape_json)
        size = int(shape[-1])
        if wrong_label(key, size, image_u8, y, num_classes, rate) != w:
            skipped += 1
            continue
        if len(images) >= max_queries:
            break
        seen.add(sha)
        images.append(np.frombuffer(image_u8, np.uint8).reshape(shape).astype(np.float32)
                      / 255.0)
        wrongs.append(w)
        trues.append(y)
    if not images:
        return Verdict(0, 0, 0, 0, 1.0 / (num_classes - 1), 1.0, skipped)
    stack = np.stack(images)
    labels = np.concatenate([np.asarray(predict(stack[i:i + batch])).reshape(-1)
                             for i in range(0, len(stack), batch)])
    agree = int((labels == np.asarray(wrongs)).sum())
    agree_true = int((labels == np.asarray(trues)).sum())
    # w is uniform over the classes other than y and, for a model made without the key,
    # independent of its answer: where it says s != y, P(s == w) is exactly 1/(C-1), and
    # where it says y it cannot say w
    tested = len(images) - agree_true
    chance = 1.0 / (num_classes - 1)
    return Verdict(len(images), agree, agree_true, tested, chance,
                   binomial_tail(agree, tested, chance), skipped)
