"""The Docker target: servetool's image with TorchServe, run by the Docker SDK, models registered
through the management API exactly as on the local target.

By default the container publishes its APIs on 127.0.0.1 only; `network="host"` shares the host's
network instead (TorchServe is then told to bind 127.0.0.1 through its TS_* environment overrides).
TorchServe's token authorization stays on inside the container: servetool reads the keys from the
container's key_file.json through the Docker API, so nothing secret is written on the host.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from servetool import runfiles
from servetool.engines.torchserve import process, split
from servetool.engines.torchserve.management import APIError, Client
from servetool.engines.torchserve.state import ServerState
from servetool.errors import first_line
from servetool.targets import image, record
from servetool.targets.common import Companions, DeployError, ServerTarget

STATE_FILE = "docker.json"
KEY_FILE = f"{image.CONTAINER_WORK}/key_file.json"
POD_HELPER = "/opt/servetool/servetool_pod.py"
LABEL = "io.servetool.target"


@dataclass
class DockerOptions:
    image: image.ImageOptions
    network: str = "ports"  # "ports": publish on 127.0.0.1; "host": the host's network
    container_name: str = "servetool"
    publish_host: str = "127.0.0.1"  # where published ports listen (network="ports")
    memory_limit: str | None = None  # docker's --memory, e.g. "2g"
    cpus: float | None = None  # docker's --cpus
    extra_env: dict[str, str] = field(default_factory=dict)
    restart_on_crash: bool = False  # restart policy; TorchServe restores its last snapshot


class ContainerKeys:
    """Reads the keys inside the container; cached briefly (each read is a `docker exec`)."""

    def __init__(self, container: Any, ttl_s: float = 20.0, engine: str = "torchserve") -> None:
        self.container = container
        self.ttl_s = ttl_s
        self.cached: tuple[float, dict] = (0.0, {})
        # TorchServe's inference key and the management front's key (pod.py keys); the KServe
        # engine keeps both in its key_file.json
        self.command = ["cat", KEY_FILE] if engine == "kserve" else ["python3", POD_HELPER, "keys"]

    def invalidate(self) -> None:
        self.cached = (0.0, {})

    def __call__(self) -> dict[str, dict[str, Any]]:
        stamp, keys = self.cached
        if keys and time.monotonic() - stamp < self.ttl_s:
            return keys
        code, out = self.container.exec_run(self.command, user="1000")
        try:
            keys = json.loads(out) if code == 0 else {}
        except ValueError:
            keys = {}
        self.cached = (time.monotonic(), keys) if keys else (0.0, {})
        return keys


def container_env(network: str, ports: dict[str, int], engine: str = "torchserve"
                  ) -> dict[str, str]:
    """TS_* overrides: on the host network TorchServe must bind loopback and the chosen ports
    (the KServe engine reads SERVETOOL_KSERVE_* for the same)."""
    if network != "host":
        return {}
    if engine == "kserve":
        return {"SERVETOOL_KSERVE_HOST": "127.0.0.1",
                **{f"SERVETOOL_KSERVE_{api.upper()}_PORT": str(ports[api])
                   for api in ("inference", "management", "metrics")}}
    env = {f"TS_{api.upper()}_ADDRESS": f"http://127.0.0.1:{ports[api]}"
           for api in ("inference", "metrics")}
    env["SERVETOOL_FRONT_LISTEN"] = f"127.0.0.1:{ports['management']}"  # management: the front
    env |= {"TS_GRPC_INFERENCE_ADDRESS": "127.0.0.1", "TS_GRPC_MANAGEMENT_ADDRESS": "127.0.0.1",
            "TS_GRPC_INFERENCE_PORT": str(ports["grpc_inference"]),
            "TS_GRPC_MANAGEMENT_PORT": str(ports["grpc_management"])}
    return env


def published_ports(network: str, ports: dict[str, int], host: str = "127.0.0.1",
                    split_metrics: int | None = None) -> dict[str, Any]:
    """docker run's port map: each HTTP API on the host's loopback only (gRPC is not published),
    and the split's metrics port when there is one."""
    if network == "host":
        return {}
    found = {f"{image.CONTAINER_PORTS[api]}/tcp": (host, ports[api])
             for api in ("inference", "management", "metrics")}
    if split_metrics:
        found[f"{CONTAINER_SPLIT_PORTS['split_metrics']}/tcp"] = (host, split_metrics)
    return found


