"""Build the CUDA kernels and the host library of their shared math.

Device side: one fatbin per kernel source in ``kernels/cuda/``, holding SASS for
sm_87 (Jetson Orin) and sm_90 (Hopper) plus compute_90 PTX, which newer GPUs JIT.
Host side: ``libroadshield_pixel_math`` built from ``host_math.cpp``, which
includes the same ``pixel_math.cuh`` the kernels use; a plain C++ compiler is
enough (the header compiles without CUDA), nvcc is the fallback.

Outputs go to ``build/kernels/`` (git-ignored; ``ROADSHIELD_KERNEL_BUILD``
overrides it). File names carry a digest of the sources and flags, so a changed
source is rebuilt and an unchanged one is reused. Every output is written to a
temporary file and renamed into place.

    python -m kernels.build            # both
    python -m kernels.build --host     # host library only (no nvcc needed)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from roadshield_base.errors import BackendUnavailableError, RoadshieldError

SOURCE_DIR = Path(__file__).resolve().parent / "cuda"
SHARED_HEADER = SOURCE_DIR / "pixel_math.cuh"
HOST_SOURCE = SOURCE_DIR / "host_math.cpp"
HOST_LIBRARY_STEM = "libroadshield_pixel_math"

# Kernel source stem -> the extern "C" entry points it defines.
KERNELS: dict[str, tuple[str, ...]] = {
    "bitdepth": ("rs_bitdepth_u8",),
    "median": ("rs_median3_u8", "rs_median5_u8"),
    "jpeg_dct": ("rs_jpeg_u8",),
    "fused_preprocess": ("rs_preprocess_roi", "rs_preprocess_rois"),
}
GENCODE = (
    "-gencode", "arch=compute_87,code=sm_87",
    "-gencode", "arch=compute_90,code=sm_90",
    "-gencode", "arch=compute_90,code=compute_90",
)
ELF_ARCHES = (87, 90)
PTX_ARCHES = (90,)
# --fmad=false: no fused multiply-add contraction, so the device rounds exactly like
# the host library (built with -ffp-contract=off); the kernels are memory-bound.
NVCC_FLAGS = ("-O3", "-std=c++17", "--fmad=false")
HOST_FLAGS = ("-O2", "-std=c++17", "-fPIC", "-shared", "-ffp-contract=off")

_FATBIN_MAGIC = 0xBA55ED50
_FATBIN_KINDS = {1: "ptx", 2: "elf"}


class KernelBuildError(RoadshieldError):
    """The compiler rejected a kernel or host source."""


@dataclass(frozen=True)
class FatbinEntry:
    """One image inside a fatbin: ``kind`` "elf" (SASS) or "ptx", and the SM ``arch``."""

    kind: str
    arch: int


def default_build_dir() -> Path:
    """``$ROADSHIELD_KERNEL_BUILD`` or ``<repo>/build/kernels``."""
    env = os.environ.get("ROADSHIELD_KERNEL_BUILD")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "build" / "kernels"


def find_nvcc() -> str | None:
    """Path of nvcc: ``$NVCC``, then PATH, then ``/usr/local/cuda/bin``; None if absent."""
    for candidate in (os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def find_host_compiler() -> str | None:
    """A C++ compiler for the host library: ``$CXX``, then c++, g++, clang++; None if absent."""
    for candidate in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def _digest(paths: list[Path], flags: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    h.update("\0".join(flags).encode())
    return h.hexdigest()[:12]


def kernel_path(name: str, build_dir: Path | None = None) -> Path:
    """Where the fatbin of kernel source ``name`` (a key of ``KERNELS``) is built."""
    if name not in KERNELS:
        raise KernelBuildError(f"unknown kernel source {name!r}",
                               f"choose one of {', '.join(KERNELS)}")
    source = SOURCE_DIR / f"{name}.cu"
    digest = _digest([source, SHARED_HEADER], NVCC_FLAGS + GENCODE)
    return (build_dir or default_build_dir()) / f"{name}-{digest}.fatbin"


def host_library_path(build_dir: Path | None = None) -> Path:
    """Where the host library of the shared math is built."""
    digest = _digest([HOST_SOURCE, SHARED_HEADER], HOST_FLAGS)
    return (build_dir or default_build_dir()) / f"{HOST_LIBRARY_STEM}-{digest}.so"


def _compile(command: list[str], target: Path) -> Path:
    """Run ``command`` (whose output path is its last argument) and move the result to target."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    proc = subprocess.run([*command, str(tmp)], capture_output=True, text=True)
    if proc.returncode != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise KernelBuildError(f"building {target.name} failed ({command[0]} exit "
                               f"{proc.returncode}):\n{tail}",
                               "fix the source error above; run `python -m kernels.build` to "
                               "see the full command")
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, target)
    for stale in target.parent.glob(f"{target.name.rsplit('-', 1)[0]}-*{target.suffix}"):
        if stale != target:
            stale.unlink(missing_ok=True)
    return target


