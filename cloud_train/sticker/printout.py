"""Print files for a sticker: the PNG to print, a true-size PDF template, a preview, a JSON.

``write_sticker`` takes a sticker in the sign's art space (see ``placement``) and writes,
each file atomically, into one folder:

- ``sticker.png``: the sticker cropped to its box and upscaled (nearest neighbour) by a
  whole number of print pixels per art pixel, RGBA, alpha 0 off the ink. Its pHYs chunk
  holds the resolution that prints it at true size (``png_dpi``).
- ``sticker.pdf``: a page at TRUE physical size (1 mm on paper is 1 mm of the design; print
  at 100 %, never "fit to page"): the sign's outline dashed, the sticker at its place with its
  cut line, crosshairs at the sign's centre and the sticker box's corners labelled with
  their distances from the sign's left and top edges, and a 100 mm scale bar to check
  the print.
- ``preview.png``: the sign with the sticker on it, and the sign as the car's camera sees
  it at 40 px and 110 px.
- ``sticker.json`` (written last), format ``roadshield-sticker/1``:

  ``format``; ``sign``, ``target`` (null: untargeted), ``shape``: class and shape names;
  ``sign_mm``: the sign's WIDTH in mm as one measures a real sign, i.e. the horizontal
  extent of its plate (alpha > 127 of ``sign_rgba``), w_plate art pixels, so one art
  pixel is ``art_mm`` = sign_mm / w_plate mm; ``art_size``: 128; ``art_mm``;
  ``plate_box_art``: the plate's bounding box [x0, y0, x1, y1] in art pixels (x1/y1
  exclusive); ``plate_mm``: its [width, height] in mm; ``box_art``: the sticker's box
  [x0, y0, x1, y1] in art pixels; ``box_mm``: the same box in mm from the top-left corner
  of the sign's bounding box (x from the sign's left edge, y from its top edge);
  ``px_per_art``: print pixels per art pixel, max(1, round(dpi * art_mm / 25.4));
  ``dpi``: the resolution asked for; ``png_dpi``: the PNG's true resolution,
  px_per_art * 25.4 / art_mm; ``png_px``: the PNG's [width, height]; ``page_mm``: the
  PDF page's [width, height] in mm; ``png``, ``pdf``, ``preview``: the file names;
  ``area_share``: ink area / plate area; ``attack``: the caller's ``meta`` (model sha256,
  success rates, ...).
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from cloud_train.sign_art import ART_SIZE, sign_rgba
from cloud_train.sticker.placement import (
    STICKER_FORMAT,
    STICKER_JSON,
    STICKER_PNG,
    PlacedSticker,
    art_mm,
    check_positive,
    placed_from_art,
    plate_box,
    sticker_art,
)
from roadshield_base.errors import ConfigError
from roadshield_base.fileio import atomic_write_bytes, atomic_write_json

STICKER_PDF = "sticker.pdf"
STICKER_PREVIEW = "preview.png"
#: Blank paper around the sign's bounding box on the PDF page, mm.
PAGE_MARGIN_MM = 20.0
#: Length of the scale bar on the PDF page, mm.
SCALE_BAR_MM = 100.0
_MM_PER_INCH = 25.4


@dataclass(frozen=True)
class PrintLayout:
    """Physical sizes of one sticker print (all lengths in mm, x right, y down).

    art_mm: mm per art pixel; px_per_art: print pixels per art pixel; png_dpi: the PNG's
    true resolution; page_mm: PDF page (width, height); origin_mm: where the sign's plate
    box's top-left corner sits on the page.
    """

    art_mm: float
    px_per_art: int
    png_dpi: float
    plate_box_art: tuple[int, int, int, int]
    plate_mm: tuple[float, float]
    box_mm: tuple[float, float, float, float]
    page_mm: tuple[float, float]
    origin_mm: tuple[float, float]

    def page_xy(self, ax: Any, ay: Any) -> tuple[Any, Any]:
        """Page position (mm) of art-grid point (ax, ay) (pixel edges at whole numbers);
        floats or arrays of them."""
        px0, py0 = self.plate_box_art[:2]
        return (self.origin_mm[0] + (ax - px0) * self.art_mm,
                self.origin_mm[1] + (ay - py0) * self.art_mm)


def print_layout(placed: PlacedSticker, dpi: float) -> PrintLayout:
    """Sizes of ``placed`` printed at about ``dpi`` dots per inch (ConfigError: bad dpi)."""
    dpi = check_positive(dpi, "print resolution dpi", "give dots per inch, e.g. 300")
    mm = art_mm(placed.class_index, placed.sign_mm)
    ppa = max(1, round(dpi * mm / _MM_PER_INCH))
    px0, py0, px1, py1 = plate_box(placed.class_index)
    plate = ((px1 - px0) * mm, (py1 - py0) * mm)
    x0, y0, x1, y1 = placed.box_art
    box = ((x0 - px0) * mm, (y0 - py0) * mm, (x1 - px0) * mm, (y1 - py0) * mm)
    page = (max(plate[0], SCALE_BAR_MM) + 2 * PAGE_MARGIN_MM, plate[1] + 2 * PAGE_MARGIN_MM)
    origin = ((page[0] - plate[0]) / 2, PAGE_MARGIN_MM)
    return PrintLayout(mm, ppa, ppa * _MM_PER_INCH / mm, (px0, py0, px1, py1), plate, box,
                       page, origin)


def print_rgba(placed: PlacedSticker, px_per_art: int) -> np.ndarray:
    """The sticker at print resolution: rgba_art upscaled by ``px_per_art`` in both axes
    (nearest neighbour), H x W x 4 uint8 RGBA."""
    return np.repeat(np.repeat(placed.rgba_art, px_per_art, axis=0), px_per_art, axis=1)


def _png_with_dpi(rgba: np.ndarray, dpi: float) -> bytes:
    """PNG bytes of RGBA ``rgba`` with a pHYs chunk for ``dpi`` (OpenCV writes none)."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    if not ok:
        raise ConfigError(f"OpenCV cannot encode a {rgba.shape[1]} x {rgba.shape[0]} PNG",
                          "lower dpi or the sticker's size")
    data = buf.tobytes()
    if b"pHYs" in data[:64]:
        return data
    ppm = max(1, round(dpi / 0.0254))
    body = b"pHYs" + struct.pack(">IIB", ppm, ppm, 1)
    chunk = struct.pack(">I", 9) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
    end_ihdr = 8 + 4 + 4 + 13 + 4  # signature, then IHDR's length, type, data and CRC
    return data[:end_ihdr] + chunk + data[end_ihdr:]