# Inside the container, with the split on: HAProxy takes the inference port, TorchServe moves to
# `upstream` on loopback, and the split's metrics (HAProxy's and servetool's exporter) get a port.
CONTAINER_SPLIT_PORTS = {"upstream": 8089, "split_metrics": 8088, "exporter": 8087}


def split_env(network: str, ports: dict[str, int]) -> tuple[dict[str, str], int]:
    """The container's environment for the split (its HAProxy config rendered for the container's
    paths), and the host port of the split's metrics."""
    if network == "host":  # the host's ports: all chosen free here
        inner = process.free_ports(("upstream", "split_metrics", "exporter"))
        listen, metrics_host = ("127.0.0.1", ports["inference"]), "127.0.0.1"
        published = inner["split_metrics"]
    else:
        inner = dict(CONTAINER_SPLIT_PORTS)
        listen, metrics_host = ("0.0.0.0", image.CONTAINER_PORTS["inference"]), "0.0.0.0"
        published = process.free_ports(("split_metrics",))["split_metrics"]
    text = split.render_text(split.SplitOptions(
        Path(image.CONTAINER_WORK), listen, ("127.0.0.1", inner["upstream"]),
        (metrics_host, inner["split_metrics"]), inner["exporter"]))
    return {"SERVETOOL_SPLIT_CONFIG_TEXT": text,
            "SERVETOOL_SPLIT_EXPORTER_PORT": str(inner["exporter"]),
            "SERVETOOL_SPLIT_RUNTIME": image.CONTAINER_SPLIT_RUNTIME,
            "TS_INFERENCE_ADDRESS": f"http://127.0.0.1:{inner['upstream']}"}, published


def check_readable(model_store: Path, uid: int = 1000) -> None:
    """A mounted model store must be readable by the container's user (uid 1000), which is not
    the host user: say so now rather than have TorchServe answer "Model not found"."""
    import stat

    for path in [model_store, *model_store.glob("*.mar")]:
        info = path.stat()
        need = (stat.S_IROTH | stat.S_IXOTH) if path.is_dir() else stat.S_IROTH
        if info.st_uid != uid and info.st_mode & need != need:
            raise DeployError(f"--mount-models: {path} is not readable by the container's user "
                              f"(uid {uid}); `chmod o+rx {model_store}` and `chmod o+r` its "
                              "archives, or bake the archives into the image (the default)")


