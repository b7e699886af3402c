"""The serving image: render its build context under deploy/docker/ and build it with the Docker SDK.

One image serves both the Docker and the Kubernetes targets. The context holds the Dockerfile, the
container's config.properties (servetool's settings plus the project's config.properties), the
Python requirements pinned to what this machine packaged with, the in-container helper
(servetool_pod.py) and, unless models are mounted, the archives. Build-only inputs (a torch wheel
found on this machine, locally added CA certificates) go to build/ and stay in the build stage.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import handlers
import servetool
from servetool.engines.torchserve import archive, pod, process, split_runtime
from servetool.errors import ServetoolError, first_line
from servetool.model.formats import FORMATS

SERVETOOL = Path(servetool.__file__).resolve().parent  # the package, copied whole for a watcher
RESOURCES = Path(servetool.__file__).with_name("resources") / "docker"
POD_HELPER = Path(pod.__file__)
HANDLERS = Path(handlers.__file__).resolve().parent
DEFAULT_BASE_IMAGE = "python:3.11-slim-bookworm"
CONTAINER_STORE = "/home/model-server/model-store"
CONTAINER_WORK = "/home/model-server/work"
CONTAINER_SOCKET = f"{CONTAINER_WORK}/private/management.sock"
CONTAINER_CONFIG = "/opt/servetool/config.properties"
CONTAINER_METRICS_CONFIG = "/opt/servetool/metrics.yaml"
CONTAINER_PORTS = {"inference": 8080, "management": 8081, "metrics": 8082,
                   "grpc_inference": 7070, "grpc_management": 7071}
TORCH_VERSION = "2.13.0"
# What the handlers import at serving time, by format (torch is installed on its own, CPU-only).
# prometheus-client: the canary split's exporter (split_runtime.py); in every image, so that
# images with and without the split share their largest layers
# uvicorn, httptools, uvloop: the HTTP server under servetool's front and gateway
# (servetool/engines/torchserve/pod.py)
RUNTIME_PACKAGES = ["torchserve", "numpy", "pillow", "pyyaml", "psutil", "packaging",
                    "prometheus-client", "uvicorn", "httptools", "uvloop"]
WATCHER_PACKAGES = ["boto3", "requests"]  # and prometheus-client, in every image
SPLIT_RUNTIME = Path(split_runtime.__file__)
CONTAINER_SPLIT_RUNTIME = "/opt/servetool/servetool_split.py"
WATCHER_LIB = "lib"  # /opt/servetool/lib in the image: the servetool and handlers packages
# The KServe engine's image (servetool/engines/kserve): no torchserve, no Java; torch only for
# archives whose runtime is PyTorch's.
KSERVE_PACKAGES = ["kserve", "numpy", "pillow", "pyyaml", "prometheus-client", "uvicorn",
                   "httptools", "uvloop", "fastapi"]
KSERVE_CONFIG = "runtime/kserve.json"
FORMAT_PACKAGES = {"onnx": ["onnxruntime"], "openvino": ["openvino"],
                   "tensorrt": ["torch-tensorrt"]}
LOCAL_CA_DIR = Path("/usr/local/share/ca-certificates")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
BUILDER_CHATTER = re.compile(r"^(---> |Running in |Removing intermediate container|Successfully )")


class ImageError(ServetoolError):
    pass


@dataclass
class ImageOptions:
    model_store: Path
    out_dir: Path = Path("deploy/docker")
    base_image: str = DEFAULT_BASE_IMAGE
    base_config: Path | None = None
    bake_models: bool = True
    # False: the container gets runtime/config.properties mounted, and the image tag ignores it,
    # so a config change needs no new image (only a new container).
    bake_config: bool = True
    tag: str | None = None
    # None: this machine's locally added CAs (needed where TLS to the registries is intercepted).
    ca_certs: list[Path] | None = None
    extra_properties: dict[str, str] = field(default_factory=dict)
    # the watcher of a Kubernetes pod (servetool/operate/pod_watch.py): servetool's own code and the
    # packages it needs (boto3, prometheus-client), else the image holds none of servetool
    with_watcher: bool = False
    # the canary split (servetool/engines/torchserve/split.py): HAProxy from Debian, and servetool's
    # exporter beside it (split_runtime.py, as servetool_split.py) with the Prometheus client it needs
    with_split: bool = False
    engine: str = "torchserve"  # or "kserve": Dockerfile.kserve, no Java


def pinned(package: str) -> str:
    """`package==version` as installed here, so the image runs what was tested and packaged."""
    try:
        return f"{package}=={metadata.version(package)}"
    except metadata.PackageNotFoundError:
        return package


def requirements(archives: Iterable[Path], with_watcher: bool = False,
                 engine: str = "torchserve") -> list[str]:
    kserve = engine == "kserve"
    needed = list(KSERVE_PACKAGES if kserve else RUNTIME_PACKAGES) + (
        WATCHER_PACKAGES if with_watcher else [])
    for path in archives:
        handler = archive.archive_manifest(path)["config"].get("handler", {})
        fmt = FORMATS.get(handler.get("format", ""))
        runtime = handler.get("runtime") or (fmt.runtime if fmt else "")
        if runtime not in FORMAT_PACKAGES and runtime not in ("torchscript", "exported-program"):
            raise ImageError(f"{path.name}: unknown handler runtime {runtime!r}; repackage it "
                             "with this servetool (`servetool package`)")
        needed += FORMAT_PACKAGES.get(runtime, [])
        if kserve and runtime in ("torchscript", "exported-program"):  # else torch is not there
            needed.append("torch")
        if handler.get("text"):  # the worker tokenizes (tokenizers, not transformers)
            needed.append("tokenizers")
        interpolation = (handler.get("preprocess") or {}).get("interpolation") or ""
        if interpolation.startswith("opencv-"):  # OpenCV's own resize (handlers/preprocess.py)
            needed.append("opencv-python-headless")
    return [pinned(p) for p in dict.fromkeys(needed)]


def container_properties(base_config: Path | None, extra: dict[str, str],
                         sizes: tuple[int | None, int | None] = (None, None)) -> dict[str, str]:
    """The image's TorchServe config: every API on the container's interfaces (the target decides
    what is reachable from outside), the baked model store, and TS_* environment overrides on."""
    base = process.read_properties(base_config) if base_config else {}
    # TorchServe's management API on a socket only the container's user reaches; servetool's
    # front takes the management port (servetool/engines/torchserve/pod.py says why).
    props = process.server_properties(base, "0.0.0.0", CONTAINER_PORTS, CONTAINER_STORE,
                                         "/opt/servetool/log4j2.xml", CONTAINER_SOCKET, sizes,
                                         CONTAINER_METRICS_CONFIG)
    props["enable_envvars_config"] = "true"
    props.update(extra)
    return props


def render(opts: ImageOptions, archives: list[Path]) -> Path:
    """Write the build context to opts.out_dir and return it (build_image adds the torch wheel)."""
    out = opts.out_dir
    for sub in ("runtime", "model-store", "build"):
        shutil.rmtree(out / sub, ignore_errors=True)
        (out / sub).mkdir(parents=True)
    if opts.engine == "kserve":
        return _render_kserve(opts, archives, out)
    shutil.copyfile(RESOURCES / "Dockerfile", out / "Dockerfile")
    (out / ".dockerignore").write_text("# The context is exactly what servetool rendered.\n*.md\n")
    shutil.copyfile(POD_HELPER, out / "runtime" / "servetool_pod.py")
    shutil.copyfile(RESOURCES / "log4j2.xml", out / "runtime" / "log4j2.xml")
    process.write_metrics_config(out / "runtime" / process.METRICS_FILE)
    process.write_properties(out / "runtime" / "config.properties",
                                container_properties(opts.base_config, opts.extra_properties,
                                                     archive.archive_sizes(archives)),
                                f"{opts.base_config or 'built-in defaults'} by servetool's image")
    (out / "build" / "requirements.txt").write_text(
        "\n".join(requirements(archives, opts.with_watcher)) + "\n")
    if opts.with_split:
        shutil.copyfile(SPLIT_RUNTIME, out / "runtime" / Path(CONTAINER_SPLIT_RUNTIME).name)
    if opts.with_watcher:
        for package in (SERVETOOL, HANDLERS):
            shutil.copytree(package, out / "runtime" / WATCHER_LIB / package.name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "docker"))
    return _add_store_and_build(opts, archives, out)


def _render_kserve(opts: ImageOptions, archives: list[Path], out: Path) -> Path:
    """The KServe engine's context: Dockerfile.kserve, the server's settings, servetool's and
    the handlers' code (the server runs them from /opt/servetool/lib), the archives."""
    import json

    from servetool.engines.kserve.process import server_settings

    shutil.copyfile(RESOURCES / "Dockerfile.kserve", out / "Dockerfile")
    (out / ".dockerignore").write_text("# The context is exactly what servetool rendered.\n*.md\n")
    props = process.read_properties(opts.base_config) if opts.base_config else {}
    settings = server_settings("0.0.0.0", CONTAINER_PORTS, CONTAINER_STORE, CONTAINER_WORK,
                               props, archive.archive_sizes(archives))
    (out / KSERVE_CONFIG).write_text(json.dumps(settings, indent=2) + "\n")
    for package in (SERVETOOL, HANDLERS):
        shutil.copytree(package, out / "runtime" / WATCHER_LIB / package.name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "docker", "*.xml",
                                                      "*.lua", "sentences.txt"))
    (out / "build" / "requirements.txt").write_text(
        "\n".join(requirements(archives, False, "kserve")) + "\n")
    return _add_store_and_build(opts, archives, out)