def build_kernel(name: str, build_dir: Path | None = None, nvcc: str | None = None,
                 force: bool = False) -> Path:
    """Compile ``kernels/cuda/<name>.cu`` into a fatbin (sm_87, sm_90, compute_90 PTX).

    Reuses an existing up-to-date fatbin unless ``force``. Raises
    ``BackendUnavailableError`` without nvcc and ``KernelBuildError`` on a compile error.
    """
    target = kernel_path(name, build_dir)
    if target.exists() and not force:
        return target
    compiler = nvcc or find_nvcc()
    if compiler is None:
        raise BackendUnavailableError("nvcc was not found (checked $NVCC, PATH and "
                                      "/usr/local/cuda/bin)",
                                      "install the CUDA toolkit (JetPack on a Jetson) or set "
                                      "NVCC=/path/to/nvcc")
    command = [compiler, "-fatbin", *NVCC_FLAGS, *GENCODE, f"-I{SOURCE_DIR}",
               str(SOURCE_DIR / f"{name}.cu"), "-o"]
    return _compile(command, target)


def build_kernels(build_dir: Path | None = None, nvcc: str | None = None,
                  force: bool = False) -> dict[str, Path]:
    """Build every kernel source; returns ``{source stem: fatbin path}``."""
    return {name: build_kernel(name, build_dir, nvcc, force) for name in KERNELS}


def build_host_library(build_dir: Path | None = None, compiler: str | None = None,
                       force: bool = False) -> Path:
    """Compile ``host_math.cpp`` into a shared library (C++ compiler, else nvcc).

    Raises ``BackendUnavailableError`` when neither a C++ compiler nor nvcc exists.
    """
    target = host_library_path(build_dir)
    if target.exists() and not force:
        return target
    cxx = compiler or find_host_compiler()
    if cxx is not None:
        command = [cxx, *HOST_FLAGS, f"-I{SOURCE_DIR}", str(HOST_SOURCE), "-o"]
    else:
        nvcc = find_nvcc()
        if nvcc is None:
            raise BackendUnavailableError(
                "no C++ compiler (c++, g++, clang++, $CXX) and no nvcc found",
                "install build-essential (apt-get install g++) or the CUDA toolkit")
        host_opts = ",".join(f for f in HOST_FLAGS if f not in ("-shared", "-std=c++17"))
        command = [nvcc, "-x", "cu", "-std=c++17", "-shared", "--compiler-options", host_opts,
                   f"-I{SOURCE_DIR}", str(HOST_SOURCE), "-o"]
    return _compile(command, target)


def fatbin_entries(path: Path) -> list[FatbinEntry]:
    """List the SASS and PTX images in a fatbin written by ``nvcc -fatbin``.

    Parses the container header (magic 0xBA55ED50, then entries of
    ``kind:u16, version:u16, header_size:u32, payload_size:u64, ...``, arch as u32
    at byte 28 of each entry header), so no cuobjdump is needed.
    """
    data = Path(path).read_bytes()
    if len(data) < 16 or struct.unpack_from("<I", data, 0)[0] != _FATBIN_MAGIC:
        raise KernelBuildError(f"{path} is not a CUDA fatbin (bad magic)",
                               "rebuild it with `python -m kernels.build --force`")
    header_size = struct.unpack_from("<H", data, 6)[0]
    body_size = struct.unpack_from("<Q", data, 8)[0]
    entries: list[FatbinEntry] = []
    offset, end = header_size, min(len(data), header_size + body_size)
    while offset + 32 <= end:
        kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, offset)
        arch = struct.unpack_from("<I", data, offset + 28)[0]
        entries.append(FatbinEntry(_FATBIN_KINDS.get(kind, f"kind{kind}"), arch))
        if entry_header == 0:
            break
        offset += entry_header + payload
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="build folder")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--host", action="store_true", help="host library only")
    which.add_argument("--device", action="store_true", help="fatbins only")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    try:
        if not args.device:
            print(f"host   {build_host_library(args.out, force=args.force)}")
        if not args.host:
            for name, path in build_kernels(args.out, force=args.force).items():
                images = ", ".join(f"{e.kind} sm_{e.arch}" for e in fatbin_entries(path))
                print(f"{name:<16} {path}  [{images}]")
    except RoadshieldError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