class DockerTarget(ServerTarget):
    name = "docker"

    def __init__(self, opts: process.ServerOptions, docker_opts: DockerOptions | None = None,
                 progress: Callable[[str], None] = lambda _: None,
                 companions: Companions | None = None) -> None:
        super().__init__(opts, progress, companions)
        self.docker_opts = docker_opts or DockerOptions(image.ImageOptions(opts.model_store))
        self._docker_engine: Any = None
        self._image: dict[str, Any] | None = None

    @property
    def pins_archives(self) -> bool:
        """Versions need files of their own in the store the container reads: a mounted one."""
        baked = self._record().get("run_config", {}).get("baked", self.docker_opts.image.bake_models)
        return not baked

    # --- the Docker engine and the container ------------------------------------------------------
    @property
    def docker_engine(self) -> Any:
        if self._docker_engine is None:
            self._docker_engine = image.docker_client()
        return self._docker_engine

    @property
    def state_file(self) -> Path:
        return self.opts.run_dir / STATE_FILE

    def _record(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    def container(self) -> Any | None:
        import docker

        record = self._record()
        if not record:
            return None
        try:
            return self.docker_engine.containers.get(record["container_id"])
        except docker.errors.NotFound:
            self.state_file.unlink(missing_ok=True)
            return None

    def _state(self, record: dict[str, Any]) -> ServerState:
        return ServerState(**record["server"])

    def condition(self) -> str:
        container = self.container()
        if container is None:
            return "stopped"
        return {"running": "running", "restarting": "starting", "created": "starting"}.get(
            container.status, "crashed")

    def crash_detail(self) -> str:
        container = self.container()
        if container is None:
            return "no container"
        code = container.attrs.get("State", {}).get("ExitCode")
        return (f"container {container.name} is {container.status} (exit code {code}).\n"
                + self.failure_logs())

    def running(self) -> ServerState | None:
        container = self.container()
        if container is None or container.status != "running":
            return None
        return self._state(self._record())

    def make_client(self, state: ServerState) -> Client:
        container = self.container()
        if container is None:
            raise DeployError("the servetool container is gone: `servetool deploy --target docker`")
        return Client(state, keys=ContainerKeys(container, engine=state.engine),
                      keys_where=f"{KEY_FILE} in container {container.short_id}")

    def failure_logs(self, state: ServerState | None = None) -> str:
        container = self.container()
        if container is None:
            return "(the container is gone)"
        text = container.logs(tail=200).decode(errors="replace").splitlines()
        lines = process.telling_lines(text, "container", 10)
        return f"From `docker logs {container.short_id}`:\n" + "\n".join(f"  {x}" for x in lines)

    def default_workers(self) -> int:
        # The container's CPU limit, not this machine's cores (the handlers' threads follow it too,
        # through the cgroup quota they read).
        if self.docker_opts.cpus:
            return max(1, math.ceil(self.docker_opts.cpus))
        return super().default_workers()

    # --- deploy ----------------------------------------------------------------------------------
    def prepare(self, archives: list[Path]) -> None:
        """The image for these archives (built when its context changed)."""
        img_opts = self.docker_opts.image
        img_opts.with_split = img_opts.with_split or self.opts.split
        img_opts.engine = self.opts.engine
        if self.opts.engine == "kserve" and self.opts.split:
            raise DeployError("--engine kserve has no canary split (--split) yet: deploy the "
                              "split on TorchServe")
        self._image = image.build_image(img_opts, archives, self.progress)

    def deployed(self) -> dict[str, Any]:
        container = self.container()
        img_opts = self.docker_opts.image
        return {"image": self._image, "container": container.name if container else None,
                "network": self.docker_opts.network, "models_baked": img_opts.bake_models,
                "config_baked": img_opts.bake_config}

    def up(self) -> tuple[ServerState, bool]:
        container = self.container()
        if container is not None and container.status == "running" and self._image is not None \
                and container.image.id == self._image["id"] \
                and self._record().get("run_config") == self._run_config():
            return self._state(self._record()), False
        if container is not None:
            self.progress(f"replacing container {container.name} (new image or not running)")
            self.down()
        return self._run(), True

    def _run_config(self) -> dict[str, Any]:
        """What a running container must match to be kept (else it is replaced)."""
        d = self.docker_opts
        return {"network": d.network, "ports": self.opts.ports, "publish_host": d.publish_host,
                "cpus": d.cpus, "memory": d.memory_limit, "baked": d.image.bake_models,
                "config": None if d.image.bake_config else hashlib.sha256(
                    self._mounted_config().read_bytes()).hexdigest(),
                "model_store": str(self.opts.model_store.resolve()), "env": d.extra_env,
                "restart": d.restart_on_crash, "split": self.opts.split}

    def _mounted_config(self) -> Path:
        return (self.docker_opts.image.out_dir / image.CONFIG_IN_CONTEXT).resolve()

    def _run(self) -> ServerState:
        import docker

        assert self._image is not None
        opts, dopts = self.opts, self.docker_opts
        if dopts.network == "host":
            for api, port in opts.ports.items():
                if process.port_in_use("127.0.0.1", port):
                    raise DeployError(f"port {port} ({api} API) is already in use on this machine; "
                                      f"pick another with --{api.replace('_', '-')}-port")
        if dopts.network != "host" and not self.docker_engine.networks.list(names=["bridge"]):
            raise DeployError("this Docker engine has no bridge network, so published ports would "
                              "reach nothing: use --network host")
        self._remove_stale(dopts.container_name)
        if not dopts.image.bake_models:
            check_readable(opts.model_store)
        volumes = {} if dopts.image.bake_models else {
            str(opts.model_store.resolve()): {"bind": image.CONTAINER_STORE, "mode": "ro"}}
        if not dopts.image.bake_config:
            volumes[str(self._mounted_config())] = {"bind": image.CONTAINER_CONFIG, "mode": "ro"}
        env, split_metrics = container_env(dopts.network, opts.ports, opts.engine), None
        if opts.split:  # a new container's split starts at 0: an automatic canary ends unjudged
            self.companions.split_starting(opts.run_dir)
            more, split_metrics = split_env(dopts.network, opts.ports)
            env |= more
        self.progress(f"starting container {dopts.container_name} from {self._image['tag']}")
        try:
            container = self.docker_engine.containers.run(
                self._image["tag"], detach=True, name=dopts.container_name,
                labels={LABEL: "docker"}, environment=env | dopts.extra_env,
                network_mode="host" if dopts.network == "host" else None,
                ports=published_ports(dopts.network, opts.ports, dopts.publish_host,
                                      split_metrics) or None,
                volumes=volumes or None, mem_limit=dopts.memory_limit,
                restart_policy={"Name": "unless-stopped"} if dopts.restart_on_crash else None,
                nano_cpus=int(dopts.cpus * 1e9) if dopts.cpus else None)
        except docker.errors.APIError as exc:
            raise DeployError(f"docker could not start the container: {exc.explanation or exc}") from None
        if opts.engine == "kserve":
            token_auth = json.loads((dopts.image.out_dir / image.KSERVE_CONFIG).read_text())[
                "token_auth"]
        else:
            token_auth = process.token_auth_enabled(
                dopts.image.out_dir / "runtime" / "config.properties")
        state = ServerState(run_dir=str(opts.run_dir.resolve()), pid=0, host="127.0.0.1",
                            ports=dict(opts.ports), model_store=str(opts.model_store.resolve()),
                            token_auth=token_auth, split_metrics_port=split_metrics,
                            engine=opts.engine)
        runfiles.private_folder(opts.run_dir)
        if dopts.image.bake_models:  # a new image holds only the archives it was built with
            with record.locked(opts.run_dir, self.progress) as models:
                models.clear()
        runfiles.write_private(self.state_file, json.dumps({
            "container_id": container.id, "name": container.name, "image": self._image,
            "network": dopts.network, "run_config": self._run_config(),
            "server": asdict(state)}, indent=2) + "\n")
        self._wait_healthy(container, state, opts.startup_timeout_s)
        return state

    def _remove_stale(self, name: str) -> None:
        import docker

        try:
            old = self.docker_engine.containers.get(name)
        except docker.errors.NotFound:
            return
        if old.labels.get(LABEL) != "docker":
            raise DeployError(f"a container named {name} exists and servetool did not start it; "
                              "remove it or pick another --container-name")
        old.remove(force=True)

    def _wait_healthy(self, container: Any, state: ServerState, timeout_s: float) -> None:
        client = Client(state, keys=ContainerKeys(container, ttl_s=0, engine=state.engine))
        deadline = time.monotonic() + timeout_s
        last = "no answer yet"
        while time.monotonic() < deadline:
            container.reload()
            if container.status in ("exited", "dead"):
                code = container.attrs.get("State", {}).get("ExitCode")
                raise DeployError(f"the container exited during start-up (exit code {code}).\n"
                                  + self.failure_logs())
            try:
                if client.ping().get("status") == "Healthy":
                    return
            except APIError as exc:
                last = str(exc).splitlines()[0]
            except Exception as exc:  # connection refused while the JVM starts, and the like
                last = first_line(exc)
            time.sleep(0.5)
        raise DeployError(f"TorchServe in the container was not healthy within {timeout_s:.0f} s "
                          f"(last: {last}).\n" + self.failure_logs())

    def set_split(self, model: str, version: str, weight: int) -> None:
        """The canary weight, set by the split's own helper inside the container."""
        container = self.container()
        if container is None:
            raise DeployError("the servetool container is gone: `servetool deploy --target docker`")
        code, out = container.exec_run(["python3", image.CONTAINER_SPLIT_RUNTIME, "set", model,
                                        version, str(weight)], user="1000")
        if code != 0:
            raise split.SplitError(f"the split in container {container.name} refused "
                                   f"{model} {version} {weight}%: {out.decode(errors='replace').strip()}")

    def down(self) -> bool:
        self.companions.stopping(self.opts.run_dir)
        container = self.container()
        if container is None:
            return False
        container.stop(timeout=20)
        container.remove(force=True)
        self.state_file.unlink(missing_ok=True)
        return True

    def status(self) -> dict[str, Any]:
        result = super().status()
        container = self.container()
        if container is not None:
            health = container.attrs.get("State", {}).get("Health", {}).get("Status")
            result |= {"container": container.name, "container_status": container.status,
                       "health": health, "image": self._record().get("image", {}).get("tag")}
            if container.status != "running":
                result["logs"] = self.failure_logs()
        return result
