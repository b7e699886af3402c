"""The TorchServe process: render its config, start it, wait until healthy, stop it.

Everything of one server lives in one run folder: the rendered config.properties, logs/, tmp/ (its
TMPDIR, so its pid file and sockets collide with no other server), key_file.json and server.json,
servetool's record of the ports and process group. `torchserve --start` always exits 0, so health is
judged here, by polling and by reading logs/ts_log.log, never by an exit code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import requests

import servetool
from servetool import runfiles
from servetool.engines.torchserve import pod
from servetool.engines.torchserve.management import Client
from servetool.engines.torchserve.state import (
    DEFAULT_MAX_REQUEST_SIZE,
    STATE_FILE,
    ServerState,
    load_state,
    url_host,
)
from servetool.errors import ServetoolError

RESOURCES = Path(servetool.__file__).with_name("resources")
# TorchServe's own management API listens on a Unix socket in this folder (mode 700); servetool's
# management front (pod.py) takes the management port. See pod.py for why.
PRIVATE_DIR = "private"
MANAGEMENT_SOCKET = "management.sock"
DEFAULT_PORTS = {"inference": 8080, "management": 8081, "metrics": 8082,
                 "grpc_inference": 7070, "grpc_management": 7071}
# Keys servetool owns in the rendered config; a base config cannot move the server off them.
MANAGED_KEYS = ("inference_address", "management_address", "metrics_address",
                "grpc_inference_address", "grpc_management_address", "grpc_inference_port",
                "grpc_management_port", "model_store", "vmargs")
JAVA_HINT = ("TorchServe's frontend needs Java 11 or newer: install a JRE, e.g. "
             "`apt-get install -y openjdk-17-jre-headless`")


class ServerError(ServetoolError):
    pass


@dataclass
class ServerOptions:
    run_dir: Path
    model_store: Path
    base_config: Path | None = None
    host: str = "127.0.0.1"
    ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    startup_timeout_s: float = 90.0
    # the largest request and answer of the models served (max_request_size, max_response_size)
    sizes: tuple[int | None, int | None] = (None, None)
    # HAProxy on the inference port in front of TorchServe, for canary splits
    # (servetool/engines/torchserve/split.py)
    split: bool = False
    # the OpenAI and TEI clients' paths (servetool/engines/torchserve/clients.py) on this port;
    # None: not served
    clients_port: int | None = None
    engine: str = "torchserve"  # or "kserve": servetool/engines/kserve, no JVM


def java_version() -> int:
    """The major version of `java` on PATH (or JAVA_HOME), raising a clear error when missing."""
    java = shutil.which("java")
    if os.environ.get("JAVA_HOME"):
        candidate = Path(os.environ["JAVA_HOME"]) / "bin" / "java"
        java = str(candidate) if candidate.exists() else java
    if not java:
        raise ServerError(f"no `java` found. {JAVA_HINT}")
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ServerError(f"`{java} -version` failed ({exc}). {JAVA_HINT}") from None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not match:
        raise ServerError(f"cannot read the Java version from `{java} -version`. {JAVA_HINT}")
    major = int(match.group(1))
    major = int(match.group(2)) if major == 1 else major  # "1.8" is Java 8
    if major < 11:
        raise ServerError(f"Java {major} found at {java}. {JAVA_HINT}")
    return major


def read_properties(path: Path) -> dict[str, str]:
    """A .properties file as TorchServe (java.util.Properties) reads it, escapes included."""
    return pod.parse_properties(path.read_text())


# servetool's defaults for TorchServe, whatever folder a deployment starts from; a user's
# config.properties overrides any of them. The frontend's own CPU is taken from the workers on a
# small machine: one netty thread for clients and one for workers, the serial GC and the C1 JIT
# only (cheap to warm up) halved the JVM's CPU under load (0.17 -> 0.08 cores at 45 req/s on
# ResNet-18; 0.50 -> 0.32 at 1,100+ req/s on digits) and raised digits' throughput by a third.
DEFAULTS = {
    "enable_model_api": "true",
    "metrics_mode": "prometheus",  # Prometheus text on the metrics port
    "async_logging": "true",  # logging off the request path
    "allowed_urls": "file://{model_store}/[^/]+\\.mar",
    "number_of_netty_threads": "1",
    "netty_client_threads": "1",
    "vmargs": "-XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Xss512k",
    "default_response_timeout": "120",
    "job_queue_size": "100",
    "install_py_dep_per_model": "false",
}


def server_properties(base: dict[str, str], host: str, ports: dict[str, int], store: str,
                      log_config: str, management_socket: str | None = None,
                      sizes: tuple[int | None, int | None] = (None, None),
                      metrics_config: str | None = None) -> dict[str, str]:
    """TorchServe's properties: servetool's defaults, the user's base config over them, then the
    keys servetool manages (addresses, ports, model store, quiet logging) over both. With
    `management_socket`, TorchServe's management API listens there (behind servetool's front)."""
    props = {**DEFAULTS, **base}
    user_vmargs = props["vmargs"]
    props = {
        **props,
        "inference_address": f"http://{url_host(host)}:{ports['inference']}",
        "management_address": f"unix:{management_socket}" if management_socket else
                              f"http://{url_host(host)}:{ports['management']}",
        "metrics_address": f"http://{url_host(host)}:{ports['metrics']}",
        "grpc_inference_address": host,
        "grpc_management_address": host,
        "grpc_inference_port": str(ports["grpc_inference"]),
        "grpc_management_port": str(ports["grpc_management"]),
        "model_store": store,
        # servetool serves no workflows; TorchServe's workflow API (on even with the model API
        # off) would find nothing to load in a folder that does not exist
        "workflow_store": f"{store}/.servetool-no-workflows",
        "vmargs": f"{user_vmargs} -Dlog4j.configurationFile=file://{log_config}".strip(),
    }
    if metrics_config:  # TorchServe's metrics plus servetool's handler metrics (declared, or dropped)
        props["metrics_config"] = metrics_config
    props["allowed_urls"] = props["allowed_urls"].replace("{model_store}", re.escape(store))
    # Raised (never lowered) to what the served models take: a tensor model's JSON body is larger
    # than TorchServe's 6.5 MB default from about 270,000 values on.
    for key, needed in zip(("max_request_size", "max_response_size"), sizes, strict=True):
        if needed and needed > int(props.get(key) or DEFAULT_MAX_REQUEST_SIZE):
            props[key] = str(needed)
    return props


def format_properties(props: dict[str, str], header: str) -> str:
    """Escaped as java.util.Properties reads them: a regex's `\\.` survives as `\\.`."""
    return f"# {header}\n" + pod.format_properties(props)


