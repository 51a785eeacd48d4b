"""A float64 NumPy statement of the JPEG approximation the CUDA kernel computes.

Written from the formulas, not from the kernel: BT.601 full-range YCbCr (JFIF
coefficients), level shift 128, orthonormal 8x8 DCT-II, the ITU-T T.81 Annex K
tables scaled by the IJG quality formula (jcparam.c), round half to even,
dequantise, inverse DCT, back to RGB, round half to even, clamp to [0, 255].
Partial blocks are padded by replicating the last row/column (as libjpeg does).
"""

from __future__ import annotations

import numpy as np

LUMA = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
]).reshape(8, 8)
CHROMA = np.full((8, 8), 99)
CHROMA[:4, :4] = [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]]


def ijg_table(base: np.ndarray, quality: int) -> np.ndarray:
    """jcparam.c: scale = 5000 / q (q < 50) or 200 - 2 q; (base * scale + 50) // 100 in [1, 255]."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return np.clip((base * scale + 50) // 100, 1, 255)


def dct_matrix() -> np.ndarray:
    """Orthonormal DCT-II matrix D[k, n] = c(k) cos((2n + 1) k pi / 16)."""
    k = np.arange(8)[:, None]
    n = np.arange(8)[None, :]
    c = np.where(k == 0, np.sqrt(1 / 8), np.sqrt(2 / 8))
    return c * np.cos((2 * n + 1) * k * np.pi / 16)


def jpeg_reference(image: np.ndarray, quality: int, bgr: bool = True) -> np.ndarray:
    """H x W x 3 uint8 in, same out; channel order BGR when ``bgr``."""
    h, w = image.shape[:2]
    rgb = image[..., ::-1] if bgr else image
    hp, wp = -(-h // 8) * 8, -(-w // 8) * 8
    x = np.pad(rgb.astype(np.float64), ((0, hp - h), (0, wp - w), (0, 0)), mode="edge")
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    ycc = np.stack([0.299 * r + 0.587 * g + 0.114 * b - 128,
                    -0.168735892 * r - 0.331264108 * g + 0.5 * b,
                    0.5 * r - 0.418687589 * g - 0.081312411 * b])
    blocks = ycc.reshape(3, hp // 8, 8, wp // 8, 8).transpose(0, 1, 3, 2, 4)
    d = dct_matrix()
    coef = d @ blocks @ d.T
    q = np.stack([ijg_table(LUMA, quality), ijg_table(CHROMA, quality),
                  ijg_table(CHROMA, quality)])[:, None, None]
    back = d.T @ (np.round(coef / q) * q) @ d
    y, cb, cr = back.transpose(0, 1, 3, 2, 4).reshape(3, hp, wp)[:, :h, :w]
    y = y + 128
    out = np.stack([y + 1.402 * cr, y - 0.344136286 * cb - 0.714136286 * cr, y + 1.772 * cb], -1)
    out = np.clip(np.round(out), 0, 255).astype(np.uint8)
    return out[..., ::-1].copy() if bgr else out
