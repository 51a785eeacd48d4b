"""Expectation over transformation for a sticker, drawn from the synthetic camera's own world.

Athalye et al. 2018 ("Synthesizing robust adversarial examples") optimise an expectation
over the transformations a real camera applies; Eykholt et al. 2018 (RP2) sample them from
photos of the sign at several distances and angles. Here they come from the synthetic
camera itself (``cloud_train.scenes``, ``cloud_train.synthetic_camera``), so the sticker
is optimised against exactly the world the car drives through:

1. a road scene and a sign beside it at 24-120 px (1 / size uniform between a far and a
   near size, as the camera's approach draws it), posed by the camera's pose model
   (yaw up to 25 degrees, pitch, roll, perspective, a bent plate);
2. the camera's exposure curve (``scene_lut``: gain, contrast, gamma, colour cast), its
   3 x 3 lens blur (sigma 0.3-0.7) and sensor noise (std 1-4 grey levels), and, with
   probability ``jpeg_p``, JPEG compression (quality 50-95) as in compressed video;
3. the crop the car would classify: the box the real sign locator (``locate_signs``)
   returns on the rendered frame, resized to the model input with bilinear sampling
   like ``cv2.resize(INTER_LINEAR)``.

Scenes, poses, exposure curves and locator boxes are drawn once per pool (NumPy, the
real renderer); the sign with the sticker is then warped, lit, blurred, noised and
cropped in torch for every draw, so gradients reach the sticker's colours. JPEG is not
differentiable: its backward pass is the identity (BPDA, Athalye et al. 2018). A printed
sticker also never matches its file exactly: each draw scales its colours by a random
gain of +-8 % per channel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from cloud_train.render import sign_corners
from cloud_train.scenes import camera_finish, place_sign, scene_background, scene_lut, sign_centre
from cloud_train.sign_art import ART_SIZE, sign_rgba
from edge_runtime.locate import box_iou, locate_signs
from roadshield_base.errors import ConfigError

_LEVELS = (ART_SIZE, ART_SIZE // 2, ART_SIZE // 4)


@dataclass(frozen=True)
class EotSample:
    """One drawn view of the sign: everything but the sticker, fixed.

    level: which art level the renderer warps (0: 128 px, 1: 64, 2: 32; as ``place_sign``
    picks it). grid: [1, h, w, 2] float32 sampling grid from the window's pixels into that
    level (``grid_sample``, align_corners=False). background: [3, h, w] float32 RGB 0-255,
    the scene around the sign with its pole. lut: [3, 256] float32, the exposure curve.
    kernel: [3, 3] float32 lens blur. noise_std: grey levels. box: (x0, y0, x1, y1) crop in
    window pixels, x1/y1 exclusive (the locator's box). sign_px: the sign's side in the frame.
    """

    level: int
    grid: torch.Tensor
    background: torch.Tensor
    lut: torch.Tensor
    kernel: torch.Tensor
    noise_std: float
    box: tuple[int, int, int, int]
    sign_px: float


class _JpegBPDA(torch.autograd.Function):
    """OpenCV JPEG forward (on 0-255 RGB), identity backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, quality: int) -> torch.Tensor:  # type: ignore[override]
        img = x.detach().clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(img[..., ::-1]),
                               [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
        out = cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1] if ok else img
        return torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1).to(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to whole grey levels forward, identity backward (the camera's uint8 frames)."""
    return x + (x.round() - x).detach()


def _apply_lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear lookup of [3, h, w] values in 0-255 through a [3, 256] curve."""
    v = x.clamp(0, 255)
    i0 = v.detach().floor().clamp(0, 254).long()
    frac = v - i0
    flat0 = torch.gather(lut, 1, i0.flatten(1)).view_as(v)
    flat1 = torch.gather(lut, 1, (i0 + 1).flatten(1)).view_as(v)
    return flat0 + (flat1 - flat0) * frac


class EotPool:
    """A fixed set of views of one sign class, and the differentiable sticker renderer.

    count: views to draw; seed fixes them. input_size: the model's input side (px).
    frame: the camera's (width, height). near_px: the sign's side at its closest (the
    camera's default 120 px); far_px: at its farthest (24 px). jpeg_p: chance of JPEG.
    Views whose clean sign the locator misses are skipped (the car never classifies them)
    and counted in ``missed``.
    """

    def __init__(self, class_index: int, count: int = 96, seed: int = 0, input_size: int = 32,
                 frame: tuple[int, int] = (640, 480), near_px: float = 120.0,
                 far_px: float = 24.0, jpeg_p: float = 0.25) -> None:
        if count < 1 or input_size < 8:
            raise ConfigError(f"EOT pool of {count} views at {input_size} px",
                              "draw at least one view for a model input of 8 px or more")
        if not 4 <= far_px <= near_px or not 0.0 <= jpeg_p <= 1.0:
            raise ConfigError(f"sign sizes {far_px}-{near_px} px / jpeg_p {jpeg_p} out of range",
                              "use far_px <= near_px (e.g. 24 and 120) and jpeg_p in [0, 1]")
        self.class_index = int(class_index)
        self.input_size = int(input_size)
        self.jpeg_p = float(jpeg_p)
        art = torch.from_numpy(sign_rgba(self.class_index).astype(np.float32)).permute(2, 0, 1)
        self.art_rgb = art[:3].contiguous()
        self.art_alpha = art[3:].contiguous()
        self.samples: list[EotSample] = []
        self.missed = 0
        rng = np.random.default_rng((int(seed), 77, self.class_index))
        attempts = 0
        while len(self.samples) < count:
            attempts += 1
            if attempts > 4 * count + 20:
                raise ConfigError(f"the locator found the sign in only {len(self.samples)} of "
                                  f"{attempts} views", "check the sign class and frame size")
            sample = self._draw(rng, frame, far_px, near_px)
            if sample is None:
                self.missed += 1
            else:
                self.samples.append(sample)

    def __len__(self) -> int:
        return len(self.samples)

    def _draw(self, rng: np.random.Generator, frame: tuple[int, int], far_px: float,
              near_px: float) -> EotSample | None:
        width, height = frame
        seeds = [int(v) for v in rng.integers(0, 2**62, 4)]
        bg, layout = scene_background(np.random.default_rng(seeds[0]), width, height)
        t = rng.uniform()
        lo, hi = far_px * rng.uniform(0.9, 1.15), near_px * rng.uniform(0.85, 1.0)
        px = 1.0 / ((1 - t) / lo + t / hi)  # 1/size is linear along the approach
        lut = scene_lut(np.random.default_rng(seeds[1]))
        # the real frame with the clean sign, for the box the car's locator returns
        clean = bg.copy()
        truth, _ = place_sign(clean, layout, self.class_index, px, seeds[2])
        finished = camera_finish(clean, lut, np.random.default_rng(seeds[3]))
        hits = [c.box for c in locate_signs(finished) if box_iou(c.box, truth) >= 0.5]
        if not hits:
            return None
        # the same pole and pose place_sign drew, on the background without the sign
        cx, cy = sign_centre(layout, px)
        foot = min(height + 10.0, layout.horizon + layout.ground * px)
        pw = max(1, round(px * 0.07))
        cv2.rectangle(bg, (round(cx - pw / 2), round(cy)), (round(cx + pw / 2), round(foot)),
                      (105, 105, 100), -1)
        corners = sign_corners(np.random.default_rng(seeds[2]), (0.0, 0.0), px,
                               max_yaw_deg=25.0) + np.array([cx, cy], np.float32)
        box = hits[0]
        wx0 = max(0, min(int(math.floor(corners[:, 0].min())) - 2, box[0]) - 1)
        wy0 = max(0, min(int(math.floor(corners[:, 1].min())) - 2, box[1]) - 1)
        wx1 = min(width, max(int(math.ceil(corners[:, 0].max())) + 3, box[2]) + 1)
        wy1 = min(height, max(int(math.ceil(corners[:, 1].max())) + 3, box[3]) + 1)
        span = float(np.max(np.ptp(corners, axis=0)))
        level = next((i for i in (2, 1, 0) if _LEVELS[i] >= span), 0)
        n = _LEVELS[level]
        src = np.array([[0, 0], [n, 0], [n, n], [0, n]], np.float32) - 0.5
        m = cv2.getPerspectiveTransform(src, corners - np.array([wx0, wy0], np.float32) - 0.5)
        ys, xs = np.mgrid[0:wy1 - wy0, 0:wx1 - wx0].astype(np.float64)
        pts = np.linalg.inv(m) @ np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)])
        sx, sy = pts[0] / pts[2], pts[1] / pts[2]
        grid = np.stack([(sx + 0.5) / n * 2 - 1, (sy + 0.5) / n * 2 - 1], axis=1)
        grid = grid.reshape(wy1 - wy0, wx1 - wx0, 2).astype(np.float32)
        cam = np.random.default_rng(seeds[3])
        sigma = cam.uniform(0.3, 0.7)
        k1 = cv2.getGaussianKernel(3, sigma).astype(np.float32)
        return EotSample(
            level=level, grid=torch.from_numpy(grid)[None],
            background=torch.from_numpy(bg[wy0:wy1, wx0:wx1].astype(np.float32)).permute(2, 0, 1),
            lut=torch.from_numpy(lut[0].T.astype(np.float32).copy()),
            kernel=torch.from_numpy(k1 @ k1.T), noise_std=float(cam.integers(1, 5)),
            box=(box[0] - wx0, box[1] - wy0, box[2] - wx0, box[3] - wy0), sign_px=float(px))

    def levels(self, colours: torch.Tensor, mask: torch.Tensor,
               upto: int = 2) -> list[torch.Tensor]:
        """The sign art with the sticker, as [4, n, n] RGBA (0-255) levels 0..``upto``
        (128, 64 and 32 px).

        colours: [3, 128, 128] in [0, 1]; mask: [1, 128, 128] in {0, 1} (on the plate).
        """
        rgb = self.art_rgb + (colours * 255.0 - self.art_rgb) * mask
        top = torch.cat([rgb, self.art_alpha], dim=0)[None]
        out = [top]
        for _ in range(upto):  # INTER_AREA halving of an even size is 2 x 2 averaging
            out.append(F.avg_pool2d(out[-1], 2))
        return [lv[0] for lv in out]

    def render(self, colours: torch.Tensor, mask: torch.Tensor, indices: list[int] | None = None,
               generator: torch.Generator | None = None, jitter: bool = True) -> torch.Tensor:
        """Model inputs [N, 3, S, S] float32 RGB in [0, 1] of the views ``indices`` (all by
        default) with the sticker on, differentiable w.r.t. ``colours``.

        Noise, the print gain and JPEG are drawn from ``generator`` (fresh every call);
        ``jitter=False`` leaves the print gain out.
        """
        idx = range(len(self.samples)) if indices is None else indices
        # one set of levels for every view; with the print gain, each view builds its own,
        # down to the level it warps only
        levels = None if jitter else self.levels(colours, mask)
        s = self.input_size
        out = []
        for i in idx:
            smp = self.samples[i]
            if levels is None:
                gain = 1.0 + (torch.rand(3, 1, 1, generator=generator) - 0.5) * 0.16
                sticker_rgb = (colours * gain).clamp(0, 1)
                art = self.levels(sticker_rgb, mask, upto=smp.level)[smp.level]
            else:
                art = levels[smp.level]
            warped = F.grid_sample(art[None], smp.grid, mode="bilinear", padding_mode="zeros",
                                   align_corners=False)[0]
            a = warped[3:] / 255.0
            img = smp.background + (warped[:3] - smp.background) * a
            img = _apply_lut(_round_ste(img.clamp(0, 255)), smp.lut)
            img = F.conv2d(F.pad(img[None], (1, 1, 1, 1), mode="reflect"),
                           smp.kernel.expand(3, 1, 3, 3), groups=3)[0]
            img = img + torch.randn(img.shape, generator=generator) * smp.noise_std
            img = _round_ste(img.clamp(0, 255))
            if self.jpeg_p > 0 and float(torch.rand(1, generator=generator)) < self.jpeg_p:
                quality = int(torch.randint(50, 96, (1,), generator=generator))
                img = _JpegBPDA.apply(img, quality)
            x0, y0, x1, y1 = smp.box
            crop = img[None, :, y0:y1, x0:x1]
            out.append(F.interpolate(crop, size=(s, s), mode="bilinear", align_corners=False))
        return torch.cat(out, dim=0) / 255.0
