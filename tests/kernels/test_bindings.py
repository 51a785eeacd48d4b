"""The pycuda and cuda-python launchers against fake driver modules (no GPU here): which
driver calls each launcher method makes, with which arguments, and how CUDA errors come
back. Where the real ``cuda.bindings.driver`` is installed (it imports without a GPU),
every call the fake recorded is also checked against the real function's parameter list.
"""

from __future__ import annotations

import re
import types
from typing import Any

import numpy as np
import pytest

from kernels import loader
from kernels.cuda_bindings import STREAM_NON_BLOCKING, CudaPythonLauncher, PycudaLauncher
from kernels.loader import CudaCallError, CudaStream, create_launcher, i32, ptr


class Handle:
    """CUstream / CUdeviceptr stand-in: an int-like wrapper, as cuda-python has."""

    def __init__(self, value: int = 0) -> None:
        self.value = int(value)

    def __int__(self) -> int:
        return self.value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Handle) and other.value == self.value

    def __hash__(self) -> int:
        return self.value


def fake_cuda_driver(log: list[tuple[str, tuple]], fail: dict[str, int]) -> types.ModuleType:
    mod = types.ModuleType("cuda.bindings.driver")
    mod.CUresult = types.SimpleNamespace(CUDA_SUCCESS=0)
    mod.CUstream = mod.CUdeviceptr = Handle
    mod.CUdevice_attribute = types.SimpleNamespace(
        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR="major",
        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR="minor")
    results: dict[str, Any] = {
        "cuDeviceGet": "dev0", "cuDevicePrimaryCtxRetain": "ctx0", "cuMemAlloc": 0x7000,
        "cuStreamCreate": Handle(0xBEEF), "cuDeviceGetName": b"Orin\0\0\0garbage",
        "cuModuleLoadData": "module", "cuModuleGetFunction": "function"}

    def call(name: str) -> Any:
        def fn(*args: Any) -> Any:
            log.append((name, args))
            if name == "cuGetErrorName":
                return 0, b"CUDA_ERROR_ILLEGAL_ADDRESS"
            if name == "cuDeviceGetAttribute":
                return 0, {"major": 8, "minor": 7}[args[0]]
            if name in fail:
                return (fail[name],)
            return (0, results[name]) if name in results else (0,)
        return fn

    for name in ("cuInit", "cuDeviceGet", "cuDevicePrimaryCtxRetain", "cuCtxSetCurrent",
                 "cuMemAlloc", "cuMemFree", "cuStreamCreate", "cuStreamDestroy",
                 "cuStreamSynchronize", "cuMemcpyHtoDAsync", "cuMemcpyDtoHAsync",
                 "cuDeviceGetName", "cuDeviceGetAttribute", "cuGetErrorName", "cuLaunchKernel",
                 "cuModuleLoadData", "cuModuleGetFunction", "cuModuleUnload",
                 "cuDevicePrimaryCtxRelease", "cuMemcpyHtoD", "cuMemcpyDtoH", "cuMemcpyDtoD",
                 "cuCtxSynchronize"):
        setattr(mod, name, call(name))
    return mod


@pytest.fixture
def cuda_log(monkeypatch: pytest.MonkeyPatch) -> tuple[list, dict]:
    log: list[tuple[str, tuple]] = []
    fail: dict[str, int] = {}
    driver = fake_cuda_driver(log, fail)

    def importer(name: str) -> Any:
        if name == "cuda.bindings.driver":
            return driver
        raise ImportError(name)

    monkeypatch.setattr(loader, "_import", importer)
    return log, fail


def test_cuda_python_launcher_calls(cuda_log: tuple[list, dict]) -> None:
    log, fail = cuda_log
    launcher = create_launcher("cuda-python")
    assert isinstance(launcher, CudaPythonLauncher)
    assert [name for name, _ in log] == ["cuInit", "cuDeviceGet", "cuDevicePrimaryCtxRetain",
                                         "cuCtxSetCurrent"]
    assert log[2][1] == ("dev0",) and log[3][1] == ("ctx0",)
    log.clear()
    stream = launcher.create_stream()
    assert stream == CudaStream(0xBEEF, Handle(0xBEEF))
    assert log[-1] == ("cuStreamCreate", (STREAM_NON_BLOCKING,))
    host = np.arange(6, dtype=np.float32)
    launcher.copy_htod_async(0x7000, host, stream)
    name, args = log[-1]
    assert name == "cuMemcpyHtoDAsync" and args[0] == Handle(0x7000)
    assert args[2:] == (host.nbytes, Handle(0xBEEF)) and isinstance(args[1], int)
    launcher.copy_dtoh_async(host, 0x7000, stream)
    assert log[-1][0] == "cuMemcpyDtoHAsync" and log[-1][1][1:] == (Handle(0x7000), 24,
                                                                   Handle(0xBEEF))
    assert launcher.device_name() == "Orin" and log[-1] == ("cuDeviceGetName", (256, "dev0"))
    assert launcher.compute_capability() == (8, 7)
    launcher.load("median", b"fatbin")
    launcher.launch("median", "rs_median3_u8", (2, 3), (16, 16), [ptr(0x7000), i32(5)],
                    shared_bytes=64, stream=stream)
    name, args = log[-1]
    assert name == "cuLaunchKernel" and args[:9] == ("function", 2, 3, 1, 16, 16, 1, 64,
                                                    Handle(0xBEEF))
    assert args[9][0] == (0x7000, 5) and args[10] == 0
    launcher.synchronize_stream(stream)
    fail["cuStreamSynchronize"] = 700
    with pytest.raises(CudaCallError, match="cuStreamSynchronize failed: "
                                            "CUDA_ERROR_ILLEGAL_ADDRESS"):
        launcher.synchronize_stream(stream)
    launcher.destroy_stream(stream)
    assert log[-1] == ("cuStreamDestroy", (Handle(0xBEEF),))
    launcher.close()
    assert log[-1] == ("cuDevicePrimaryCtxRelease", ("dev0",))
    _check_against_real_driver(log)


