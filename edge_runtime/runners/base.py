"""The one runner contract every inference backend follows.

Modelled on Polygraphy's ``BaseRunner``: ``activate`` loads the model and
allocates what inference needs, ``infer`` maps input names to arrays and back,
``deactivate`` releases everything. A runner is a context manager and refuses
to infer while inactive, so a test harness can drive every backend the same way.
A runner loaded from an exported file also reports what the export recorded about the
model (``model_info``: class names, input size, tensor names), so the run loop takes it
from whichever backend loaded the file.
"""

from __future__ import annotations

import abc
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np

from roadshield_base.errors import ModelLoadError, RoadshieldError

from ..model_info import EXPORT_HINT, ModelInfo

log = logging.getLogger(__name__)


def named_array(arrays: dict[str, np.ndarray], name: str, who: str, hint: str) -> np.ndarray:
    """``arrays[name]``, or the only array when there is one under another name (a model
    exported with other tensor names); ConfigError naming what there was otherwise."""
    value = arrays.get(name)
    if value is None and len(arrays) == 1:
        value = next(iter(arrays.values()))
    if value is None:
        from roadshield_base.errors import ConfigError

        raise ConfigError(f"{who} has {sorted(arrays)}, not '{name}'", hint)
    return value


class RunnerStateError(RoadshieldError):
    """A runner was used while inactive, or activated twice."""


@dataclass(frozen=True)
class ModelBytes:
    """A model already in memory: the bytes a signed bundle's check hashed, handed to the
    runner as they are so nothing reopens the file between the check and the load.

    path: where the bytes came from (its suffix picks the backend; caches and logs name it;
    it is never read); data: the model file's bytes; origin: what vouched for them (e.g.
    "bundle b/ signed by key 2c1455ac...")."""

    path: Path
    data: bytes
    origin: str = ""

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def __str__(self) -> str:
        return str(self.path)


class BaseRunner(abc.ABC):
    """Backend-independent inference: ``dict[str, ndarray] -> dict[str, ndarray]``."""

    #: short backend name as it appears in logs and summaries, e.g. ``"onnxruntime:CPU"``
    name: str = "base"

    def __init__(self) -> None:
        self._active = False

    @property
    def is_active(self) -> bool:
        return self._active

    def activate(self) -> None:
        if self._active:
            raise RunnerStateError(f"runner {self.name} is already active",
                                   "call deactivate() before activating it again")
        self.activate_impl()
        self._active = True

    def deactivate(self) -> None:
        if not self._active:
            return
        try:
            self.deactivate_impl()
        finally:
            self._active = False

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self._active:
            raise RunnerStateError(f"runner {self.name} is not active",
                                   "use it as a context manager or call activate() first")
        return self.infer_impl(feed)

    @property
    @abc.abstractmethod
    def input_names(self) -> list[str]:
        """Names of the model's inputs (valid once active)."""

    @property
    @abc.abstractmethod
    def output_names(self) -> list[str]:
        """Names of the model's outputs (valid once active)."""

    @property
    def model_info(self) -> ModelInfo:
        """What the loaded model file says about itself (valid once active).

        Raises ``ModelLoadError`` when the runner carries no export metadata (a bare
        module, a file exported without it); backends that load exported files override
        this."""
        raise ModelLoadError(f"runner {self.name} carries no model metadata (class names, "
                             "input size)", f"run a file written by `roadshield distill "
                             f"export`; {EXPORT_HINT}")

    @abc.abstractmethod
    def activate_impl(self) -> None: ...

    @abc.abstractmethod
    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    @abc.abstractmethod
    def deactivate_impl(self) -> None: ...

    def __enter__(self) -> BaseRunner:
        self.activate()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.deactivate()