def write_properties(target: Path, props: dict[str, str], source: str) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(format_properties(
        props, f"Rendered by servetool from {source}; edit that file, not this one."))
    return target


def render_config(opts: ServerOptions) -> Path:
    """Write run_dir/config.properties: the base config plus servetool's managed keys."""
    base = read_properties(opts.base_config) if opts.base_config else {}
    props = server_properties(base, opts.host, opts.ports, str(opts.model_store.resolve()),
                              str((RESOURCES / "log4j2.xml").resolve()),
                              str(private_dir(opts.run_dir) / MANAGEMENT_SOCKET), opts.sizes,
                              str(write_metrics_config(opts.run_dir / METRICS_FILE).resolve()))
    return write_properties(opts.run_dir / "config.properties", props,
                            str(opts.base_config or "built-in defaults"))


METRICS_FILE = "metrics.yaml"


def write_metrics_config(target: Path) -> Path:
    """TorchServe's own metrics configuration with servetool's handler metrics added to its
    model_metrics (handlers/metrics.py): a handler's metrics it does not declare are dropped."""
    import yaml

    from handlers.metrics import declaration

    default = Path(__import__("ts").__file__).parent / "configs" / "metrics.yaml"
    config = yaml.safe_load(default.read_text())
    model_metrics = config.setdefault("model_metrics", {}) or {}
    for kind, entries in declaration().items():
        known = {m["name"] for m in model_metrics.get(kind) or []}
        model_metrics[kind] = (model_metrics.get(kind) or []) + \
            [e for e in entries if e["name"] not in known]
    config["model_metrics"] = model_metrics
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump(config, sort_keys=False))
    return target


def private_dir(run_dir: Path) -> Path:
    """The folder of TorchServe's management socket: only this user may enter it."""
    path = run_dir / PRIVATE_DIR
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def token_auth_enabled(config_file: Path) -> bool:
    return read_properties(config_file).get("disable_token_authorization", "false").lower() != "true"