def _contours_mm(binary: np.ndarray, scale: float, layout: PrintLayout, ax0: float,
                 ay0: float, mode: int, simplify: float = 0.0) -> list[np.ndarray]:
    """Outlines of ``binary`` (uint8 0/1, ``scale`` pixels per art pixel, its top-left at
    art point (ax0, ay0)) as closed N x 2 arrays of page mm, straightened to within
    ``simplify`` art pixels (0: as traced)."""
    contours, _ = cv2.findContours(binary, mode, cv2.CHAIN_APPROX_SIMPLE)
    out = []
    for c in contours:
        if simplify > 0:
            c = cv2.approxPolyDP(c, simplify * scale, closed=True)
        pts = c.reshape(-1, 2).astype(np.float64)
        pts = np.vstack([pts, pts[:1]])
        ax = ax0 + (pts[:, 0] + 0.5) / scale
        ay = ay0 + (pts[:, 1] + 0.5) / scale
        x, y = layout.page_xy(ax, ay)
        out.append(np.stack([x, y], axis=1))
    return out


def _cross(ax: Any, x: float, y: float, label: str, ha: str, va: str) -> None:
    """A placement crosshair at page mm (x, y) with its label beside it."""
    arm = 4.0
    ax.plot([x - arm, x + arm], [y, y], color="black", lw=0.3)
    ax.plot([x, x], [y - arm, y + arm], color="black", lw=0.3)
    dx = {"left": 1.0, "right": -1.0, "center": 0.0}[ha]
    dy = {"top": 1.0, "bottom": -1.0, "center": 0.0}[va]
    ax.text(x + dx, y + dy, label, ha=ha, va=va, fontsize=5)


