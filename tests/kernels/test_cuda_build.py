"""The kernel build: nvcc fatbins for sm_87 (Jetson Orin) and sm_90 (+ compute_90 PTX),
the host library, caching and error reporting. Compiling needs nvcc (the CUDA toolkit,
which comes with the GPU stack: these are ``gpu`` tests, run by ``make test-gpu``) and
skips without it; the error-path tests need nothing."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from kernels import build
from kernels.build import (
    KERNELS,
    FatbinEntry,
    KernelBuildError,
    build_host_library,
    build_kernel,
    build_kernels,
    fatbin_entries,
)
from roadshield_base.errors import BackendUnavailableError


def needs_nvcc(test: Callable[..., None]) -> Callable[..., None]:
    """A test that compiles with nvcc. The CUDA toolkit is part of the GPU stack (CI has
    neither), so it is a ``gpu`` test, skipped where nvcc is missing."""
    test = pytest.mark.skipif(build.find_nvcc() is None,
                              reason="nvcc not found (CUDA toolkit not installed)")(test)
    return pytest.mark.gpu(test)


@pytest.fixture(scope="module")
def fatbins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if build.find_nvcc() is None:
        pytest.skip("nvcc not found (CUDA toolkit not installed)")
    return build_kernels(tmp_path_factory.mktemp("kernels"))


@needs_nvcc
def test_every_fatbin_holds_sm87_sm90_and_ptx(fatbins: dict[str, Path]) -> None:
    assert set(fatbins) == set(KERNELS)
    for name, path in fatbins.items():
        entries = set(fatbin_entries(path))
        assert {FatbinEntry("elf", 87), FatbinEntry("elf", 90),
                FatbinEntry("ptx", 90)} <= entries, (name, entries)


@needs_nvcc
def test_fatbins_export_the_kernel_entry_points(fatbins: dict[str, Path]) -> None:
    for name, path in fatbins.items():
        data = path.read_bytes()
        for kernel in KERNELS[name]:
            assert kernel.encode() in data, (name, kernel)


@needs_nvcc
@pytest.mark.skipif(shutil.which("cuobjdump") is None, reason="cuobjdump not installed")
def test_cuobjdump_lists_both_architectures(fatbins: dict[str, Path]) -> None:
    for path in fatbins.values():
        listing = subprocess.run(["cuobjdump", "--list-elf", str(path)], capture_output=True,
                                 text=True, check=True).stdout
        assert "sm_87" in listing and "sm_90" in listing, listing


@needs_nvcc
def test_build_is_cached_until_the_source_changes(fatbins: dict[str, Path]) -> None:
    path = fatbins["bitdepth"]
    before = path.stat().st_mtime_ns
    assert build_kernel("bitdepth", path.parent) == path
    assert path.stat().st_mtime_ns == before
    # The file name carries the digest of the source, header and flags.
    assert path.name.startswith("bitdepth-") and path.suffix == ".fatbin"


@needs_nvcc
def test_host_library_builds_with_nvcc_alone(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build, "find_host_compiler", lambda: None)
    lib = build_host_library(tmp_path)
    assert lib.exists() and lib.suffix == ".so"


@needs_nvcc
def test_compile_error_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(build.SHARED_HEADER, src / "pixel_math.cuh")
    (src / "bitdepth.cu").write_text('#include "pixel_math.cuh"\n'
                                     'extern "C" __global__ void rs_bitdepth_u8() { oops; }\n')
    monkeypatch.setattr(build, "SOURCE_DIR", src)
    monkeypatch.setattr(build, "SHARED_HEADER", src / "pixel_math.cuh")
    with pytest.raises(KernelBuildError, match="(?s)bitdepth-.*oops"):
        build_kernel("bitdepth", tmp_path / "out")
    assert not list((tmp_path / "out").glob("*bitdepth*"))  # no half-written output


def test_missing_nvcc_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build, "find_nvcc", lambda: None)
    with pytest.raises(BackendUnavailableError, match="nvcc was not found"):
        build_kernel("median", tmp_path)


def test_unknown_kernel_is_rejected() -> None:
    with pytest.raises(KernelBuildError, match="unknown kernel source"):
        build_kernel("sobel")


def test_fatbin_parser_rejects_other_files(tmp_path: Path) -> None:
    junk = tmp_path / "x.fatbin"
    junk.write_bytes(b"\x7fELF" + bytes(60))
    with pytest.raises(KernelBuildError, match="not a CUDA fatbin"):
        fatbin_entries(junk)


def test_build_cli_host_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if build.find_host_compiler() is None and build.find_nvcc() is None:
        pytest.skip("no C++ compiler and no nvcc")
    assert build.main(["--host", "--out", str(tmp_path)]) == 0
    assert "libroadshield_pixel_math-" in capsys.readouterr().out
