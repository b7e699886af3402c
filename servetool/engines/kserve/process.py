"""Starting the KServe engine's server for a run folder (the local target; the Docker image runs
the same module): its config, its process group, and the state file that every other command
reads, in the same form as TorchServe's (ServerState of servetool/engines/torchserve/state.py,
engine "kserve"). The process helpers (condition, stop, health) are TorchServe's process
module's: one process group either way."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

from servetool import runfiles
from servetool.engines.torchserve import process as torchserve
from servetool.engines.torchserve.process import ServerError, ServerOptions
from servetool.engines.torchserve.state import DEFAULT_MAX_REQUEST_SIZE, STATE_FILE, ServerState

ENGINE = "kserve"
MARK = b"servetool.engines.kserve.server"
LOG = "kserve.log"


def server_settings(host: str, ports: dict[str, int], store: str | Path, run_dir: str | Path,
                    props: dict[str, str], sizes: tuple[int | None, int | None]) -> dict:
    """The server's settings file (server.py), here or in the image: the project's
    config.properties' token switch and the archives' request sizes as TorchServe would read
    them."""
    return {"host": host,
            "ports": {api: ports[api] for api in ("inference", "management", "metrics")},
            "model_store": str(store), "run_dir": str(run_dir),
            "token_auth": props.get("disable_token_authorization", "false").lower() != "true",
            "max_request_size": max([*(s for s in sizes if s),
                                     DEFAULT_MAX_REQUEST_SIZE])}


def config(opts: ServerOptions) -> dict:
    props = torchserve.read_properties(opts.base_config) if opts.base_config else {}
    return server_settings(opts.host, opts.ports, opts.model_store, opts.run_dir, props,
                           opts.sizes)


def start(opts: ServerOptions, progress: Callable[[str], None] = lambda _: None) -> ServerState:
    """Start the server in the background and return once /ping answers Healthy."""
    opts = replace(opts, run_dir=opts.run_dir.resolve(), model_store=opts.model_store.resolve(),
                   base_config=opts.base_config.resolve() if opts.base_config else None)
    if opts.split or opts.clients_port:
        raise ServerError("--engine kserve has no canary split (--split) and no OpenAI/TEI "
                          "clients' front (--clients-port) yet: deploy those on TorchServe")
    import importlib.util

    if importlib.util.find_spec("kserve") is None:
        raise ServerError("--engine kserve needs KServe's Python package (kserve 0.21): "
                          "pip install 'servetool[kserve]' (scripts/setup.sh --test has it)")
    runfiles.private_folder(opts.run_dir)
    cond, state = torchserve.condition(opts.run_dir)
    if cond in ("running", "starting"):
        raise ServerError(f"a server started by servetool is already running (pid {state.pid}, "
                          f"run folder {opts.run_dir}); `servetool stop` first")
    if cond == "crashed":
        progress("the server had crashed: ending what was left of it")
        torchserve.stop(opts.run_dir)
    for api in ("inference", "management", "metrics"):
        if torchserve.port_in_use(opts.host, opts.ports[api]):
            raise ServerError(f"port {opts.ports[api]} on {opts.host} ({api} API) is already in "
                              f"use by another program; pick another with --{api}-port")
    logs = opts.run_dir / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    shutil.rmtree(opts.run_dir / "kserve-models", ignore_errors=True)  # unpacked archives
    (opts.run_dir / "key_file.json").unlink(missing_ok=True)
    settings = opts.run_dir / "kserve.json"
    runfiles.write_private(settings, json.dumps(config(opts), indent=2) + "\n")
    progress(f"starting the KServe engine (logs in {logs})")
    with open(logs / LOG, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "servetool.engines.kserve.server",
                                 str(settings)], cwd=opts.run_dir, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, umask=0o077,
                                start_new_session=True,
                                env={**os.environ, "SERVETOOL_WORK_DIR": str(opts.run_dir)})
    state = ServerState(run_dir=str(opts.run_dir), pid=proc.pid, host=opts.host,
                        ports=dict(opts.ports), model_store=str(opts.model_store),
                        token_auth=config(opts)["token_auth"], engine=ENGINE)
    runfiles.write_private(opts.run_dir / STATE_FILE,
                           json.dumps(asdict(state), indent=2) + "\n")
    try:
        torchserve.wait_healthy(state, opts.startup_timeout_s, proc)
    except ServerError:
        torchserve.stop(opts.run_dir)
        raise
    state = replace(state, jvm_pid=proc.pid)  # from now on, its absence is a crash
    runfiles.write_private(opts.run_dir / STATE_FILE,
                           json.dumps(asdict(state), indent=2) + "\n")
    return state
