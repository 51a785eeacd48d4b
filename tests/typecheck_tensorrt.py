"""Type-check the TensorRT code against the ``tensorrt-stubs`` package (TensorRT 10 API).

``make test`` runs this before pytest, and ``tests/edge_runtime/test_tensorrt_typing.py``
runs the same ``check()`` so plain pytest also fails when the API use breaks:

    python tests/typecheck_tensorrt.py

Why the stubs are staged instead of used where pip put them: the wheel installs
``tensorrt/__init__.pyi`` without a ``py.typed`` marker (mypy then skips it as an
untyped package and every ``trt.*`` becomes ``Any``), and its generated
``tensorrt_bindings/tensorrt.pyi`` is not valid Python in a few places (a parameter
named ``in``, a parameter without a default after defaulted ones), and a module-level
``bool: DataType`` (``trt.bool``) shadows the builtin, so every ``-> bool`` in them would
be an invalid type that mypy turns into ``Any``. So the ``.pyi`` files are copied into
``build/typestubs`` with those spots repaired, and the mypy settings in pyproject.toml
(``[tool.mypy]``) point ``mypy_path`` there.

The stubs' wheel requires the real ``tensorrt`` wheel, which neither builds nor runs
on CI: install them without it, ``pip install --no-deps tensorrt-stubs==...`` (the
Makefile does, see ``TRT_STUBS_SPEC``).
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / "build" / "typestubs"
STUBS_DIST = "tensorrt-stubs"
INSTALL_HINT = ("install them without the TensorRT wheel: .venv/bin/python -m pip install "
                "--no-deps 'tensorrt-stubs==10.8.0.43.1' (or run make test, which does)")


class StubsUnavailableError(RuntimeError):
    """The stubs are missing or cannot be repaired into valid Python."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(f"{message}\n  hint: {hint}")
        self.hint = hint


def _split_params(params: str) -> list[str]:
    """Split a parameter list at its top-level commas (annotations hold brackets)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(params):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(params[start:i])
            start = i + 1
    parts.append(params[start:])
    return parts


_DEF = re.compile(r"^(\s*def \w+\()(.*)(\) -> .*:)\s*$")


def repair_line(line: str) -> str:
    """One ``def`` line made valid: ``in`` -> ``in_``, and ``= ...`` for a parameter that
    follows a defaulted one (the stub generator copied pybind11's order verbatim)."""
    match = _DEF.match(line)
    if match is None:
        return line
    head, params, tail = match.groups()
    fixed, defaulted = [], False
    for param in _split_params(params):
        name = param.strip()
        if name == "in" or name.startswith("in:"):
            param = param.replace("in", "in_", 1)
            name = param.strip()
        if name.startswith("*") and not name.startswith("**"):
            defaulted = False  # keyword-only parameters need no default
        elif name.startswith("**") or name == "/":
            pass
        elif "=" in name:
            defaulted = True
        elif defaulted and name:
            param = f"{param} = ..."
        fixed.append(param)
    return f"{head}{','.join(fixed)}{tail}"


_ANNOTATED = re.compile(r"^\s*(def |[A-Za-z_]\w*: )")


def repair_text(text: str) -> str:
    """A whole stub made valid and precise (see the module docstring)."""
    lines = [repair_line(line) for line in text.splitlines()]
    if any(line.startswith("bool: ") for line in lines):
        # annotations in this module mean the builtin, not the module's trt.bool
        lines = [re.sub(r"\bbool\b", "builtins.bool", line)
                 if _ANNOTATED.match(line) and not line.startswith("bool: ") else line
                 for line in lines]
        first = next((i + 1 for i, line in enumerate(lines)
                      if line.startswith("from __future__")), 0)
        lines.insert(first, "import builtins")
    return "\n".join(lines) + "\n"


def stage_stubs(target: Path = STAGE) -> Path:
    """Copy the installed stubs' ``.pyi`` files under ``target``, repaired; returns it."""
    try:
        dist = importlib.metadata.distribution(STUBS_DIST)
    except importlib.metadata.PackageNotFoundError as err:
        raise StubsUnavailableError(f"{STUBS_DIST} is not installed", INSTALL_HINT) from err
    stubs = [f for f in dist.files or [] if f.suffix == ".pyi"]
    if not stubs:
        raise StubsUnavailableError(f"{STUBS_DIST} {dist.version} lists no .pyi files",
                                    f"reinstall it: {INSTALL_HINT}")
    staged: set[Path] = set()
    for stub in stubs:
        source = Path(str(stub.locate()))
        text = repair_text(source.read_text())
        try:
            ast.parse(text, filename=str(source))
        except SyntaxError as err:
            raise StubsUnavailableError(
                f"{source} is still not valid Python after repair (line {err.lineno}: "
                f"{err.msg})", f"pin the version the Makefile names; {INSTALL_HINT}") from err
        out = target / str(stub)
        staged.add(out)
        # file by file and atomically: another run may be reading the stubs right now
        if not out.is_file() or out.read_text() != text:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
            tmp.write_text(text)
            os.replace(tmp, out)
    for old in target.rglob("*.pyi"):
        if old not in staged:  # left by another version of the stubs
            old.unlink(missing_ok=True)
    return target


def mypy_command() -> list[str]:
    """The check itself: mypy with the ``[tool.mypy]`` settings (files, mypy_path)."""
    return [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")]


def check() -> subprocess.CompletedProcess[str]:
    """Stage the stubs and run mypy from the repository root; output is captured."""
    stage_stubs()
    return subprocess.run(mypy_command(), cwd=ROOT, capture_output=True, text=True,
                          check=False)


def main() -> int:
    try:
        result = check()
    except StubsUnavailableError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