# A server whose JVM was never recorded healthy is starting while its launcher lives, for at most
# this long. A server whose recorded JVM is gone has crashed, even while its workers and the front
# are still winding down.
STARTUP_GRACE_S = 300.0
JVM_MARK = b"org.pytorch.serve.ModelServer"
# The process whose life is the server's, per engine (for KServe: its one Python process).
MAIN_MARKS = {"torchserve": JVM_MARK, "kserve": b"servetool.engines.kserve.server"}


def condition(run_dir: Path) -> tuple[str, ServerState | None]:
    """("running" | "starting" | "crashed" | "stopped", the recorded server). `stop` removes the
    record, so a record whose JVM is gone means the server died without being asked to."""
    state = load_state(run_dir)
    if state is None:
        return "stopped", None
    mark = MAIN_MARKS.get(state.engine, JVM_MARK)
    if state.jvm_pid is not None:
        return ("running" if _is_process(state.jvm_pid, mark) else "crashed"), state
    if _member_with(state.pid, mark) or (
            _group_alive(state.pid) and time.time() - state.started_at < STARTUP_GRACE_S):
        return "starting", state
    return "crashed", state


def running_state(run_dir: Path) -> ServerState | None:
    """The recorded server if its JVM is alive (or it is still starting)."""
    cond, state = condition(run_dir)
    return state if cond in ("running", "starting") else None


def crash_report(state: ServerState) -> str:
    left = group_members(state.pid)
    leftovers = f" ({len(left)} of its processes still running: `servetool stop` ends them)" \
        if left else ""
    return (f"TorchServe (run folder {state.run_dir}) has crashed: its JVM is gone, and it was not "
            f"stopped{leftovers}. `servetool deploy` restarts it with every model as it was.\n"
            + explain_failure(state))


