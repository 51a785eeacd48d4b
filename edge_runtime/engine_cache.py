"""TensorRT engines the device built itself, cached per TensorRT version and GPU.

A signed bundle carries ONNX models; a TensorRT engine only runs under the TensorRT
version and on the GPU model that built it, so the device builds its engine from the
bundle's verified ONNX bytes on first start and keeps it here:

    <root>/index.json                                    what the device built (below)
    <root>/<trt-version>/<gpu>-sm<cc>/<model-sha256>.engine
    <root>/<trt-version>/<gpu>-sm<cc>/timing.cache       kernel timings between builds
    <root>/.staging/                                     builds in progress
    <root>/.lock                                         one build at a time

e.g. ``/var/lib/roadshield/engines/10.3.0.30/orin-sm87/3f2a...c9.engine``. The root is
``$ROADSHIELD_ENGINE_CACHE`` or ``/var/lib/roadshield/engines``. ``index.json`` (format
``roadshield-engine-cache/1``) maps each engine's path to its ``EngineInfo`` (the sidecar
fields of ``runners.engine_meta``: ``engine_sha256``, ``onnx_sha256`` = the signed model's
digest, TensorRT version, GPU, ONNX metadata) and is written only by ``EngineCache.build``
after a build on this device. ``load`` refuses any engine the index does not list, an
index or engine writable by anyone but the device's own user (or root), and an engine
whose bytes differ from the digest the index recorded; it returns the very bytes it
hashed, which the runner hands to ``deserialize_cuda_engine`` (nothing is reopened).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from roadshield_base.errors import ConfigError, ModelLoadError
from roadshield_base.fileio import atomic_write_bytes
from roadshield_base.trust import TrustError

from .runners.base import ModelBytes
from .runners.engine_meta import EngineInfo, check_engine

INDEX_FORMAT = "roadshield-engine-cache/1"
INDEX_FILE = "index.json"
ENV_ROOT = "ROADSHIELD_ENGINE_CACHE"
DEFAULT_ROOT = Path("/var/lib/roadshield/engines")
BUILD_HINT = ("the service builds it before it starts (its ExecStartPre runs "
              "roadshield-prepare-engine): sudo systemctl restart roadshield-edge; or by hand, "
              "as the service user: sudo -u roadshield /opt/roadshield/venv/bin/python "
              "/opt/roadshield/bin/roadshield-prepare-engine --bundle DIR --trust-key PEM")
_VERSION = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+_-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

#: builds ``engine_path`` from ``onnx_path`` and returns its EngineInfo; called with the
#: keywords ``gpu=(name, (major, minor))`` and ``timing_cache=Path`` plus the build
#: options (``distill.engine.build_engine`` is one)
EngineBuilder = Callable[..., EngineInfo]


def gpu_slug(name: str) -> str:
    """A GPU name as a folder name: "Orin (nvgpu)" -> "orin-nvgpu"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


@dataclass(frozen=True)
class EngineKey:
    """What an engine is cached under: the TensorRT version and GPU it is for, and the
    sha256 (hex) of the signed ONNX model it is built from."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]
    model_sha256: str

    def __post_init__(self) -> None:
        if not _VERSION.match(self.tensorrt_version):
            raise ConfigError(f"TensorRT version {self.tensorrt_version!r} cannot name a "
                              "cache folder", "pass tensorrt.__version__")
        if not _SHA256.match(self.model_sha256):
            raise ConfigError(f"model digest {self.model_sha256!r} is not a sha256 (64 "
                              "lowercase hex digits)", "pass ModelBytes.sha256")
        major, minor = self.compute_capability
        if not (isinstance(major, int) and isinstance(minor, int)) or major < 1 or minor < 0:
            raise ConfigError(f"compute capability {self.compute_capability!r} is not "
                              "(major, minor)", "pass the launcher's compute_capability()")

    @property
    def capability(self) -> str:
        """"8.7", as ``EngineInfo.compute_capability`` writes it."""
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"

    @property
    def folder(self) -> str:
        major, minor = self.compute_capability
        return f"{self.tensorrt_version}/{gpu_slug(self.gpu_name)}-sm{major}{minor}"

    @property
    def relpath(self) -> str:
        """The engine's path under the cache root, as the index names it."""
        return f"{self.folder}/{self.model_sha256}.engine"


def _trusted_uids() -> set[int]:
    """Who may own the cache: the service's own user, and root."""
    return {os.geteuid(), 0}