def _check_against_real_driver(log: list[tuple[str, tuple]]) -> None:
    """Each recorded call's argument count equals the real function's parameter count."""
    try:
        from cuda.bindings import driver as real
    except ImportError:
        return
    for name, args in log:
        first = getattr(real, name).__doc__.strip().splitlines()[0]
        params = re.match(rf"{name}\((.*)\)", first)
        assert params is not None, first
        count = len([p for p in params.group(1).split(",") if p.strip()])
        assert count == len(args), f"{name}: called with {len(args)} args, real {first}"


def test_cuda_python_start_failure_is_unavailable(cuda_log: tuple[list, dict]) -> None:
    _, fail = cuda_log
    fail["cuInit"] = 100  # CUDA_ERROR_NO_DEVICE
    with pytest.raises(loader.BackendUnavailableError, match="cuInit failed"):
        create_launcher("cuda-python")


class FakePycuda:
    """pycuda.driver's surface used by PycudaLauncher, recording calls."""

    def __init__(self) -> None:
        self.log: list[tuple[str, tuple]] = []
        log = self.log

        class Ctx:
            def push(self) -> None:
                log.append(("push", ()))

            def pop(self) -> None:
                log.append(("pop", ()))

        class Device:
            def __init__(self, ordinal: int) -> None:
                log.append(("Device", (ordinal,)))

            def retain_primary_context(self) -> Ctx:
                return Ctx()

            def name(self) -> str:
                return "NVIDIA H200"

            def compute_capability(self) -> tuple[int, int]:
                return 9, 0

        class Stream:
            def __init__(self, flags: int = 0) -> None:
                log.append(("Stream", (flags,)))
                self.handle = 0xCAFE

            def synchronize(self) -> None:
                log.append(("Stream.synchronize", ()))

        class Allocation:
            def __init__(self, nbytes: int) -> None:
                self.address = 0x9000

            def __int__(self) -> int:
                return self.address

            def free(self) -> None:
                log.append(("free", (self.address,)))

        self.module = types.ModuleType("pycuda.driver")
        self.module.init = lambda: log.append(("init", ()))
        self.module.Device, self.module.Stream = Device, Stream
        self.module.mem_alloc = Allocation
        for name in ("memcpy_htod_async", "memcpy_dtoh_async"):
            setattr(self.module, name,
                    (lambda n: lambda *a: log.append((n, a)))(name))


def test_pycuda_launcher_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakePycuda()
    monkeypatch.setattr(loader, "_import",
                        lambda name: fake.module if name == "pycuda.driver" else None)
    launcher = create_launcher("pycuda")
    assert isinstance(launcher, PycudaLauncher)
    assert [n for n, _ in fake.log] == ["init", "Device", "push"]
    stream = launcher.create_stream()
    assert stream.handle == 0xCAFE and fake.log[-1] == ("Stream", (STREAM_NON_BLOCKING,))
    host = np.zeros(4, np.float32)
    address = launcher.alloc(16)
    launcher.copy_htod_async(address, host, stream)
    assert fake.log[-1][0] == "memcpy_htod_async" and fake.log[-1][1][0] == 0x9000
    assert fake.log[-1][1][2] is stream.native
    launcher.copy_dtoh_async(host, address, stream)
    assert fake.log[-1][1][0] is host and fake.log[-1][1][2] is stream.native
    launcher.synchronize_stream(stream)
    assert fake.log[-1] == ("Stream.synchronize", ())
    assert launcher.device_name() == "NVIDIA H200" and launcher.compute_capability() == (9, 0)
    launcher.close()
    assert fake.log[-2:] == [("free", (0x9000,)), ("pop", ())]
