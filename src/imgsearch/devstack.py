"""Run the whole stack on loopback for development: encoder, tagger, index shards and gateway."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imgsearch.models.manifest import MANIFEST_NAME, default_model_dir

DEFAULT_PORT_BASE = 50050
HTTP_PORT = "IMGSEARCH_GATEWAY_HTTP_PORT"
DEFAULT_METRICS_BASE = 9100
LOG_TAIL_LINES = 20

# scikit-image's bundled photos, shipped with the package: a gallery that needs no download.
GALLERY = {
    "cat": "chelsea.png",
    "coffee": "coffee.png",
    "astronaut": "astronaut.png",
    "rocket": "rocket.jpg",
    "motorcycle": "motorcycle_left.png",
    "cameraman": "camera.png",
    "hubble": "hubble_deep_field.jpg",
    "moon": "moon.png",
    "coins": "coins.png",
    "bricks": "brick.png",
    "grass": "grass.png",
    "gravel": "gravel.png",
    "page": "page.png",
    "retina": "retina.jpg",
    "clock": "clock_motion.png",
}


@dataclass
class ServiceSpec:
    """One process of the stack."""

    name: str
    module: str
    port: int
    metrics_port: int
    env: dict[str, str]
    pid: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def plan(state_dir: Path, port_base: int, metrics_base: int, shards: int, model_dir: Path) -> list[ServiceSpec]:
    """The processes, ports and settings of a local stack."""
    data = state_dir / "data"
    encoder = f"127.0.0.1:{port_base + 1}"
    tagger = f"127.0.0.1:{port_base + 2}"
    specs = [
        ServiceSpec(
            "encoder", "encoder", port_base + 1, metrics_base + 1, {"IMGSEARCH_ENCODER_MODEL_DIR": str(model_dir)}
        ),
        ServiceSpec(
            "tagger",
            "tagger",
            port_base + 2,
            metrics_base + 2,
            {
                "IMGSEARCH_TAGGER_ENCODER_ADDRESS": encoder,
                "IMGSEARCH_TAGGER_DATA_DIR": str(data / "tagger"),
                "IMGSEARCH_TAGGER_HEADS_DIR": str(
                    Path(os.environ.get("IMGSEARCH_TAGGER_HEADS_DIR", "heads")).resolve()
                ),
            },
        ),
    ]
    shard_specs = []
    for i in range(shards):
        name = f"index-{i}"
        shard_specs.append(
            ServiceSpec(
                name,
                "index",
                port_base + 11 + i,
                metrics_base + 11 + i,
                {"IMGSEARCH_INDEX_SHARD": name, "IMGSEARCH_INDEX_DATA_DIR": str(data / name)},
            )
        )
    specs.extend(shard_specs)
    specs.append(
        ServiceSpec(
            "gateway",
            "gateway",
            port_base,
            metrics_base,
            {
                "IMGSEARCH_GATEWAY_ENCODER_ADDRESS": encoder,
                "IMGSEARCH_GATEWAY_TAGGER_ADDRESS": tagger,
                "IMGSEARCH_GATEWAY_INDEX_SHARDS": ",".join(f"{s.name}={s.address}" for s in shard_specs),
                # The HTTP/JSON API and the web page, next to gRPC (PORT_BASE + 3).
                "IMGSEARCH_GATEWAY_HTTP_HOST": "127.0.0.1",
                "IMGSEARCH_GATEWAY_HTTP_PORT": str(port_base + 3),
                # The gateway projects in process, so it loads the same installed heads as the tagger.
                "IMGSEARCH_GATEWAY_HEADS_DIR": str(
                    Path(os.environ.get("IMGSEARCH_TAGGER_HEADS_DIR", "heads")).resolve()
                ),
            },
        )
    )
    for s in specs:
        prefix = f"IMGSEARCH_{s.module.upper()}_"
        s.env.update(
            {
                prefix + "HOST": "127.0.0.1",
                prefix + "PORT": str(s.port),
                prefix + "METRICS_HOST": "127.0.0.1",
                prefix + "METRICS_PORT": str(s.metrics_port),
            }
        )
    return specs


def free_port_range(n: int) -> int:
    """A base port such that base .. base+n-1 are all free on loopback right now."""
    import random

    for _ in range(200):
        base = random.randint(20000, 60000 - n)
        ok = True
        for port in range(base, base + n):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError(f"no {n} consecutive free ports found")


def port_free(port: int) -> bool:
    """Whether a server could bind 127.0.0.1:port now (SO_REUSEADDR: a port in TIME_WAIT counts as free)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def stack_ports(specs: list[ServiceSpec]) -> list[tuple[int, str]]:
    """Every port a stack binds, with what binds it."""
    ports = [(s.port, s.name) for s in specs]
    ports += [(int(s.env[HTTP_PORT]), f"{s.name} http") for s in specs if s.env.get(HTTP_PORT, "0") != "0"]
    return ports + [(s.metrics_port, f"{s.name} metrics") for s in specs]