def _check_private(st: os.stat_result, path: Path, what: str) -> None:
    """Refuse ``path`` unless this process's user (or root) owns it and nobody else may
    write it: the index and engines must be what the device itself wrote."""
    if st.st_uid not in _trusted_uids():
        raise TrustError(f"{what} {path} belongs to uid {st.st_uid}, not to this service "
                         f"(uid {os.geteuid()}) or root",
                         f"only engines this device built are loaded; delete {path} and "
                         "let the service rebuild it")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise TrustError(f"{what} {path} is writable by group or others "
                         f"(mode {stat.S_IMODE(st.st_mode):o})",
                         f"chmod go-w {path} (the service creates it 0700/0600), or delete "
                         "the cache and let the service rebuild it")


class EngineCache:
    """The device's own engines under ``root`` (see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> EngineCache:
        """``$ROADSHIELD_ENGINE_CACHE``, else ``/var/lib/roadshield/engines``."""
        env = os.environ if env is None else env
        return cls(env.get(ENV_ROOT) or DEFAULT_ROOT)

    def engine_path(self, key: EngineKey) -> Path:
        return self.root / key.relpath

    # -- the index ----------------------------------------------------------------------
    def _checked_dirs(self, key: EngineKey | None = None) -> None:
        """The root (and the key's folders) must be the device's own, not symlinks."""
        dirs = [self.root]
        if key is not None:
            first = self.root / key.tensorrt_version
            dirs += [first, self.root / key.folder]
        for path in dirs:
            try:
                st = path.lstat()
            except FileNotFoundError:
                return
            if not stat.S_ISDIR(st.st_mode):
                raise TrustError(f"{path} in the engine cache is not a folder (a link?)",
                                 f"delete it; the service recreates {self.root}")
            _check_private(st, path, "engine cache folder")

    def _read_private(self, path: Path, what: str) -> bytes | None:
        """``path``'s bytes, read once through one descriptor that was checked (regular
        file, not a symlink, the device's own); None when it does not exist."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as err:
            raise TrustError(f"cannot open {what} {path}: {err.strerror or err}",
                             "a symlink is refused; delete it and let the service rebuild "
                             "the cache") from err
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise TrustError(f"{what} {path} is not a regular file", "delete it")
            _check_private(st, path, what)
            return f.read()

    def entries(self) -> dict[str, EngineInfo]:
        """The index: engine path under the root -> what the device recorded building."""
        self._checked_dirs()
        index = self.root / INDEX_FILE
        data = self._read_private(index, "engine cache index")
        if data is None:
            return {}
        return {name: EngineInfo.from_json(entry, f"{index} entry {name}")
                for name, entry in self._parse_index(data, index).items()}

    @staticmethod
    def _parse_index(data: bytes, where: Path) -> dict[str, Any]:
        hint = f"delete {where.parent} and let the service rebuild its engines"
        try:
            doc = json.loads(data)
        except ValueError as err:
            raise ModelLoadError(f"{where} is not JSON: {err}", hint) from err
        engines = doc.get("engines") if isinstance(doc, dict) else None
        if not isinstance(engines, dict) or doc.get("format") != INDEX_FORMAT or \
                not all(isinstance(entry, dict) for entry in engines.values()):
            raise ModelLoadError(f"{where} is not a {INDEX_FORMAT} index", hint)
        return dict(engines)

    def lookup(self, key: EngineKey) -> EngineInfo | None:
        """The index entry for ``key``, or None when the device has not built it."""
        return self.entries().get(key.relpath)

    # -- loading ------------------------------------------------------------------------
    def load(self, key: EngineKey) -> tuple[bytes, EngineInfo]:
        """The engine's bytes (checked against the index) and its EngineInfo.

        Raises ``ModelLoadError`` when the device has not built it (or built it for
        another TensorRT version or GPU), ``TrustError`` when the index or the engine is
        not the device's own or the bytes are not the ones it built."""
        self._checked_dirs(key)
        info = self.lookup(key)
        path = self.engine_path(key)
        if info is None:
            raise ModelLoadError(
                f"no engine for model {key.model_sha256[:12]}... built on this device for "
                f"TensorRT {key.tensorrt_version} on {key.gpu_name} (sm {key.capability}) "
                f"in {self.root}", BUILD_HINT)
        data = self._read_private(path, "cached engine")
        if data is None:
            raise ModelLoadError(f"the engine cache index lists {path}, which is missing",
                                 BUILD_HINT)
        digest = hashlib.sha256(data).hexdigest()
        if digest != info.engine_sha256:
            raise TrustError(f"cached engine {path} has sha256 {digest[:12]}..., the device "
                             f"built {info.engine_sha256[:12]}...",
                             f"it was altered after the build; never run it: delete {path} "
                             "and let the service rebuild it")
        if info.onnx_sha256 != key.model_sha256:
            raise TrustError(f"the index says {path} was built from model "
                             f"{info.onnx_sha256[:12]}..., not {key.model_sha256[:12]}...",
                             f"delete {self.root} and let the service rebuild its engines")
        check_engine(path, info, tensorrt_version=key.tensorrt_version,
                     gpu_name=key.gpu_name, compute_capability=key.compute_capability,
                     engine_sha256=digest)
        return data, info

    # -- building -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One build (and index update) at a time, across processes."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._checked_dirs()
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def build(self, model: ModelBytes, key: EngineKey, builder: EngineBuilder,
              **options: Any) -> tuple[bytes, EngineInfo]:
        """Build the engine of ``model`` (a verified bundle's ONNX bytes) with ``builder``,
        store it under ``key`` and record it in the index; returns (engine bytes, info).

        The builder reads a private copy of the verified bytes; the engine is accepted only
        when the digest the builder recorded for the ONNX it parsed is the signed one."""
        if model.sha256 != key.model_sha256:
            raise ConfigError(f"{model.path} has sha256 {model.sha256[:12]}..., the key names "
                              f"{key.model_sha256[:12]}...", "build the key from model.sha256")
        with self._locked():
            staging_root = self.root / ".staging"
            staging_root.mkdir(mode=0o700, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=staging_root))  # 0700: only we write here
            try:
                return self._build_in(staging, model, key, builder, options)
            finally:
                shutil.rmtree(staging, ignore_errors=True)

    def _build_in(self, staging: Path, model: ModelBytes, key: EngineKey,
                  builder: EngineBuilder, options: dict[str, Any]) -> tuple[bytes, EngineInfo]:
        onnx_path = staging / "model.onnx"
        atomic_write_bytes(onnx_path, model.data, mode=0o600)
        folder = self.root / key.folder
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._checked_dirs(key)
        built = staging / "model.engine"
        info = builder(onnx_path, built, gpu=(key.gpu_name, key.compute_capability),
                       timing_cache=folder / "timing.cache", **options)
        if info.onnx_sha256 != key.model_sha256:
            raise TrustError(f"the engine was built from ONNX bytes with sha256 "
                             f"{info.onnx_sha256[:12]}..., not the signed model's "
                             f"{key.model_sha256[:12]}...",
                             "the staged copy changed during the build; build again")
        if (info.tensorrt_version, info.gpu_name, info.compute_capability) != \
                (key.tensorrt_version, key.gpu_name, key.capability):
            raise ModelLoadError(f"the builder made an engine for TensorRT "
                                 f"{info.tensorrt_version} on {info.gpu_name} (sm "
                                 f"{info.compute_capability}), the runtime has TensorRT "
                                 f"{key.tensorrt_version} on {key.gpu_name} "
                                 f"(sm {key.capability})",
                                 "build with the TensorRT the runtime imports (one venv)")
        data = built.read_bytes()
        if hashlib.sha256(data).hexdigest() != info.engine_sha256:
            raise ModelLoadError(f"the built engine {built} does not match the sha256 its "
                                 "builder recorded", "build again")
        atomic_write_bytes(self.engine_path(key), data, mode=0o600)
        index = self.root / INDEX_FILE
        raw = self._read_private(index, "engine cache index")
        engines = dict(self._parse_index(raw, index)) if raw is not None else {}
        engines[key.relpath] = {**info.to_json(), "origin": model.origin}
        doc = {"format": INDEX_FORMAT, "engines": engines}
        atomic_write_bytes(index, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode(),
                           mode=0o600)
        return data, info

    def ensure(self, model: ModelBytes, key: EngineKey, builder: EngineBuilder,
               **options: Any) -> tuple[bytes, EngineInfo, bool]:
        """The cached engine of ``model``, built first when the device has none for
        ``key``; returns (engine bytes, info, whether it was built now). A cached engine
        that fails its checks is refused, never rebuilt over silently."""
        if self.lookup(key) is None:
            return (*self.build(model, key, builder, **options), True)
        return (*self.load(key), False)
