"""The layers of ARCHITECTURE.md hold: the base imports nothing of the project, the edge
core imports neither torch nor the cloud tier, and no tier imports the command package."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys

import edge_runtime
import roadshield_base


def _modules(package) -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(package.__path__,
                                                        package.__name__ + "."))


def _top_packages_after_importing(mods: list[str], watched: set[str]) -> list[str]:
    """The ``watched`` top-level packages a fresh interpreter holds after importing mods."""
    code = (f"import importlib, sys\nfor m in {mods!r}: importlib.import_module(m)\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {watched!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return ast.literal_eval(out.stdout)


def test_edge_runtime_imports_without_torch_or_cloud_tiers():
    mods = _modules(edge_runtime) + ["actuator.interface", "kernels.reference"]
    assert "edge_runtime.loop" in mods and "edge_runtime.runners.torch_runner" in mods
    assert _top_packages_after_importing(
        mods, {"torch", "torchvision", "cloud_train", "distill"}) == []


def test_leaf_packages_import_only_leaves():
    assert _top_packages_after_importing(
        ["actuator.interface", "kernels.reference"],
        {"edge_runtime", "cloud_train", "distill", "torch"}) == []


def test_base_package_imports_nothing_of_the_project():
    mods = _modules(roadshield_base)
    assert {"roadshield_base.errors", "roadshield_base.fileio",
            "roadshield_base.trust"} <= set(mods)
    assert _top_packages_after_importing(
        mods, {"roadshield", "edge_runtime", "cloud_train", "distill", "actuator", "kernels",
               "torch"}) == []


def test_leaves_and_tiers_never_import_the_command_package():
    """The ``roadshield`` package is the roof: no tier's module may import it."""
    import importlib

    mods = [m for pkg in ("actuator", "kernels", "edge_runtime", "distill", "cloud_train")
            for m in _modules(importlib.import_module(pkg))]
    assert "cloud_train.redteam_inference" in mods
    assert _top_packages_after_importing(mods, {"roadshield"}) == []
