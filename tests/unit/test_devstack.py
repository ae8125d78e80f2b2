"""The dev stack's start-up guards: taken ports are refused by name, health is trusted only from its own children."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgsearch.devstack import Stack, free_port_range, listens_on, log_tail, main, usage_text


@pytest.fixture()
def squatter() -> Iterator[tuple[int, int]]:
    """A listening socket on what would be the gateway's port of a stack based there, and that base."""
    base = free_port_range(20)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", base))
        s.listen()
        yield base, s.getsockname()[1]


def test_a_taken_port_is_refused_by_name_and_nothing_starts(
    tmp_path: Path, squatter: tuple[int, int], capsys: pytest.CaptureFixture[str]
) -> None:
    base, port = squatter
    state = tmp_path / "stack"
    metrics = free_port_range(20)
    code = main(["run", "--state-dir", str(state), "--port-base", str(base), "--metrics-base", str(metrics)])
    err = capsys.readouterr().err
    assert code == 1
    assert f"port {port} is in use (gateway); stop what holds it or run `make run PORT_BASE=" in err, err
    assert f"--port-base {base + 1000}" in err or "--port-base" in err
    assert not (state / "stack.json").exists() and not (state / "logs").exists(), "nothing may start"

    with pytest.raises(RuntimeError, match=rf"port {port} is in use \(gateway\).*make up PORT_BASE="):
        Stack(state).up(base, metrics, shards=2, timeout=5, command="up")


def test_a_taken_metrics_port_points_at_metrics_base(tmp_path: Path, squatter: tuple[int, int]) -> None:
    metrics_base, port = squatter
    with pytest.raises(RuntimeError, match=rf"port {port} is in use \(gateway metrics\).*METRICS_BASE="):
        Stack(tmp_path).up(free_port_range(20), metrics_base, shards=1, timeout=5)


def test_listener_ownership_is_told_by_pid() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert listens_on(os.getpid(), port) is True
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            assert listens_on(other.pid, port) is False
        finally:
            other.kill()
            other.wait()
    assert listens_on(os.getpid(), port) is False, "nobody listens any more"


def test_hints_name_the_address_when_ports_are_not_the_defaults(tmp_path: Path) -> None:
    assert "--address" not in usage_text("127.0.0.1:50050", tmp_path)
    text = usage_text("127.0.0.1:53050", tmp_path)
    assert "imgsearch --address 127.0.0.1:53050 tag" in text and "IMGSEARCH_ADDRESS=127.0.0.1:53050" in text


def test_a_dead_service_is_named_with_its_last_log_lines(tmp_path: Path) -> None:
    stack = Stack(tmp_path)
    stack.logs.mkdir(parents=True)
    (stack.logs / "tagger.log").write_text("".join(f"line {i}\n" for i in range(100)))
    from imgsearch.devstack import ServiceSpec

    spec = ServiceSpec("tagger", "tagger", 1, 2, {})
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait()
    spec.pid = proc.pid
    stack.procs[proc.pid] = proc
    report = stack.death_report(spec, "while running")
    assert report.startswith(f"tagger (pid {proc.pid}) exited with status 3 while running")
    assert report.endswith("line 99") and "line 79" not in report and "line 80" in report
    assert log_tail(tmp_path / "missing.log").startswith("(no log")


def test_devstack_flags_have_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for words in ("logs, data, gallery", "gateway gRPC port", "Prometheus ports", "number of index shards"):
        assert words in " ".join(out.split()), words
    assert "(default: 50050)" in out and "gateway gRPC port" in out
