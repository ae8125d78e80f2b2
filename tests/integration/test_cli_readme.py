"""README's "Using it" examples, run verbatim against a real local stack, so the docs cannot drift from the code."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from imgsearch.devstack import GALLERY, Stack
from tests.harness import ROOT, free_port_range

pytestmark = pytest.mark.slow


def using_it_blocks(language: str) -> list[str]:
    """The fenced blocks of one language in README's "Using it" section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Using it\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.DOTALL)


@dataclass
class Workspace:
    """A folder laid out like the checkout (var/stack/gallery, ~/photos) with a stack serving from it."""

    cwd: Path
    env: dict[str, str]
    gateway: str


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Workspace]:
    cwd = tmp_path_factory.mktemp("readme")
    stack = Stack(cwd / "var" / "stack")
    specs = stack.up(free_port_range(20), free_port_range(20), shards=2, timeout=300)
    try:
        gateway = next(s for s in specs if s.name == "gateway").address
        assert stack.index_gallery(gateway) == len(GALLERY)
        photos = cwd / "home" / "photos"
        photos.mkdir(parents=True)
        for name in ("moon", "coins"):
            src = next((stack.state_dir / "gallery").glob(f"{name}.*"))
            shutil.copyfile(src, photos / f"holiday-{src.name}")
        env = {
            **os.environ,
            "HOME": str(cwd / "home"),
            "IMGSEARCH_ADDRESS": gateway,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        yield Workspace(cwd, env, gateway)
    finally:
        stack.down()


def test_readme_shell_examples_run(workspace: Workspace) -> None:
    lines = [line for block in using_it_blocks("bash") for line in block.splitlines() if line.startswith("imgsearch ")]
    assert len(lines) >= 10, lines
    for line in lines:
        proc = subprocess.run(
            ["bash", "-c", line], cwd=workspace.cwd, env=workspace.env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, f"{line}\n{proc.stdout}\n{proc.stderr}"
        assert proc.stdout.strip(), line
        if " --json" in line:
            json.loads(proc.stdout)


def test_readme_python_examples_run(workspace: Workspace) -> None:
    blocks = using_it_blocks("python")
    assert len(blocks) >= 2
    for code in blocks:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            cwd=workspace.cwd,
            env=workspace.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, f"{code}\n{proc.stdout}\n{proc.stderr}"
        assert proc.stdout.strip(), code


def test_cli_options_after_the_command_and_errors_on_the_real_stack(workspace: Workspace) -> None:
    cat = str(workspace.cwd / "var" / "stack" / "gallery" / "cat.png")
    env = {k: v for k, v in workspace.env.items() if k != "IMGSEARCH_ADDRESS"}
    ok = subprocess.run(
        ["imgsearch", "tag", cat, "-k", "3", "--json", "--address", workspace.gateway],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert "cat" in [t["tag"] for t in json.loads(ok.stdout)["tags"]]
    bad = subprocess.run(
        ["imgsearch", "similar", "no-such-image", "--address", workspace.gateway],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1 and bad.stderr.startswith("imgsearch: NOT_FOUND: ")
    assert len(bad.stderr.strip().splitlines()) == 1