def sticker_pdf(placed: PlacedSticker, layout: PrintLayout) -> bytes:
    """The true-size PDF template (page ``layout.page_mm``; 1 mm = 72 / 25.4 pt) as bytes."""
    from matplotlib.figure import Figure

    pw, ph = layout.page_mm
    fig = Figure(figsize=(pw / _MM_PER_INCH, ph / _MM_PER_INCH))
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.set_axis_off()
    ax.set_xlim(0, pw)
    ax.set_ylim(ph, 0)
    x0, y0, x1, y1 = placed.box_art
    left, top = layout.page_xy(x0, y0)
    right, bottom = layout.page_xy(x1, y1)
    ppa = layout.px_per_art
    ax.imshow(print_rgba(placed, ppa), extent=(left, right, bottom, top),
              interpolation="none", aspect="auto")
    # Cut line: the ink's outline (holes too), from the print-resolution mask.
    ink = (print_rgba(placed, ppa)[..., 3] > 0).astype(np.uint8)
    for c in _contours_mm(ink, ppa, layout, x0, y0, cv2.RETR_CCOMP):
        ax.plot(c[:, 0], c[:, 1], color="black", lw=0.25)
    # The sign's outline, dashed: its alpha upsampled 8x and traced, the art's pixel steps
    # straightened (to within 0.4 art pixel) so polygons keep straight sides.
    up = 8
    alpha = cv2.resize(sign_rgba(placed.class_index)[..., 3], (ART_SIZE * up, ART_SIZE * up),
                       interpolation=cv2.INTER_LINEAR)
    for c in _contours_mm((alpha > 127).astype(np.uint8), up, layout, 0, 0, cv2.RETR_EXTERNAL,
                          simplify=0.4):
        ax.plot(c[:, 0], c[:, 1], color="0.35", lw=0.4, ls=(0, (4, 3)))
    # Placement marks, labelled with their distances from the sign's left and top edges.
    cx, cy = layout.plate_mm[0] / 2, layout.plate_mm[1] / 2
    px, py = layout.origin_mm[0] + cx, layout.origin_mm[1] + cy
    _cross(ax, px, py, f"sign centre\n{cx:.1f} mm from left\n{cy:.1f} mm from top",
           "left", "top")
    bx0, by0, bx1, by1 = layout.box_mm
    for (bx, by), (ha, va) in (((bx0, by0), ("right", "bottom")), ((bx1, by0), ("left", "bottom")),
                               ((bx0, by1), ("right", "top")), ((bx1, by1), ("left", "top"))):
        _cross(ax, layout.origin_mm[0] + bx, layout.origin_mm[1] + by,
               f"{bx:.1f} mm from left\n{by:.1f} mm from top", ha, va)
    # Scale bar in the bottom margin.
    sx, sy = PAGE_MARGIN_MM, ph - PAGE_MARGIN_MM / 2.5
    ax.plot([sx, sx + SCALE_BAR_MM], [sy, sy], color="black", lw=0.8)
    for x in (sx, sx + SCALE_BAR_MM):
        ax.plot([x, x], [sy - 1.5, sy + 1.5], color="black", lw=0.8)
    ax.text(sx + SCALE_BAR_MM / 2, sy - 2.0, f"{SCALE_BAR_MM:g} mm (check the print scale)",
            ha="center", va="bottom", fontsize=7)
    target = placed.target or "any other class (untargeted)"
    ax.text(pw / 2, PAGE_MARGIN_MM / 2.5,
            f"{placed.sign} sign, {placed.shape} sticker, target {target}; "
            f"sign width {placed.sign_mm:g} mm; print at 100 % (no fit to page)",
            ha="center", va="center", fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="pdf", metadata={"CreationDate": None})
    return buf.getvalue()


