"""The demo's drives: the undefended car and the defended stack, on a clean road and past
stickered stop signs, and the side-by-side video of the stickered drive."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from cloud_train import pipeline

SIGN, TARGET = "stop", "priority_road"


@dataclass(frozen=True)
class DemoStack:
    """One car: its ONNX model and the input defence it runs (None: none)."""

    name: str
    title: str
    model: Path
    defence: str | None = None


def drive_sources(seed: int, clean_frames: int, sticker_frames: int,
                  sticker_dir: Path) -> dict[str, str]:
    """The clean drive (every class, no sticker) and the stickered drive (stop signs, each
    carrying the printed sticker where its sticker.json puts it)."""
    path = quote(str(sticker_dir), safe="/")  # a URI query: '+' would read as a space
    return {"clean": f"synthetic://?seed={seed}&frames={clean_frames}&sticker_rate=0",
            "stickered": f"synthetic://?seed={seed + 1}&frames={sticker_frames}"
                         f"&classes={SIGN}&sticker_rate=1&sticker={path}"}


def run_drives(stacks: list[DemoStack], sources: dict[str, str], run: Path, *,
               actuator_factory: Any, progress: bool) -> dict[str, dict[str, Any]]:
    """Each stack on each drive; videos of the stickered drives, a decision log per drive
    (the first stack's clean drive logs to decisions.jsonl). Returns reports by stack and
    drive, as dicts."""
    out: dict[str, dict[str, Any]] = {}
    for i, stack in enumerate(stacks):
        out[stack.name] = {}
        for drive, source in sources.items():
            first = i == 0 and drive == "clean"
            log = run / ("decisions.jsonl" if first else f"decisions-{stack.name}-{drive}.jsonl")
            video = run / f"edge-{stack.name}-{drive}.mp4" if drive == "stickered" else None
            with actuator_factory() as (act, keepalive_s):
                rep = pipeline.run_edge(stack.model, source, video=video, decision_log=log,
                                        actuator=act, keepalive_s=keepalive_s,
                                        progress=progress, defence=stack.defence)
            out[stack.name][drive] = rep.to_dict()
    return out


def side_by_side(left: Path, right: Path, out: Path, titles: tuple[str, str],
                 fps: float = 15.0) -> int:
    """Write ``left`` and ``right`` (videos of one drive) next to each other, each under a
    title bar, into ``out``; returns the frame count."""
    import cv2

    from cloud_train.scenes import write_video

    def frames() -> Any:
        a, b = cv2.VideoCapture(str(left)), cv2.VideoCapture(str(right))
        try:
            while True:
                ok_a, fa = a.read()
                ok_b, fb = b.read()
                if not (ok_a and ok_b):
                    return
                yield np.hstack([_titled(fa, titles[0]), _titled(fb, titles[1])])
        finally:
            a.release()
            b.release()

    return write_video(frames(), out, fps=fps)


def _titled(frame: np.ndarray, title: str) -> np.ndarray:
    import cv2

    bar = np.full((28, frame.shape[1], 3), 25, np.uint8)
    cv2.putText(bar, title, (8, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1,
                cv2.LINE_AA)
    return np.vstack([bar, frame])
