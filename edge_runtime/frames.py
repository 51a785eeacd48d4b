"""Frames and frame sources: what cameras hand to the run loop.

A source is opened from a URI (``csi://0``, ``/dev/video0``, ``v4l2://0``, a video
file, a folder of images, ``synthetic://...``). Schemes are looked up in a
registry, so tiers that must not be imported here (the synthetic renderer lives
in ``cloud_train``) register their own source at start-up.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType

import numpy as np

from roadshield_base.errors import CameraError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SignTruth:
    """Ground truth a synthetic frame carries: where the sign is and what it is.

    box: (x0, y0, x1, y1) in pixels, x1/y1 exclusive.
    """

    class_name: str
    box: tuple[int, int, int, int]
    stickered: bool = False


@dataclass
class Frame:
    """One camera frame.

    image: H x W x 3 uint8, BGR (OpenCV's order).
    index: 0-based position in the stream.
    timestamp: seconds since the source opened.
    truth: known sign, for synthetic sources only.
    """

    image: np.ndarray
    index: int
    timestamp: float
    truth: SignTruth | None = None


class FrameSource(abc.ABC):
    """An iterable of frames that must be closed; a context manager."""

    uri: str = ""

    @abc.abstractmethod
    def __iter__(self) -> Iterator[Frame]: ...

    def close(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Release the device or file; the default holds nothing."""

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


SourceFactory = Callable[[str], FrameSource]
_SOURCES: dict[str, SourceFactory] = {}


def register_source(scheme: str, factory: SourceFactory) -> None:
    """Make ``scheme://...`` URIs open through ``factory(uri)``."""
    _SOURCES[scheme] = factory


SOURCE_PLUGIN_GROUP = "roadshield.sources"
_plugins_loaded = False
#: scheme -> why its plugin did not load ("module:function: error"), for the error message
_plugin_errors: dict[str, str] = {}


def load_source_plugins() -> None:
    """Let installed packages register their schemes through the ``roadshield.sources``
    entry-point group (each entry point is a callable that calls ``register_source``).

    The cloud tier's ``synthetic://`` camera arrives this way, so the edge runtime never
    names the cloud tier and a device install without it simply lacks the scheme. A
    plugin that fails to import is skipped: its scheme then reads as unknown."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    for entry in entry_points(group=SOURCE_PLUGIN_GROUP):
        try:
            entry.load()()
        except ImportError as err:  # e.g. the plugin's own dependencies are absent
            log.debug("source plugin %s unavailable: %s", entry.name, err)
            _plugin_errors[entry.name] = f"{entry.value}: {err}"


def missing_plugin_error(scheme: str) -> CameraError | None:
    """The error for ``scheme://`` when an installed plugin offers it but could not be
    imported here (a device install without the tier that ships it), else None."""
    load_source_plugins()
    why = _plugin_errors.get(scheme)
    if why is None or scheme in _SOURCES:
        return None
    known = ", ".join(f"{s}://" for s in sorted(_SOURCES))
    return CameraError(f"the '{scheme}://' camera source is not installed here (its plugin "
                       f"{why})", "install the package that provides it, or pick a source "
                       f"this install has: {known + ', ' if known else ''}csi://N, v4l2://N, "
                       "/dev/videoN, a video file or a folder of images")


def registered_schemes() -> list[str]:
    load_source_plugins()
    return sorted(_SOURCES)


def source_factory(scheme: str) -> SourceFactory:
    if scheme not in _SOURCES:
        load_source_plugins()
    try:
        return _SOURCES[scheme]
    except KeyError:
        missing = missing_plugin_error(scheme)
        if missing is not None:
            raise missing from None
        known = ", ".join(f"{s}://" for s in registered_schemes()) or "none"
        raise CameraError(f"no camera source handles '{scheme}://'",
                          f"use one of: {known}, /dev/videoN, a video file or a folder") from None
