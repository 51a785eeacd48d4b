"""The TensorRT code type-checks against ``tensorrt-stubs`` (the TensorRT 10 API).

The same check ``make test`` runs first (``tests/typecheck_tensorrt.py``), so plain
pytest fails too when a call stops matching the API. The second test proves the stubs
are really read: without them every ``trt.*`` is ``Any`` and mypy passes anything,
including the TensorRT 8 calls JetPack 6 no longer has.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import typecheck_tensorrt as tc


def _run(extra: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(tc.mypy_command() + extra, cwd=tc.ROOT, capture_output=True,
                          text=True, check=False)


def test_the_tensorrt_code_type_checks_against_the_tensorrt_10_stubs() -> None:
    result = tc.check()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success" in result.stdout


def test_the_check_rejects_the_tensorrt_8_api(tmp_path: Path) -> None:
    tc.stage_stubs()
    probe = tmp_path / "trt8_probe.py"
    probe.write_text(
        "import tensorrt as trt\n\n\n"
        "def run(context: trt.IExecutionContext, builder: trt.Builder,\n"
        "        network: trt.INetworkDefinition, config: trt.IBuilderConfig) -> None:\n"
        "    context.execute_async_v2([0, 0], 0)\n"
        "    builder.build_engine(network, config)\n"
        "    context.set_input_shape('input', 'not a shape')\n")
    result = _run([str(probe)])
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert '"IExecutionContext" has no attribute "execute_async_v2"' in out
    assert '"Builder" has no attribute "build_engine"' in out
    assert "set_input_shape" in out  # a str is no shape


@pytest.mark.parametrize(("line", "expected"), [
    # the stub generator's keyword parameter (configure_plugin of IPluginV3OneBuild)
    ("    def f(self: X, in: list[D], out: list[D]) -> None:",
     "    def f(self: X, in_: list[D], out: list[D]) -> None:"),
    # pybind11's order kept verbatim (INetworkDefinition.add_scale_nd)
    ("    def add(self, a: W = None, b: dict[str, int] = None, axis: int) -> L:",
     "    def add(self, a: W = None, b: dict[str, int] = None, axis: int = ...) -> L:"),
    # keyword-only parameters need no default: left alone
    ("def g(a: int = 1, *args: int, b: int) -> None:",
     "def g(a: int = 1, *args: int, b: int) -> None:"),
    ("x: int = 3", "x: int = 3"),
])
def test_repair_line_makes_stub_defs_valid(line: str, expected: str) -> None:
    assert tc.repair_line(line) == expected


def test_repair_text_keeps_bool_the_builtin_where_the_module_shadows_it() -> None:
    text = ("from __future__ import annotations\n"
            "__all__ = ['bool']\n"
            "class C:\n"
            "    flag: bool\n"
            "    def ok(self) -> bool:\n"
            "        ...\n"
            "bool: DataType\n")
    repaired = tc.repair_text(text)
    assert "import builtins\n" in repaired
    assert "    flag: builtins.bool\n" in repaired
    assert "def ok(self) -> builtins.bool:" in repaired
    assert "__all__ = ['bool']" in repaired and "\nbool: DataType\n" in repaired


def test_missing_stubs_name_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tc, "STUBS_DIST", "tensorrt-stubs-not-installed")
    with pytest.raises(tc.StubsUnavailableError, match="pip install --no-deps"):
        tc.stage_stubs(tc.ROOT / "build" / "typestubs-unused")
