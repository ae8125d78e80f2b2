"""Fixtures for the deploy checks: scripts/k8s_validate.py as a module and the promtool binary."""

from __future__ import annotations

from types import ModuleType

import pytest

from tests.deploy.helpers import PROMTOOL_HOW, load_script, require_binary


@pytest.fixture(scope="session")
def k8s_validate() -> ModuleType:
    return load_script("k8s_validate")


@pytest.fixture(scope="session")
def promtool() -> str:
    return require_binary("promtool", PROMTOOL_HOW)