def next_free_base(base: int, span: int, taken_by_stack: set[int] | None = None) -> int | None:
    """The first base above `base`, in steps of 1000, with base .. base+span-1 all free."""
    for candidate in range(base + 1000, 65536 - span, 1000):
        ports = range(candidate, candidate + span)
        if not (taken_by_stack or set()) & set(ports) and all(port_free(p) for p in ports):
            return candidate
    return None


class PortInUse(RuntimeError):
    """A port the stack needs is already bound by some other process."""


def check_ports(specs: list[ServiceSpec], command: str, port_base: int, metrics_base: int) -> None:
    """Refuse to start on a taken port: gRPC would fail to bind, or health checks would reach a stranger."""
    taken = [(port, what) for port, what in stack_ports(specs) if not port_free(port)]
    if not taken:
        return
    if len(taken) == 1:
        head = f"port {taken[0][0]} is in use ({taken[0][1]})"
    else:
        head = "ports " + ", ".join(f"{port} ({what})" for port, what in taken) + " are in use"
    span = max(s.port for s in specs) - port_base + 1
    metrics_span = max(s.metrics_port for s in specs) - metrics_base + 1
    own = {p for p, _ in stack_ports(specs)}
    fixes: list[tuple[str, str]] = []
    if any(not what.endswith("metrics") for _, what in taken):
        new = next_free_base(port_base, span, own)
        if new is not None:
            fixes.append(("PORT_BASE", str(new)))
    if any(what.endswith("metrics") for _, what in taken):
        new = next_free_base(metrics_base, metrics_span, own)
        if new is not None:
            fixes.append(("METRICS_BASE", str(new)))
    if not fixes:
        raise PortInUse(f"{head}; stop what holds it")
    make = " ".join(f"{k}={v}" for k, v in fixes)
    flags = " ".join(f"--{k.lower().replace('_', '-')} {v}" for k, v in fixes)
    raise PortInUse(
        f"{head}; stop what holds it or run `make {command} {make}` (python -m imgsearch.devstack {command} {flags})"
    )


def _listening_inodes(port: int) -> set[str] | None:
    """Socket inodes listening on `port` (any address), from /proc/net; None where /proc has no such table.

    Read by hand rather than with psutil: a dev-only check is not worth a new runtime dependency.
    """
    inodes: set[str] = set()
    found = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        found = True
        for line in lines:
            fields = line.split()
            # local_address is HEX_IP:HEX_PORT; state 0A is LISTEN.
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes if found else None


def listens_on(pid: int, port: int) -> bool | None:
    """Whether process `pid` holds the listening socket of `port`; None when this cannot be told (no /proc)."""
    inodes = _listening_inodes(port)
    if inodes is None:
        return None
    if not inodes:
        return False
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return None if alive(pid) else False
    wanted = {f"socket:[{inode}]" for inode in inodes}
    for fd in fds:
        try:
            if os.readlink(fd) in wanted:
                return True
        except OSError:
            continue
    return False


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a service's log, or a note that it wrote none."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def health(address: str, timeout: float = 1.0) -> str:
    with grpc.insecure_channel(address) as ch:
        try:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return "DOWN"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(r.status))


def alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still "exists"; treat it as gone.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.split()[2] != "Z"
    except OSError:
        return True


