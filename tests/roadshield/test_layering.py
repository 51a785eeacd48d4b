"""The layers of ARCHITECTURE.md hold: the edge core imports neither torch nor the cloud tier."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import edge_runtime


def _edge_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(edge_runtime.__path__, "edge_runtime."))


def test_edge_runtime_imports_without_torch_or_cloud_tiers():
    mods = _edge_modules() + ["actuator.interface", "kernels.reference"]
    assert "edge_runtime.loop" in mods and "edge_runtime.runners.torch_runner" in mods
    code = (f"import importlib, sys\nfor m in {mods!r}: importlib.import_module(m)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'torchvision', 'cloud_train', 'distill'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_leaf_packages_import_only_leaves():
    code = ("import sys, actuator.interface, kernels.reference\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'edge_runtime', 'cloud_train', 'distill', 'torch'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_base_package_imports_nothing_of_the_project():
    import roadshield_base

    mods = sorted(m.name for m in pkgutil.walk_packages(roadshield_base.__path__,
                                                          "roadshield_base."))
    assert {"roadshield_base.errors", "roadshield_base.fileio",
            "roadshield_base.trust"} <= set(mods)
    code = (f"import importlib, sys\nfor m in {mods!r}: importlib.import_module(m)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'roadshield', 'edge_runtime', 'cloud_train', 'distill', 'actuator', 'kernels', "
            "'torch'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"



def test_leaves_and_tiers_never_import_the_command_package():
    """The ``roadshield`` package is the roof: no tier's module may import it."""
    code = ("import importlib, pkgutil, sys\n"
            "for pkg in ('actuator', 'kernels', 'edge_runtime', 'distill', 'cloud_train'):\n"
            "    p = importlib.import_module(pkg)\n"
            "    for m in pkgutil.walk_packages(p.__path__, pkg + '.'):\n"
            "        importlib.import_module(m.name)\n"
            "print(sorted(m for m in sys.modules if m == 'roadshield' or "
            "m.startswith('roadshield.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
