"""Print the runtime dependency closure of imgsearch[cpu] as installed here, as pip constraints."""

from __future__ import annotations

import importlib.metadata as md
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
HEADER = """\
# Runtime pins for the service images: the versions the test suite ran with (CPU and GPU images).
# Used as pip constraints (-c), so a pin here never adds a package by itself.
# Refresh with `python deploy/docker/pins.py > deploy/docker/constraints.txt`.
"""


def runtime_roots(extra: str = "cpu") -> list[Requirement]:
    """The project's serving dependencies plus one optional extra, from pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"][extra]]]


def closure(roots: list[Requirement]) -> dict[str, str]:
    """Every installed distribution the roots need (markers evaluated here, no extras), name -> version."""
    seen: dict[str, str] = {}
    stack = list(roots)
    while stack:
        req = stack.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        dist = md.distribution(req.name)
        seen[name] = dist.version
        stack.extend(Requirement(r) for r in dist.requires or [])
    return seen


def main() -> int:
    pins = closure(runtime_roots())
    sys.stdout.write(HEADER + "".join(f"{n}=={v}\n" for n, v in sorted(pins.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