class Stack:
    """Start, watch and stop the processes of a local stack; state lives in state_dir/stack.json."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir.resolve()
        self.state_file = self.state_dir / "stack.json"
        self.logs = self.state_dir / "logs"
        # Children this process started, to read how they exited (others are known only by pid).
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def load(self) -> list[ServiceSpec]:
        if not self.state_file.exists():
            return []
        raw = json.loads(self.state_file.read_text())
        return [ServiceSpec(**s) for s in raw["specs"]]

    def save(self, specs: list[ServiceSpec]) -> None:
        gateway = next(s for s in specs if s.name == "gateway")
        doc = {
            "gateway": gateway.address,
            "services": {
                s.name: {"address": s.address, "metrics": f"127.0.0.1:{s.metrics_port}", "pid": s.pid} for s in specs
            },
            "specs": [asdict(s) for s in specs],
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2))
        tmp.replace(self.state_file)

    def spawn(self, spec: ServiceSpec) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{spec.name}.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", f"imgsearch.{spec.module}"],
                env={**os.environ, **spec.env, "PYTHONUNBUFFERED": "1"},
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                # Own session: Ctrl-C in the terminal reaches `make run`, which stops services in order.
                start_new_session=True,
            )
        spec.pid = proc.pid
        self.procs[proc.pid] = proc

    def exit_note(self, spec: ServiceSpec) -> str:
        """How a dead service ended, as far as this process can tell."""
        proc = self.procs.get(spec.pid)
        code = proc.poll() if proc is not None else None
        if code is None:
            return "exited"
        if code < 0:
            return f"was killed by {signal.Signals(-code).name}"
        return f"exited with status {code}"

    def death_report(self, spec: ServiceSpec, when: str) -> str:
        log = self.logs / f"{spec.name}.log"
        return f"{spec.name} (pid {spec.pid}) {self.exit_note(spec)} {when}; the last lines of {log}:\n{log_tail(log)}"

    def wait_serving(self, specs: list[ServiceSpec], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = list(specs)
        while pending:
            for spec in list(pending):
                if not alive(spec.pid):
                    raise RuntimeError(self.death_report(spec, "during start-up"))
                if health(spec.address) != "SERVING":
                    continue
                # Health is trusted only from the process this stack started, not from whatever holds the port.
                if listens_on(spec.pid, spec.port) is False:
                    if alive(spec.pid):
                        raise RuntimeError(
                            f"{spec.name}: port {spec.port} answers, but not from the process this stack started "
                            f"(pid {spec.pid}); another server holds it: stop it or pick another PORT_BASE"
                        )
                    continue
                pending.remove(spec)
            if pending and time.monotonic() > deadline:
                names = ", ".join(s.name for s in pending)
                raise RuntimeError(f"not SERVING after {timeout:.0f}s: {names} (logs in {self.logs})")
            time.sleep(0.2)

    def up(
        self, port_base: int, metrics_base: int, shards: int, timeout: float, command: str = "run"
    ) -> list[ServiceSpec]:
        """Start every service and wait until each is SERVING; `command` (run/up) only words the hints."""
        running = [s for s in self.load() if alive(s.pid)]
        if running:
            raise RuntimeError(
                f"a stack is already running from {self.state_dir} ({len(running)} processes): "
                f"`make down STATE_DIR={self.state_dir}` stops it"
            )
        model_dir = default_model_dir()
        specs = plan(self.state_dir, port_base, metrics_base, shards, model_dir)
        check_ports(specs, command, port_base, metrics_base)
        if not (model_dir / MANIFEST_NAME).exists():
            raise RuntimeError(f"no exported models in {model_dir}: run `make models` first")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            for spec in specs:
                self.spawn(spec)
            self.save(specs)
            self.wait_serving(specs, timeout)
        except BaseException:
            self.down(specs)
            raise
        return specs

    def restart(self, name: str, timeout: float) -> ServiceSpec:
        specs = self.load()
        spec = next((s for s in specs if s.name == name), None)
        if spec is None:
            raise RuntimeError(f"no service {name!r} in {self.state_file}")
        if alive(spec.pid):
            stop_pids([spec.pid], 20.0)
        self.spawn(spec)
        self.save(specs)
        self.wait_serving([spec], timeout)
        return spec

    def down(self, specs: list[ServiceSpec] | None = None, grace: float = 20.0) -> None:
        specs = self.load() if specs is None else specs
        # Gateway first so no new work arrives, then the services it calls.
        order = sorted(specs, key=lambda s: {"gateway": 0, "tagger": 1, "encoder": 3}.get(s.name, 2))
        stop_pids([s.pid for s in order], grace)

    def index_gallery(self, gateway: str) -> int:
        """Add the sample gallery once (first start); copies the photos into state_dir/gallery."""
        import skimage

        from imgsearch.client import GatewayClient, ImageToAdd

        marker = self.state_dir / "gallery-indexed"
        gallery = self.state_dir / "gallery"
        gallery.mkdir(parents=True, exist_ok=True)
        src = Path(skimage.__file__).parent / "data"
        for image_id, fname in GALLERY.items():
            dst = gallery / f"{image_id}{Path(fname).suffix}"
            if not dst.exists():
                shutil.copyfile(src / fname, dst)
        if marker.exists():
            return 0
        images = [
            ImageToAdd.from_path(p, p.stem, {"collection": "scikit-image samples"}) for p in sorted(gallery.iterdir())
        ]
        with GatewayClient(gateway, timeout=300) as client:
            outcomes = client.add_images(images)
        failed = [o for o in outcomes if not o.ok]
        if failed:
            raise RuntimeError(f"gallery indexing failed for {[(o.id, o.error) for o in failed]}")
        marker.write_text(str(len(outcomes)))
        return len(outcomes)


def stop_pids(pids: list[int], grace: float) -> None:
    """SIGTERM each (graceful drain), then SIGKILL whatever is still alive after the grace period."""
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def usage_text(gateway: str, state_dir: Path, web: str = "") -> str:
    g = state_dir / "gallery"
    # The CLI dials 127.0.0.1:50050 unless told otherwise: on other ports every hint must say where.
    cmd = "imgsearch" if gateway == f"127.0.0.1:{DEFAULT_PORT_BASE}" else f"imgsearch --address {gateway}"
    env = "" if gateway == f"127.0.0.1:{DEFAULT_PORT_BASE}" else f"\n(or `export IMGSEARCH_ADDRESS={gateway}` once)"
    page = f"\nWeb page and HTTP API: {web} (OpenAPI at {web}openapi.json)" if web else ""
    return f"""