def _add_store_and_build(opts: ImageOptions, archives: list[Path], out: Path) -> Path:
    """What every context ends with, whatever its engine: the archives (when baked), and the
    build inputs (wheels found here, CA certificates)."""
    if opts.bake_models:
        for path in archives:
            _link_or_copy(path, out / "model-store" / path.name)
    (out / "model-store" / ".keep").write_text("")
    (out / "build" / "wheels").mkdir()
    (out / "build" / "certs").mkdir()
    _copy_certs(opts.ca_certs, out / "build" / "certs")
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        dst.hardlink_to(src.resolve())
    except OSError:
        shutil.copyfile(src, dst)


def _copy_certs(certs: list[Path] | None, dest: Path) -> None:
    chosen = certs if certs is not None else sorted(LOCAL_CA_DIR.glob("*.crt"))
    for cert in chosen:
        if not cert.is_file():
            raise ImageError(f"CA certificate {cert} does not exist")
        shutil.copyfile(cert, dest / f"{cert.stem}.crt")


def _local_torch_wheel(dest: Path) -> bool:
    """Copy torch's CPU wheel into the context when pip finds one without any download (a wheel
    cache or local find-links, as on CI machines); elsewhere the build fetches it from the CPU index."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-index", "--only-binary=:all:",
           "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64", "-q",
           f"torch=={TORCH_VERSION}", "-d", str(dest)]
    try:
        subprocess.run(cmd, capture_output=True, timeout=120, check=True)
    except (subprocess.SubprocessError, OSError):
        return False
    return any(dest.glob("torch-*.whl"))


CONFIG_IN_CONTEXT = "runtime/config.properties"


def context_digest(context: Path, skip: tuple[str, ...] = ()) -> str:
    """A digest of everything that goes into the image, wheels and certificates aside."""
    h = hashlib.sha256()
    for path in sorted(p for p in context.rglob("*") if p.is_file()):
        rel = path.relative_to(context).as_posix()
        if rel.startswith(("build/wheels/", "build/certs/")) or rel in skip:
            continue
        h.update(rel.encode())
        h.update(archive.archive_digest(path).encode() if path.suffix == ".mar"
                 else hashlib.sha256(path.read_bytes()).hexdigest().encode())
    return h.hexdigest()[:12]


def default_tag(archives: list[Path], context: Path, base_image: str,
                skip: tuple[str, ...] = ()) -> str:
    names = "-".join(sorted(p.stem for p in archives))[:60] or "models"
    digest = hashlib.sha256((context_digest(context, skip) + base_image).encode()).hexdigest()[:12]
    return f"servetool/{re.sub(r'[^a-z0-9_.-]', '-', names.lower())}:{digest}"


def docker_client() -> Any:
    """The Docker SDK client for DOCKER_HOST (or the default socket), with a clear error if none."""
    import os

    return docker_client_for(os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock"))


def docker_client_for(base_url: str) -> Any:
    try:
        import docker
    except ImportError:
        raise ImageError("the Docker SDK is not installed: pip install docker") from None
    try:
        client = docker.DockerClient(base_url=base_url, timeout=600)
        client.ping()
    except Exception as exc:  # the SDK raises several types for "no engine"
        raise ImageError(f"no Docker engine reachable at {base_url} ({first_line(exc)}): start one "
                         "(e.g. scripts/docker-engine.sh start) or set DOCKER_HOST") from None
    return client


def build(client: Any, context: Path, tag: str, base_image: str,
          progress: Callable[[str], None], runtime_apt: str = "") -> dict[str, Any]:
    """Build the image (docker's layer cache makes an unchanged one quick), quoting the failing
    step on error."""
    import docker

    try:
        client.images.get(base_image)
    except docker.errors.ImageNotFound:
        progress(f"base image {base_image} is not present: the engine will pull it")
    progress(f"building {tag} from {context} (base {base_image}); several minutes the first time")
    step, recent = "", []
    stream = client.api.build(path=str(context), tag=tag, buildargs={"BASE_IMAGE": base_image,
                                                                  "RUNTIME_APT": runtime_apt},
                              network_mode="host", rm=True, forcerm=True, decode=True, pull=False)
    for chunk in stream:
        if "error" in chunk:
            tail = "\n".join(f"  {line}" for line in recent[-8:])
            raise ImageError(f"the image build failed at {step or 'the start'}: "
                             f"{chunk['error'].strip()}\n{tail}")
        text = chunk.get("stream", "").rstrip()
        for line in text.splitlines():
            if line.startswith("Step "):
                step = line.split(" : ", 1)[0].lower() + " (" + line.split(" : ", 1)[-1][:90] + ")"
                progress(line[:120])
            elif line.strip() and not BUILDER_CHATTER.match(line.strip()):
                recent = (recent + [ANSI.sub("", line).strip()[:200]])[-20:]
    return {**existing(client, tag), "built": True}


def existing(client: Any, tag: str) -> dict[str, Any] | None:
    import docker

    try:
        image = client.images.get(tag)
    except docker.errors.ImageNotFound:
        return None
    return {"tag": tag, "id": image.id, "size_bytes": image.attrs.get("Size"), "built": False}


def render_tagged(opts: ImageOptions, archives: list[Path]) -> tuple[Path, str]:
    """The rendered context and the image's tag: opts.tag, or a digest of the context (a mounted
    config left out of it)."""
    context = render(opts, archives)
    skip = () if opts.bake_config else (CONFIG_IN_CONTEXT,)
    return context, opts.tag or default_tag(archives, context, opts.base_image, skip)


def build_image(opts: ImageOptions, archives: list[Path],
                progress: Callable[[str], None] = lambda _: None, client: Any = None) -> dict[str, Any]:
    client = client or docker_client()
    # The default tag is a digest of the context (build-only inputs aside): when an image has it,
    # there is nothing to build, and the torch wheel is only fetched for a real build.
    context, tag = render_tagged(opts, archives)
    if opts.tag is None and (found := existing(client, tag)) is not None:
        progress(f"image {tag} already built")
        return found
    needs_torch = opts.engine != "kserve" or any(
        line.startswith("torch==") for line in (context / "build" / "requirements.txt")
        .read_text().splitlines())
    if needs_torch and _local_torch_wheel(context / "build" / "wheels"):
        progress("using this machine's torch wheel (no download in the build)")
    return build(client, context, tag, opts.base_image, progress,
                 "haproxy" if opts.with_split else "")


