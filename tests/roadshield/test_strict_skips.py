"""The strict-skips hook (tests/strict_skips.py), run on throwaway test trees with pytester:
a skip outside the ``gpu``/``trt``/``hw`` markers fails, naming the test and the reason;
a skip of a hardware-marked test stays a skip; with the hook off nothing changes."""

from __future__ import annotations

import pytest

INI = """
[pytest]
addopts = -p strict_skips -ra
markers =
    gpu: needs a CUDA device
    trt: needs TensorRT
    hw: needs real hardware
    slow: slow
"""

TESTS = """
import pytest

def test_skips_for_a_missing_package():
    pytest.skip("frobnicate is not installed")

@pytest.mark.gpu
def test_needs_a_gpu():
    pytest.skip("no CUDA device")

@pytest.mark.skipif(True, reason="cuobjdump not installed")
def test_skipif_unmarked():
    pass

@pytest.fixture
def board():
    pytest.skip("no serial board")

@pytest.mark.hw
def test_board_marked(board):
    pass

def test_board_unmarked(board):
    pass

@pytest.mark.xfail(reason="known bug", strict=True)
def test_xfail_is_not_a_skip():
    raise ValueError

def test_passes():
    pass
"""


@pytest.fixture
def tree(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.delenv("ROADSHIELD_STRICT_SKIPS", raising=False)
    pytester.makeini(INI)
    pytester.makepyfile(test_tree=TESTS)
    return pytester


def test_unmarked_skips_fail_and_hardware_skips_pass(tree: pytest.Pytester,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROADSHIELD_STRICT_SKIPS", "1")
    result = tree.runpytest()
    # call-phase skip: failed; skipif and fixture skips happen in setup: errors
    result.assert_outcomes(passed=1, failed=1, errors=2, skipped=2, xfailed=1)
    out = result.stdout.str()
    assert ("test_tree.py::test_skips_for_a_missing_package was skipped outside the hardware "
            "markers: Skipped: frobnicate is not installed") in out
    assert "test_tree.py::test_skipif_unmarked was skipped outside" in out
    assert "cuobjdump not installed" in out
    assert "test_tree.py::test_board_unmarked was skipped outside" in out
    assert "no serial board" in out
    assert "only tests marked gpu/trt/hw may skip" in out
    assert result.ret == pytest.ExitCode.TESTS_FAILED


@pytest.mark.parametrize("marker", ["gpu", "trt", "hw"])
def test_each_hardware_marker_may_skip(pytester: pytest.Pytester, marker: str) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(f"""
        import pytest

        pytestmark = pytest.mark.{marker}

        def test_it():
            pytest.skip("the hardware is absent")
    """)
    result = pytester.runpytest("--strict-skips")
    result.assert_outcomes(skipped=1)
    assert result.ret == pytest.ExitCode.OK


def test_a_module_that_skips_on_import_fails(tree: pytest.Pytester) -> None:
    tree.makepyfile(test_gone="""
        import pytest

        scipy = pytest.importorskip("a_module_that_is_not_installed")

        def test_hidden():
            pass
    """)
    result = tree.runpytest("--strict-skips", "test_gone.py")
    result.assert_outcomes(errors=1)
    out = result.stdout.str()
    assert "test_gone.py (every test in it) was skipped outside the hardware markers" in out
    assert "a_module_that_is_not_installed" in out


@pytest.mark.parametrize("value", [None, "0"])
def test_off_by_default(tree: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                        value: str | None) -> None:
    if value is not None:
        monkeypatch.setenv("ROADSHIELD_STRICT_SKIPS", value)
    result = tree.runpytest()
    result.assert_outcomes(passed=1, skipped=5, xfailed=1)
    assert result.ret == pytest.ExitCode.OK


def test_make_test_turns_it_on() -> None:
    # CI runs .ci/run -> make test; the switch must be in that recipe
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    makefile = (root / "Makefile").read_text()
    recipe = makefile.split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert "ROADSHIELD_STRICT_SKIPS=1" in recipe and "-m pytest" in recipe
    assert "make test" in (root / ".ci" / "run").read_text()