def port_in_use(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def free_ports(names: tuple[str, ...] = tuple(DEFAULT_PORTS)) -> dict[str, int]:
    """Distinct free loopback ports, one per API name (all bound at once, so none repeats)."""
    sockets = [socket.socket() for _ in names]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return {name: s.getsockname()[1] for name, s in zip(names, sockets, strict=True)}
    finally:
        for s in sockets:
            s.close()


def torchserve_command() -> str:
    sibling = Path(sys.executable).with_name("torchserve")
    found = str(sibling) if sibling.exists() else shutil.which("torchserve")
    if not found:
        raise ServerError("the `torchserve` command is not installed in this environment "
                          "(pip install torchserve==0.12.0)")
    return found


def start(opts: ServerOptions, progress: Callable[[str], None] = lambda _: None) -> ServerState:
    """Start TorchServe in the background and return once /ping answers Healthy."""
    # The server runs with the run folder as its working directory: every path must be absolute.
    opts = replace(opts, run_dir=opts.run_dir.resolve(), model_store=opts.model_store.resolve(),
                   base_config=opts.base_config.resolve() if opts.base_config else None)
    runfiles.private_folder(opts.run_dir)  # 0700: its keys, state and lock are this user's alone
    cond, state = condition(opts.run_dir)
    if cond in ("running", "starting"):
        raise ServerError(f"a TorchServe started by servetool is already running (pid {state.pid}, "
                          f"run folder {opts.run_dir}); `servetool stop` first")
    if cond == "crashed":  # its leftovers (workers, the front) would hold ports and memory
        progress("TorchServe had crashed: ending what was left of it")
        stop(opts.run_dir)
    java_version()
    for api, port in {**opts.ports, **({"clients": opts.clients_port} if opts.clients_port
                                       else {})}.items():
        if port_in_use(opts.host, port):
            raise ServerError(f"port {port} on {opts.host} ({api} API) is already in use by another "
                              f"program; pick another with --{api.replace('_', '-')}-port")
    split_env, split_metrics = {}, None
    if opts.split:  # TorchServe on a loopback port of its own; HAProxy takes the inference port
        from servetool.engines.torchserve import split

        inner = free_ports(("upstream", "split_metrics", "exporter"))
        split_metrics = inner["split_metrics"]
        upstream = opts.host if opts.host not in ("0.0.0.0", "::", "localhost") else "127.0.0.1"
        split_config = split.render(split.SplitOptions(
            opts.run_dir, (opts.host, opts.ports["inference"]), (upstream, inner["upstream"]),
            ("127.0.0.1", split_metrics), inner["exporter"]))
        split.check_config(split_config)
        split_env = {"SERVETOOL_SPLIT_CONFIG": str(split_config),
                     "SERVETOOL_SPLIT_EXPORTER_PORT": str(inner["exporter"]),
                     "SERVETOOL_SPLIT_RUNTIME": split.split_runtime.__file__,
                     "SERVETOOL_HAPROXY": split.haproxy_binary()}
        config_file = render_config(replace(opts, ports={**opts.ports,
                                                         "inference": inner["upstream"]}))
    else:
        config_file = render_config(opts)
    run_dir = opts.run_dir
    logs, tmp = run_dir / "logs", run_dir / "tmp"
    for stale in (logs, tmp):
        shutil.rmtree(stale, ignore_errors=True)
        stale.mkdir(parents=True)
    (run_dir / "key_file.json").unlink(missing_ok=True)
    pod.front_key(run_dir / pod.FRONT_KEY_FILE)  # made first, so no client races for it
    env = {**os.environ, "TMPDIR": str(tmp), "TEMP": str(tmp), "LOG_LOCATION": str(logs),
           "METRICS_LOCATION": str(logs), "SERVETOOL_WORK_DIR": str(run_dir),
           "SERVETOOL_TS_CONFIG": str(config_file),
           "SERVETOOL_FRONT_LISTEN": f"{url_host(opts.host)}:{opts.ports['management']}",
           **split_env, **clients_env(opts)}
    # pod.py exec starts servetool's management front, then becomes TorchServe's launcher: one
    # process group holds the launcher, the JVM, its workers and the front.
    cmd = [sys.executable, pod.__file__, "exec", torchserve_command(), "--start", "--foreground",
           "--ncs", "--model-store", str(opts.model_store.resolve()), "--ts-config", str(config_file)]
    progress(f"starting TorchServe (logs in {logs})")
    with open(logs / "launcher.log", "wb") as launcher_log:
        # umask 077: what the server writes (TorchServe's key_file.json, its logs) is this user's
        proc = subprocess.Popen(cmd, cwd=run_dir, env=env, stdin=subprocess.DEVNULL,
                                stdout=launcher_log, stderr=subprocess.STDOUT, umask=0o077,
                                start_new_session=True)  # own process group: stop kills it whole
    state = ServerState(run_dir=str(run_dir), pid=proc.pid, host=opts.host, ports=dict(opts.ports),
                        model_store=str(opts.model_store.resolve()),
                        token_auth=token_auth_enabled(config_file), front=True,
                        split_metrics_port=split_metrics, clients_port=opts.clients_port)
    runfiles.write_private(run_dir / STATE_FILE, json.dumps(asdict(state), indent=2) + "\n")
    try:
        wait_healthy(state, opts.startup_timeout_s, proc)
    except ServerError:
        stop(run_dir)
        raise
    # From now on a missing JVM is a crash, not a start-up (see condition()).
    state = replace(state, jvm_pid=_member_with(state.pid, JVM_MARK))
    runfiles.write_private(run_dir / STATE_FILE, json.dumps(asdict(state), indent=2) + "\n")
    return state


def clients_env(opts: ServerOptions) -> dict[str, str]:
    """What pod.py needs to start the clients' front: where it listens, and the public inference
    port it forwards to (HAProxy's when a canary split fronts it, so the split applies)."""
    if not opts.clients_port:
        return {}
    upstream = opts.host if opts.host not in ("0.0.0.0", "::", "localhost") else "127.0.0.1"
    return {"SERVETOOL_CLIENTS_LISTEN": f"{url_host(opts.host)}:{opts.clients_port}",
            "SERVETOOL_CLIENTS_UPSTREAM": f"{url_host(upstream)}:{opts.ports['inference']}"}


def wait_healthy(state: ServerState, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    client = Client(state)
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while time.monotonic() < deadline:
        if (proc is not None and proc.poll() is not None) or not _group_alive(state.pid):
            raise ServerError("TorchServe exited during start-up.\n" + explain_failure(state))
        try:
            reply = client.ping()
            if reply.get("status") == "Healthy":
                client.list_models()  # the management API (through the front) answers too
                return
            last = json.dumps(reply)
        except (requests.RequestException, ServetoolError) as exc:
            last = str(exc).splitlines()[0]
        time.sleep(0.05)  # a refused connection costs nothing; every poll saved is start-up time
    raise ServerError(f"TorchServe was not healthy within {timeout_s:.0f} s (last: {last}).\n"
                      + explain_failure(state))


FAILURE_PATTERNS = re.compile(
    r"(ERROR|Exception|Error:|error:|Failed|failed|Address already in use|BindException|"
    r"Traceback|No module named|Unable to|Load model failed|not found|Unrecognized|[Ii]nvalid|"
    r"[Cc]annot|denied)")

# "2026-11-22T02:37:25,791 [INFO ] W-9006-broken_1.0-stdout MODEL_LOG - " before each message
LOG_PREFIX = re.compile(r"^\d{4}-\d\d-\d\dT[\d:,.]+ \[\w+\s*\] \S+ \S+ - ")


def log_tail(state: ServerState, names: tuple[str, ...] = ("ts_log.log", "launcher.log",
                                                          "kserve.log"),
             lines: int = 8) -> list[str]:
    """The lines of the server's logs that say what went wrong (or the last lines, if none do)."""
    found: list[str] = []
    for name in names:
        path = state.log_dir / name
        if path.is_file():
            found += telling_lines(path.read_text(errors="replace").splitlines(), name, lines)
    return found


def telling_lines(text: list[str], source: str, lines: int = 8) -> list[str]:
    """The last lines of a log that look like a failure (or its last three lines, if none do)."""
    text = [LOG_PREFIX.sub("", line).strip() for line in text]
    hits = [f"{source}: {line}" for line in text if FAILURE_PATTERNS.search(line)]
    return hits[-lines:] if hits else [f"{source}: {line}" for line in text[-3:]]


def explain_failure(state: ServerState) -> str:
    tail = log_tail(state)
    body = "\n".join(f"  {line}" for line in tail) if tail else "  (the logs are empty)"
    return f"From the logs in {state.log_dir}:\n{body}"


def stop(run_dir: Path, timeout_s: float = 20.0) -> bool:
    """Stop the server recorded in run_dir, its JVM and every worker; True if one was running."""
    state = load_state(run_dir)
    if state is None:
        return False
    pgid = state.pid
    was_alive = _group_alive(pgid)
    if was_alive and _is_ours(pgid):
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _group_alive(pgid) and time.monotonic() < deadline:
            _reap(pgid)
            time.sleep(0.1)
        if _group_alive(pgid):
            _signal_group(pgid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while _group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.1)
        _reap(pgid)
    if _group_alive(pgid) and _is_ours(pgid):
        raise ServerError(f"processes of the server (group {pgid}) survived SIGKILL: "
                          f"{', '.join(map(str, group_members(pgid)))}")
    (run_dir / STATE_FILE).unlink(missing_ok=True)
    (run_dir / "tmp" / ".model_server.pid").unlink(missing_ok=True)
    return was_alive


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in a process group, read from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


def _member_with(pgid: int, mark: bytes) -> int | None:
    """A live process of the group whose command line holds `mark`."""
    return next((pid for pid in group_members(pgid) if _is_process(pid, mark)), None)


def _is_process(pid: int, mark: bytes) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z" and \
            mark in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, IndexError):
        return False


def _group_alive(pgid: int) -> bool:
    if Path("/proc/self/stat").exists():
        _reap(pgid)
        return bool(group_members(pgid))
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# What the processes of a server servetool started run: the launcher, the JVM, the Python workers
# (which outlive a killed JVM for a while) and the management front.
OUR_PROCESSES = (b"torchserve", b"org.pytorch.serve", b"model_server", b"ts/model_service_worker",
                 b"pod.py front", b"pod.py keep", b"servetool.engines.torchserve.clients",
                 b"servetool.engines.kserve.server")


def _is_ours(pgid: int) -> bool:
    """Guards against a recycled pid: some process of the group must be TorchServe's."""
    for pid in group_members(pgid) or [pgid]:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if any(mark in cmdline for mark in OUR_PROCESSES):
            return True
    return not Path("/proc/self").exists()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _reap(pid: int) -> None:
    """Collect the launcher's exit status when this very process started it (else a zombie stays)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
