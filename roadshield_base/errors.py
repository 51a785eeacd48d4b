"""Typed errors shared by every tier.

Each error carries what went wrong and how to fix it; the CLI prints both as one
clear message instead of a traceback. Nothing here imports anything heavy, so
leaf packages (kernels, actuator) may import it too.
"""

from __future__ import annotations


class RoadshieldError(Exception):
    """Base class: ``str(err)`` is the problem, ``err.hint`` what to do about it."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base}\n  hint: {self.hint}" if self.hint else base


class DatasetError(RoadshieldError):
    """A dataset folder is missing, malformed, or holds an unreadable image."""


class ModelLoadError(RoadshieldError):
    """A checkpoint or ONNX file is missing, corrupt, or for another architecture."""


class CameraError(RoadshieldError):
    """A camera source URI cannot be parsed or opened."""


class BackendUnavailableError(RoadshieldError):
    """The requested inference backend is not installed on this machine."""


class ConfigError(RoadshieldError):
    """A setting is out of range or inconsistent."""


class ActuatorError(RoadshieldError):
    """The actuator refused or could not carry out a command."""