def _camera_view(placed: PlacedSticker, sign_px: int, side: int) -> np.ndarray:
    """The stickered sign rendered at ``sign_px`` in a plain scene, cropped around it and
    shown ``side`` x ``side`` (nearest neighbour, BGR uint8), as the camera sees it."""
    from cloud_train.scenes import SceneLayout, camera_finish, place_sign

    n = 160
    frame = np.empty((n, n, 3), np.uint8)
    frame[:] = (196, 208, 220)
    layout = SceneLayout(n, n, n / 2, n / 2, 1, 0.0, 0.0, 2.0)
    place_sign(frame, layout, placed.class_index, sign_px, pose_seed=3, placed=placed)
    lut = np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (1, 1, 3))
    img = camera_finish(frame, lut, np.random.default_rng(0))
    half = int(sign_px * 0.7)
    crop = img[n // 2 - half:n // 2 + half, n // 2 - half:n // 2 + half]
    return cv2.resize(crop, (side, side), interpolation=cv2.INTER_NEAREST)


def sticker_preview(placed: PlacedSticker, side: int = 512) -> np.ndarray:
    """The stickered sign (art upscaled to ``side``) on light grey, beside it as the camera
    sees it at 40 px and 110 px: H x W x 3 uint8 BGR."""
    art = sticker_art(placed.class_index, placed)[0]
    big = cv2.resize(art, (side, side), interpolation=cv2.INTER_NEAREST).astype(np.float32)
    a = big[..., 3:] / 255.0
    sign = (big[..., :3] * a + 215.0 * (1 - a)).astype(np.uint8)[..., ::-1]
    panels = [(sign, "the sign with the sticker")]
    panels += [(_camera_view(placed, px, side), f"camera view, sign {px} px") for px in (40, 110)]
    gap, head = 16, 36
    out = np.full((side + head + gap, len(panels) * (side + gap) + gap, 3), 215, np.uint8)
    for k, (img, label) in enumerate(panels):
        x = gap + k * (side + gap)
        out[head:head + side, x:x + side] = img
        cv2.putText(out, label, (x, head - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (40, 40, 40), 1,
                    cv2.LINE_AA)
    return out


def sticker_doc(placed: PlacedSticker, layout: PrintLayout, dpi: float) -> dict[str, Any]:
    """The sticker.json document (format described in this module's docstring)."""
    plate = sign_rgba(placed.class_index)[..., 3] > 127
    ink = int(np.count_nonzero(placed.rgba_art[..., 3] > 0))
    h, w = placed.rgba_art.shape[:2]
    return {
        "format": STICKER_FORMAT,
        "sign": placed.sign,
        "target": placed.target,
        "shape": placed.shape,
        "sign_mm": placed.sign_mm,
        "art_size": ART_SIZE,
        "art_mm": round(layout.art_mm, 6),
        "plate_box_art": list(layout.plate_box_art),
        "plate_mm": [round(v, 3) for v in layout.plate_mm],
        "box_art": list(placed.box_art),
        "box_mm": [round(v, 3) for v in layout.box_mm],
        "px_per_art": layout.px_per_art,
        "dpi": float(dpi),
        "png_dpi": round(layout.png_dpi, 3),
        "png_px": [w * layout.px_per_art, h * layout.px_per_art],
        "page_mm": [round(v, 3) for v in layout.page_mm],
        "png": STICKER_PNG,
        "pdf": STICKER_PDF,
        "preview": STICKER_PREVIEW,
        "area_share": round(ink / float(np.count_nonzero(plate)), 6),
        "attack": dict(placed.meta),
    }


def write_sticker(out_dir: str | Path, colours: np.ndarray, mask: np.ndarray, *, sign: str,
                  target: str | None, shape: str, sign_mm: float, dpi: float = 300,
                  meta: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write sticker.png, sticker.pdf, preview.png and (last) sticker.json into ``out_dir``.

    colours: 128 x 128 x 3 uint8 RGB and mask: 128 x 128 bool (True on the ink), in the art
    grid of ``sign``; target: class name or None (untargeted); sign_mm: the real sign's
    width in mm (its plate's horizontal extent; one art pixel is sign_mm / w_plate mm);
    dpi: print resolution asked for (the PNG gets a whole number of pixels per art pixel,
    so its true resolution, ``png_dpi`` in the JSON, is close to it); meta: JSON-able notes
    stored under "attack". Each file is written atomically. Returns {"png", "pdf",
    "preview", "json"} -> path. ConfigError (with a hint) for invalid input.
    """
    placed = placed_from_art(colours, mask, sign, target, shape, sign_mm, meta)
    layout = print_layout(placed, dpi)
    out = Path(out_dir)
    paths = {"png": out / STICKER_PNG, "pdf": out / STICKER_PDF,
             "preview": out / STICKER_PREVIEW, "json": out / STICKER_JSON}
    atomic_write_bytes(paths["png"], _png_with_dpi(print_rgba(placed, layout.px_per_art),
                                                   layout.png_dpi))
    atomic_write_bytes(paths["pdf"], sticker_pdf(placed, layout))
    ok, prev = cv2.imencode(".png", sticker_preview(placed))
    if not ok:
        raise ConfigError("OpenCV cannot encode the preview PNG", "check the OpenCV install")
    atomic_write_bytes(paths["preview"], prev.tobytes())
    atomic_write_json(paths["json"], sticker_doc(placed, layout, dpi))
    return paths