imgsearch is up: gateway at {gateway} (logs in {state_dir / "logs"}).{page}
Try, in another terminal (after `. .venv/bin/activate`):{env}
  {cmd} tag {g}/cat.png
  {cmd} tags add feline && {cmd} tag {g}/cat.png
  {cmd} search-text "a cup of coffee"
  {cmd} search-image {g}/rocket.jpg
  {cmd} similar astronaut
  {cmd} add path/to/photos/
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m imgsearch.devstack",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "command",
        choices=["up", "down", "run", "status", "restart"],
        help="run: start and stay in the foreground (Ctrl-C stops); up: start detached, return once SERVING; "
        "down: stop a detached stack; status: health of each service; restart: restart one service",
    )
    p.add_argument("service", nargs="?", help="for restart: the service name (e.g. index-1)")
    p.add_argument("--state-dir", type=Path, default=Path("var/stack"), help="logs, data, gallery and stack.json")
    p.add_argument(
        "--port-base",
        type=int,
        default=DEFAULT_PORT_BASE,
        help="gateway gRPC port; encoder +1, tagger +2, index shards +11, +12, ...",
    )
    p.add_argument(
        "--metrics-base", type=int, default=DEFAULT_METRICS_BASE, help="Prometheus ports, laid out like --port-base"
    )
    p.add_argument("--shards", type=int, default=2, help="number of index shards")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for every service to be SERVING")
    p.add_argument("--no-gallery", action="store_true", help="do not index the sample gallery")
    args = p.parse_args(argv)
    stack = Stack(args.state_dir)
    try:
        if args.command == "down":
            stack.down()
            print("imgsearch stack stopped")
            return 0
        if args.command == "status":
            specs = stack.load()
            for s in specs:
                state = health(s.address) if alive(s.pid) else "DOWN"
                if state != "DOWN" and listens_on(s.pid, s.port) is False:
                    state = f"DOWN (port {s.port} answered by another process)"
                print(f"{s.name:10} {s.address:18} pid {s.pid:<8} {state}")
            return 0 if specs and all(alive(s.pid) for s in specs) else 1
        if args.command == "restart":
            if not args.service:
                p.error("restart needs a service name")
            spec = stack.restart(args.service, args.timeout)
            print(f"{spec.name} restarted (pid {spec.pid})")
            return 0
        specs = stack.up(args.port_base, args.metrics_base, args.shards, args.timeout, args.command)
        gateway_spec = next(s for s in specs if s.name == "gateway")
        gateway = gateway_spec.address
        web = f"http://127.0.0.1:{gateway_spec.env[HTTP_PORT]}/" if gateway_spec.env.get(HTTP_PORT, "0") != "0" else ""
        if not args.no_gallery:
            added = stack.index_gallery(gateway)
            if added:
                print(f"indexed {added} sample photos")
        print(usage_text(gateway, stack.state_dir, web))
        if args.command == "up":
            return 0
        print("Press Ctrl-C to stop.")
        try:
            while all(alive(s.pid) for s in specs):
                time.sleep(0.5)
            for dead in (s for s in specs if not alive(s.pid)):
                print(f"devstack: {stack.death_report(dead, 'while running')}", file=sys.stderr)
            print("devstack: stopping the rest of the stack", file=sys.stderr)
            return_code = 1
        except KeyboardInterrupt:
            return_code = 0
        stack.down(specs)
        print("imgsearch stack stopped")
        return return_code
    except RuntimeError as exc:
        print(f"devstack: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
