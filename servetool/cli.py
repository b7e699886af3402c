"""servetool's command line: thin click commands that parse options and call plain functions."""

from __future__ import annotations

import functools
import json
import mimetypes
import os
import sys
from pathlib import Path
from typing import Any

import click

from servetool import __version__
from servetool.errors import ServetoolError
from servetool.formats import FORMATS
from servetool.management import check_name, check_version, explain_failure, model_path
from servetool.torchserve import DEFAULT_PORTS, ServerOptions

RUN_DIR_DEFAULT = ".servetool"
FORMAT_NAMES = list(FORMATS)


def _stderr(message: str) -> None:
    click.echo(message, err=True)


def progress(message: str) -> None:
    """Progress goes to stderr so that --json output on stdout stays parseable."""
    _stderr(f"... {message}")


def friendly_errors(func):
    """Expected failures become one message and exit 1; never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ServetoolError as exc:
            _stderr(f"error: {exc}")
            sys.exit(1)
        except KeyboardInterrupt:
            _stderr("interrupted")
            sys.exit(130)

    return wrapper


def emit(data: dict[str, Any], as_json: bool, text: str) -> None:
    click.echo(json.dumps(data, indent=2) if as_json else text)


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")


TARGETS = ["local", "docker", "kubernetes"]
target_option = click.option(
    "--target", type=click.Choice(TARGETS), envvar="SERVETOOL_TARGET", default="local",
    show_default=True, help="Which deployment: the embedded local server, the Docker container, or "
                            "a Kubernetes deployment (with the --kubeconfig/--name options).")


def kube_options(func):
    """Which Kubernetes deployment, and how to reach the cluster."""
    options = [
        click.option("--kubeconfig", type=click.Path(path_type=Path), envvar="KUBECONFIG",
                     default=None, help="kubernetes: the cluster's kubeconfig (never implied).") ,
        click.option("--kube-context", default=None, help="kubernetes: a context of the kubeconfig."),
        click.option("--namespace", default="default", show_default=True, help="kubernetes."),
        click.option("--name", "deployment_name", default=None,
                     help="kubernetes: the deployment (overlay) name [default: the model names]."),
        click.option("--manifests", "manifests_dir", type=click.Path(path_type=Path),
                     default="deploy/kubernetes", show_default=True,
                     help="kubernetes: where the kustomize base and overlays are written."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def kube_target(kubeconfig: Path | None, kube_context: str | None, manifests_dir: Path):
    from servetool.targets.kubernetes import KubernetesTarget

    return KubernetesTarget(manifests_dir, kubeconfig, kube_context, progress)


def require_name(deployment_name: str | None) -> str:
    if not deployment_name:
        raise ServetoolError("--target kubernetes needs --name (the deployment's overlay name)")
    return deployment_name


def store_options(func):
    """Where the server's files live and which archives it serves."""
    options = [
        click.option("--run-dir", type=click.Path(path_type=Path), envvar="SERVETOOL_RUN_DIR",
                      default=RUN_DIR_DEFAULT, show_default=True,
                      help="Folder for the server's config, logs, keys and pid."),
        click.option("--model-store", type=click.Path(path_type=Path),
                     envvar="SERVETOOL_MODEL_STORE", default="model_store", show_default=True,
                     help="Folder of .mar archives."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def server_options(func):
    """store_options plus which deployment a command talks to."""
    return target_option(store_options(func))


def default_config() -> Path | None:
    """./config.properties when present: the project's base TorchServe config for every target."""
    return Path("config.properties") if Path("config.properties").is_file() else None


def make_target(run_dir: Path, model_store: Path, target: str = "local", docker_opts: Any = None,
                **kwargs: Any):
    if target == "kubernetes":
        raise ServetoolError(
            "this command talks to one TorchServe; on kubernetes use `servetool scale --target "
            "kubernetes`, `servetool token --target kubernetes`, or kubectl (port-forward the "
            "Service for predictions; `kubectl get pods -l app.kubernetes.io/name=servetool`)")
    if target == "docker":
        from servetool.targets.docker import DockerTarget

        opts = ServerOptions(run_dir=run_dir / "docker", model_store=model_store, **kwargs)
        return DockerTarget(opts, docker_opts, progress)
    from servetool.targets.local import LocalTarget

    return LocalTarget(ServerOptions(run_dir=run_dir, model_store=model_store, **kwargs), progress)


def server_setting(state: Any, key: str) -> str | None:
    """A setting of the server's rendered config.properties (local target), if it says one."""
    from servetool.torchserve import read_properties

    config = Path(state.run_dir) / "config.properties"
    return read_properties(config).get(key) if config.is_file() else None


def check_model_args(model: str, version: str | None) -> None:
    """Model names and versions go into URL paths: checked before anything is sent."""
    check_name(model)
    if version is not None:
        check_version(version)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="servetool")
def main() -> None:
    """Package PyTorch models for TorchServe, deploy them, and operate the service.

    \b
    Typical use:
      servetool package models/digits     # export, check parity, build model_store/digits.mar
      servetool deploy                    # start TorchServe on 127.0.0.1, register every archive
      servetool predict digits models/digits/samples/digit_3.png
      servetool scale digits --workers 3
      servetool status
      servetool stop

    \b
    Other targets (see --target on each command):
      servetool deploy --target docker                 # servetool's image in a container
      servetool deploy --target kubernetes --dry-run   # kustomize manifests in deploy/kubernetes
    """


atol_option = click.option(
    "--atol", type=float, default=None,
    help="Parity tolerance (max abs diff), overriding the format's default and the spec's.")
accept_option = click.option(
    "--accept-drift", is_flag=True,
    help="Package even when the gate finds drift (the problems are still reported).")


def gate_summary(gate: dict[str, Any]) -> str:
    parts = []
    if gate["outputs"]:
        out = gate["outputs"][0]
        parts.append(f"max abs diff {out['max_abs_diff']:.2g} (bound {out['bound']:.2g})")
        if out["top1_agreement"] is not None:
            parts.append(f"top-1 agreement {out['top1_agreement']:.1%}")
        elif out.get("min_cosine") is not None:
            parts.append(f"cosine similarity >= {out['min_cosine']:.6f}")
    if gate["accuracy"]:
        acc = gate["accuracy"]
        parts.append(f"accuracy {acc['original']:.2%} -> {acc['converted']:.2%} "
                     f"({(acc['converted'] - acc['original']) * 100:+.2f} pts)")
    if gate["problems"]:
        parts.append("ACCEPTED DESPITE: " + "; ".join(gate["problems"]))
    return ", ".join(parts)


@main.command()
@click.argument("model_dirs", nargs=-1, type=click.Path(path_type=Path))
@click.option("--model-store", type=click.Path(path_type=Path), envvar="SERVETOOL_MODEL_STORE",
              default="model_store", show_default=True, help="Where to write the .mar archives.")
@click.option("--models-root", type=click.Path(path_type=Path), default="models", show_default=True,
              help="Where to look for models when no MODEL_DIR is given.")
@atol_option
@accept_option
@json_option
@friendly_errors
def package(model_dirs: tuple[Path, ...], model_store: Path, models_root: Path,
            atol: float | None, accept_drift: bool, as_json: bool) -> None:
    """Convert each model to its spec's format, gate it, and build its .mar.

    MODEL_DIRS are folders holding a servetool.yaml (default: every model under --models-root).
    """
    from servetool.package import package as package_model
    from servetool.spec import find_specs

    specs = find_specs([str(d) for d in model_dirs], models_root)
    results = [package_model(spec, model_store, atol=atol, accept_drift=accept_drift,
                             progress=progress) for spec in specs]
    lines = [f"{r['archive']}: {r['name']} {r['version']} as {r['format']}, "
             f"{r['archive_bytes'] / 1e6:.2f} MB, {gate_summary(r['parity'])}, {r['seconds']} s"
             for r in results]
    emit({"models": results}, as_json, "\n".join(lines))


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--format", "formats", multiple=True, type=click.Choice(FORMAT_NAMES),
              help="A format to produce (repeatable) [default: the spec's format].")
@click.option("--out", type=click.Path(path_type=Path), default="build", show_default=True,
              help="Artifacts go to OUT/NAME/FORMAT/.")
@atol_option
@accept_option
@json_option
@friendly_errors
def convert(model_dir: Path, formats: tuple[str, ...], out: Path, atol: float | None,
            accept_drift: bool, as_json: bool) -> None:
    """Export MODEL_DIR's model to serving formats and check each against the original.

    Every artifact passes the gate (parity on sample inputs with the format's tolerance, and top-1
    accuracy on the spec's validation set) or the command fails naming the drift.
    """
    from servetool import export
    from servetool.package import convert as convert_model
    from servetool.package import describe
    from servetool.spec import load_spec

    spec = load_spec(model_dir)
    original = export.load_original(spec)
    rows = []
    for fmt in formats or (spec.format,):
        artifact, report = convert_model(spec, fmt, out / spec.name / fmt, original=original,
                                         atol=atol, accept_drift=accept_drift, progress=progress)
        rows.append(describe(artifact, report))
    lines = [f"{r['format']}: {r['files'][0]} ({r['size_bytes'] / 1e6:.2f} MB), "
             f"{gate_summary(r['gate'])}" for r in rows]
    emit({"model": spec.name, "formats": rows}, as_json, "\n".join(lines))


@main.command()
@click.argument("models", nargs=-1)
@click.option("--target", type=click.Choice(TARGETS), default="local", show_default=True,
              help="local: an embedded TorchServe on this machine; docker: servetool's image in a "
                   "container; kubernetes: manifests (applied when a kubeconfig is given).")
@store_options
@click.option("--config", "base_config", type=click.Path(path_type=Path), default=None,
              help="Base TorchServe config.properties [default: ./config.properties if present].")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (local) or publish on (docker). Anything but loopback "
                   "exposes the APIs to the network.")
@click.option("--inference-port", type=int, default=DEFAULT_PORTS["inference"], show_default=True)
@click.option("--management-port", type=int, default=DEFAULT_PORTS["management"], show_default=True)
@click.option("--metrics-port", type=int, default=DEFAULT_PORTS["metrics"], show_default=True)
@click.option("--grpc-inference-port", type=int, default=DEFAULT_PORTS["grpc_inference"],
              show_default=True)
@click.option("--grpc-management-port", type=int, default=DEFAULT_PORTS["grpc_management"],
              show_default=True)
@click.option("--timeout", type=float, default=300, show_default=True,
              help="Seconds to wait for the server and for each model's workers.")
@click.option("--restart-on-crash", is_flag=True,
              help="Bring a crashed server back with every model, version and worker count: "
                   "local: a supervisor process; docker: a restart policy (TorchServe restores "
                   "its last snapshot).")
@click.option("--base-image", default=None,
              help="docker: the image to build on [default: python:3.11-slim-bookworm].")
@click.option("--network", type=click.Choice(["ports", "host"]), default="ports", show_default=True,
              help="docker: publish the APIs on --host (ports) or share the host's network (host).")
@click.option("--mount-models", is_flag=True,
              help="docker: mount the model store read-only instead of baking the archives in.")
@click.option("--mount-config", is_flag=True,
              help="docker: mount the rendered config.properties read-only instead of baking it in "
                   "(a config change then needs a new container, not a new image).")
@click.option("--image-tag", default=None, help="docker: tag for the image [default: from the "
              "model names and a digest of the build context].")
@click.option("--container-name", default="servetool", show_default=True)
@click.option("--cpus", "docker_cpus", type=click.FloatRange(min=0.1), default=None,
              help="docker: CPU limit for the container (auto workers follow it).")
@click.option("--docker-memory", default=None, help="docker: memory limit, e.g. 2g.")
@click.option("--ca-cert", "ca_certs", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="docker: a CA certificate pip needs during the build (repeatable) [default: the "
                   "ones in /usr/local/share/ca-certificates]. Used in the build stage only.")
@kube_options
@click.option("--dry-run", is_flag=True, help="kubernetes: render the manifests, apply nothing.")
@click.option("--image", "kube_image", default=None,
              help="kubernetes: the image the pods run [default: the tag --target docker builds "
                   "for these archives]; push it where the cluster can pull it.")
@click.option("--replicas", type=click.IntRange(min=1), default=2, show_default=True,
              help="kubernetes: the autoscaler's minimum number of pods (it owns the count).")
@click.option("--max-replicas", type=click.IntRange(min=1), default=5, show_default=True,
              help="kubernetes: the autoscaler's maximum.")
@click.option("--cpu", default="1", show_default=True, help="kubernetes: CPU request per pod.")
@click.option("--memory", default="2Gi", show_default=True,
              help="kubernetes: memory limit per pod (the request is half).")
@click.option("--models-pvc", default=None,
              help="kubernetes: mount this PersistentVolumeClaim as the model store instead of "
                   "using the archives baked into the image.")
@click.option("--no-token-auth", is_flag=True,
              help="kubernetes: serve without any key (no gateway, TorchServe's token auth off).")
@json_option
@friendly_errors
def deploy(models: tuple[str, ...], target: str, run_dir: Path, model_store: Path,
           base_config: Path | None, host: str, inference_port: int, management_port: int,
           metrics_port: int, grpc_inference_port: int, grpc_management_port: int,
           timeout: float, restart_on_crash: bool, base_image: str | None, network: str,
           mount_models: bool,
           mount_config: bool, image_tag: str | None, container_name: str, docker_cpus: float | None,
           docker_memory: str | None, ca_certs: tuple[Path, ...], kubeconfig: Path | None,
           kube_context: str | None, namespace: str,
           deployment_name: str | None, manifests_dir: Path, dry_run: bool, kube_image: str | None,
           replicas: int, max_replicas: int, cpu: str, memory: str, models_pvc: str | None,
           no_token_auth: bool, as_json: bool) -> None:
    """Start TorchServe (if not running) and register MODELS (default: every archive).

    MODELS are model names (model_store/NAME.mar) or archive paths. Running it again registers
    only the archives that changed. With --target docker the image is built first (deploy/docker/
    holds its context) and the container replaced when the image changed.
    """
    base_config = base_config or default_config()
    if target == "kubernetes":
        from servetool.targets.kubernetes import KubeRequest, deploy_kubernetes

        result = deploy_kubernetes(KubeRequest(
            models=models, model_store=model_store, base_config=base_config, name=deployment_name,
            namespace=namespace, image=kube_image, replicas=replicas, max_replicas=max_replicas,
            cpu=cpu, memory=memory, models_pvc=models_pvc, token_auth=not no_token_auth,
            dry_run=dry_run, timeout_s=timeout),
            kube_target(kubeconfig, kube_context, manifests_dir))
        emit(result, as_json, kube_summary(result))
        return
    if host not in ("127.0.0.1", "localhost", "::1"):
        _stderr(f"warning: listening on {host}: the inference, management and metrics APIs are "
                "reachable from the network (token auth stays on)")
    ports = {"inference": inference_port, "management": management_port, "metrics": metrics_port,
             "grpc_inference": grpc_inference_port, "grpc_management": grpc_management_port}
    docker_opts = None
    if target == "docker":
        from servetool.image import DEFAULT_BASE_IMAGE, ImageOptions
        from servetool.targets.docker import DockerOptions

        docker_opts = DockerOptions(
            ImageOptions(model_store=model_store, base_image=base_image or DEFAULT_BASE_IMAGE,
                         base_config=base_config, bake_models=not mount_models,
                         bake_config=not mount_config, tag=image_tag,
                         ca_certs=list(ca_certs) or None),
            network=network, container_name=container_name, publish_host=host,
            cpus=docker_cpus, memory_limit=docker_memory, restart_on_crash=restart_on_crash)
    tgt = make_target(run_dir, model_store, target, docker_opts, base_config=base_config,
                      host=host, ports=ports, startup_timeout_s=timeout)
    result = tgt.deploy(models, timeout_s=timeout)
    if restart_on_crash and target == "local":
        result["supervisor_pid"] = tgt.supervise()
    emit(result, as_json, deploy_summary(result))


def kube_summary(result: dict[str, Any]) -> str:
    lines = [f"Manifests in {result['folder']} (overlay {result['overlay']}), image {result['image']}:",
             "  " + ", ".join(result["objects"])]
    if result["dry_run"]:
        lines.append(f"Dry run: nothing applied. Apply with: {result['apply_with']}")
    else:
        lines.append(f"Applied to namespace {result['namespace']}; rollout: {result['rollout']}")
    service = next(o.split("/", 1)[1] for o in result["objects"] if o.startswith("Service/"))
    lines.append(f"Predict: kubectl -n {result['namespace']} port-forward svc/{service} 8080:8080, then "
                 "curl -H @<(servetool token --header --target kubernetes --name "
                 f"{result['name']}) -T FILE http://127.0.0.1:8080/predictions/MODEL"
                 if result["token_auth"] else
                 f"Predict: kubectl -n {result['namespace']} port-forward svc/{service} 8080:8080, then "
                 "curl -T FILE http://127.0.0.1:8080/predictions/MODEL (no token: --no-token-auth)")
    return "\n".join(lines)


def deploy_summary(result: dict[str, Any]) -> str:
    ep = result["endpoints"]
    where = (f"container {result['container']} from {result['image']['tag']}"
             if result["target"] == "docker" else f"run folder {result['run_dir']}")
    lines = [f"TorchServe {'started' if result['server_started'] else 'already running'} ({where})",
             f"  inference:  {ep['inference']}",
             f"  management: {ep['management']}",
             f"  metrics:    {ep['metrics']}"]
    for m in result["models"]:
        ready = sum(w["status"] == "READY" for w in m["workers"])
        lines.append(f"  {m['name']} {m['version']}: {m['action']}, {ready} worker(s) READY, "
                     f"{m['predictions_url']}")
    flag = " --target docker" if result["target"] == "docker" else ""
    # The header from a pipe, not the command line: `ps` shows every local user a process's args.
    auth = (f"-H @<(servetool token --header{flag}) " if result["token_auth"] else "")
    if result["models"]:
        first = result["models"][0]
        lines += ["", "Predict with curl (token auth is on; `servetool token` prints the current key):",
                  f"  curl {auth}-T IMAGE_OR_JSON_FILE {first['predictions_url']}"]
    lines += [f"Scale: servetool scale NAME --workers N{flag}    Status: servetool status{flag}    "
              f"Stop: servetool stop{flag}"]
    return "\n".join(lines)


@main.command("image")
@click.argument("models", nargs=-1)
@click.option("--model-store", type=click.Path(path_type=Path), envvar="SERVETOOL_MODEL_STORE",
              default="model_store", show_default=True, help="Folder of .mar archives.")
@click.option("--config", "base_config", type=click.Path(path_type=Path), default=None,
              help="Base TorchServe config.properties [default: ./config.properties if present].")
@click.option("--base-image", default=None, help="The image to build on [default: "
              "python:3.11-slim-bookworm].")
@click.option("--tag", default=None, help="Tag for the image, e.g. REGISTRY/servetool-digits:1.0 "
              "[default: servetool/NAMES:DIGEST].")
@click.option("--no-models", is_flag=True,
              help="Bake no archives (they come from a volume: --mount-models / --models-pvc).")
@click.option("--ca-cert", "ca_certs", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="A CA certificate pip needs during the build (repeatable).")
@click.option("--out", type=click.Path(path_type=Path), default="deploy/docker", show_default=True,
              help="Where the build context is rendered.")
@json_option
@friendly_errors
def image_command(models: tuple[str, ...], model_store: Path, base_config: Path | None,
                  base_image: str | None, tag: str | None, no_models: bool,
                  ca_certs: tuple[Path, ...], out: Path, as_json: bool) -> None:
    """Build the serving image for MODELS (default: every archive) with the local Docker engine.

    The image `deploy --target docker` runs and `deploy --target kubernetes --image` names: push it
    to a registry your cluster pulls from (`docker push TAG`).
    """
    from servetool.image import DEFAULT_BASE_IMAGE, ImageOptions, build_image
    from servetool.targets.local import find_archives

    base_config = base_config or default_config()
    archives = find_archives(models, model_store)
    opts = ImageOptions(model_store=model_store, out_dir=out, base_image=base_image or DEFAULT_BASE_IMAGE,
                        base_config=base_config, bake_models=not no_models, tag=tag,
                        ca_certs=list(ca_certs) or None)
    result = build_image(opts, archives, progress)
    result["models"] = [p.stem for p in archives]
    size = f"{result['size_bytes'] / 1e6:.0f} MB" if result.get("size_bytes") else "size unknown"
    emit(result, as_json, f"{result['tag']} ({size}, {'built' if result['built'] else 'already built'})"
         f"\nPush it where your cluster pulls from: docker push {result['tag']}")


@main.command()
@click.argument("model")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--version", "model_version", default=None, help="A model version (default: the default).")
@click.option("--content-type", default=None,
              help="Content type to send [default: application/json for .json, else "
                   "application/octet-stream].")
@server_options
@json_option
@friendly_errors
def predict(model: str, file: Path, model_version: str | None, content_type: str | None,
            run_dir: Path, model_store: Path, target: str, as_json: bool) -> None:
    """Send FILE to MODEL's prediction endpoint and print the answer."""
    check_model_args(model, model_version)
    client = make_target(run_dir, model_store, target).client()
    if content_type is None:
        guessed = mimetypes.guess_type(file.name)[0]
        content_type = "application/json" if guessed == "application/json" else "application/octet-stream"
    payload = file.read_bytes()
    reply = client.predict(model, payload, content_type, model_version)
    try:
        body: Any = reply.json()
    except ValueError:
        body = reply.text
    if reply.status_code != 200:
        detail = body.get("error") or body.get("message") if isinstance(body, dict) else body
        limit = server_setting(client.state, "max_request_size")
        raise ServetoolError(f"{model} answered {reply.status_code}: " + explain_failure(
            reply.status_code, str(detail or ""), len(payload), int(limit) if limit else None))
    emit({"model": model, "status": reply.status_code, "prediction": body}, as_json,
         json.dumps(body, indent=2))


@main.command()
@click.argument("model")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Number of TorchServe workers for the model (in every pod, on kubernetes).")
@click.option("--replicas", type=click.IntRange(min=1), default=None,
              help="kubernetes: number of pods (the autoscaler's minimum follows).")
@click.option("--version", "model_version", default=None, help="A model version (default: the default).")
@server_options
@kube_options
@json_option
@friendly_errors
def scale(model: str, workers: int | None, replicas: int | None, model_version: str | None,
          run_dir: Path, model_store: Path, target: str, kubeconfig: Path | None,
          kube_context: str | None, namespace: str, deployment_name: str | None,
          manifests_dir: Path, as_json: bool) -> None:
    """Set MODEL's worker count through the management API and wait until they are READY.

    On kubernetes, --replicas scales pods and --workers reaches every pod's management API (and
    the ConfigMap, so that pods started later get the same count).
    """
    check_model_args(model, model_version)
    if target == "kubernetes":
        if workers is None and replicas is None:
            raise ServetoolError("give --workers N and/or --replicas N")
        kube = kube_target(kubeconfig, kube_context, manifests_dir)
        name = require_name(deployment_name)
        result: dict[str, Any] = {"target": target, "model": model}
        if replicas is not None:
            result["replicas"] = kube.scale_replicas(namespace, name, replicas)
        if workers is not None:
            result["workers"] = kube.scale_workers(namespace, name, model, workers)
        emit(result, as_json, json.dumps(result, indent=2))
        return
    if replicas is not None:
        raise ServetoolError("--replicas is for --target kubernetes; use --workers here")
    if workers is None:
        raise ServetoolError("give --workers N")
    result = make_target(run_dir, model_store, target).scale(model, workers, model_version)
    emit(result, as_json, f"{model} {result['version']}: {len(result['workers'])} worker(s) READY")


@main.command()
@server_options
@kube_options
@json_option
@friendly_errors
def status(run_dir: Path, model_store: Path, target: str, kubeconfig: Path | None,
           kube_context: str | None, namespace: str, deployment_name: str | None,
           manifests_dir: Path, as_json: bool) -> None:
    """Show the server, its models, versions and workers (on kubernetes: the pods)."""
    if target == "kubernetes":
        kube = kube_target(kubeconfig, kube_context, manifests_dir)
        result = kube.status(namespace, require_name(deployment_name))
        lines = [f"{p['name']}: {'ready' if p['ready'] else 'not ready'}" for p in result["pods"]]
        emit(result, as_json, "\n".join(lines) or "no running pods")
        return
    result = make_target(run_dir, model_store, target).status()
    if result.get("state") == "crashed":  # a problem, said as one: exit 1
        emit(result, as_json, result["detail"])
        sys.exit(1)
    if not result["running"]:
        text = f"no TorchServe running from {run_dir}"
        if result.get("container"):
            text = (f"container {result['container']} is {result['container_status']}.\n"
                    + result.get("logs", ""))
        emit(result, as_json, text)
        return
    ep = result["endpoints"]
    where = (f"container {result['container']}, {result['health'] or 'no health yet'}"
             if target == "docker" else f"pid {result['pid']}")
    lines = [f"TorchServe running ({where}): inference {ep['inference']}, "
             f"management {ep['management']}, metrics {ep['metrics']}"]
    for m in result["models"] or []:
        if m.get("error"):
            lines.append(f"  {m['name']!r}: {m['error']}")
            continue
        states = ", ".join(f"{w['id']}:{w['status']}" for w in m["workers"]) or "no workers"
        default = " (default)" if m["default"] else ""
        lines.append(f"  {m['name']} {m['version']}{default}: batch {m['batch_size']}, "
                     f"workers [{states}]")
    if not result["models"]:
        lines.append("  no models registered")
    emit(result, as_json, "\n".join(lines))


@main.command()
@click.option("--kind", type=click.Choice(["inference", "management"]), default="inference",
              show_default=True)
@click.option("--header", "as_header", is_flag=True,
              help="Print the whole header line, for curl's -H @FILE: "
                   "curl -H @<(servetool token --header) ... keeps the key out of `ps`.")
@server_options
@kube_options
@friendly_errors
def token(kind: str, as_header: bool, run_dir: Path, model_store: Path, target: str,
          kubeconfig: Path | None, kube_context: str | None, namespace: str,
          deployment_name: str | None, manifests_dir: Path) -> None:
    """Print the running server's current API key, for `Authorization: Bearer ...`.

    On kubernetes: the key every replica's gateway accepts (from the overlay's Secret).
    Keep keys out of command lines (every local user can read those with `ps`): give curl the
    header from a file or a pipe, `curl -H @<(servetool token --header) ...`.
    """
    if target == "kubernetes":
        from servetool.manifests import read_key

        overlay = manifests_dir / "overlays" / require_name(deployment_name)
        key = read_key(overlay) if kind == "inference" else None
        if key is None:
            raise ServetoolError(f"no inference key in {overlay}/secret.yaml (rendered with "
                                 "--no-token-auth, or not rendered here); the management API is "
                                 "reached through `kubectl exec`/`servetool scale`")
        click.echo(f"Authorization: Bearer {key}" if as_header else key)
        return
    key = make_target(run_dir, model_store, target).client().token(kind)
    if key is None:
        raise ServetoolError("token authorization is off on this server: send no header")
    click.echo(f"Authorization: Bearer {key}" if as_header else key)


@main.command()
@server_options
@json_option
@friendly_errors
def stop(run_dir: Path, model_store: Path, target: str, as_json: bool) -> None:
    """Stop the server, its JVM and every worker."""
    tgt = make_target(run_dir, model_store, target)
    before = tgt.condition()
    was_running = tgt.down()
    if before == "crashed":
        text = "TorchServe had crashed; what was left of it is stopped"
    elif was_running:
        text = "TorchServe stopped" + (" and its container removed" if target == "docker" else "")
    else:
        text = f"no TorchServe was running from {run_dir} ({target})"
    emit({"target": target, "stopped": was_running, "was": before}, as_json, text)


@main.group()
def bench() -> None:
    """Measure serving formats side by side, or load-test a deployed model."""


@bench.command("formats")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--format", "formats", multiple=True, type=click.Choice(FORMAT_NAMES),
              help="A format to include (repeatable) [default: every format; tensorrt shows why "
                   "it is skipped on a machine without CUDA].")
@click.option("--batch", type=click.IntRange(min=1), default=32, show_default=True,
              help="Batch size for the throughput column.")
@click.option("--iterations", type=click.IntRange(min=10), default=300, show_default=True,
              help="Batch-1 runs per format (fewer if --seconds runs out first).")
@click.option("--seconds", type=float, default=8.0, show_default=True,
              help="Time budget per format and measurement.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Intra-op threads for every format [default: all cores].")
@click.option("--out", type=click.Path(path_type=Path), default="bench", show_default=True,
              help="Folder for NAME-formats.md, .csv and .png.")
@json_option
@friendly_errors
def bench_formats_command(model_dir: Path, formats: tuple[str, ...], batch: int, iterations: int,
                          seconds: float, threads: int | None, out: Path, as_json: bool) -> None:
    """One row per serving format of MODEL_DIR's model: accuracy, latency, throughput, size, memory.

    Everything is measured in one run on the same inputs, each format in its own process after a
    warm-up, with the speedup against eager PyTorch measured the same way.
    """
    from servetool.bench.formats import DEFAULT_FORMATS, bench_formats, markdown_table, write_outputs
    from servetool.spec import load_spec

    spec = load_spec(model_dir)
    result = bench_formats(spec, list(formats) or DEFAULT_FORMATS, batch=batch,
                           iterations=iterations, seconds=seconds, threads=threads,
                           progress=progress)
    result["files"] = write_outputs(result, out)
    text = markdown_table(result) + "\nWritten: " + ", ".join(result["files"].values())
    emit(result, as_json, text)


@bench.command("serve")
@click.argument("model")
@click.option("--payload", "payloads", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="A request body file or a folder of them (repeatable) "
                   "[default: models/MODEL/samples].")
@click.option("--concurrency", "-c", type=click.IntRange(min=1), default=8, show_default=True,
              help="Clients, each sending its next request when its last one is answered.")
@click.option("--duration", type=float, default=20.0, show_default=True, help="Seconds to run.")
@click.option("--requests", "count", type=click.IntRange(min=1), default=None,
              help="Send exactly this many requests instead of running for --duration.")
@click.option("--engine", type=click.Choice(["auto", "wrk", "python"]), default="auto",
              show_default=True,
              help="auto: wrk when installed (least CPU), Python when not or with --requests.")
@click.option("--version", "model_version", default=None, help="A model version.")
@click.option("--out", type=click.Path(path_type=Path), default="bench", show_default=True)
@server_options
@json_option
@friendly_errors
def bench_serve_command(model: str, payloads: tuple[Path, ...], concurrency: int, duration: float,
                        count: int | None, engine: str, model_version: str | None, out: Path,
                        run_dir: Path, model_store: Path, target: str, as_json: bool) -> None:
    """Load-test a deployed MODEL: throughput, p50/p90/p99 latency, errors by status, lost requests."""
    from servetool.bench.serve import (
        load_payloads,
        markdown,
        payload_files,
        run_load,
        run_wrk,
        write_outputs,
        wrk_path,
    )

    check_model_args(model, model_version)
    target = make_target(run_dir, model_store, target)
    client = target.client()
    if not client.has_model(model):
        raise ServetoolError(f"no model {model!r} is registered (see `servetool status`)")
    sources = list(payloads) or [Path("models") / model / "samples"]
    if not all(p.exists() for p in sources):
        raise ServetoolError(f"no payloads: pass --payload FILE_OR_FOLDER ({sources[0]} does not exist)")
    token = client.token("inference")
    url = f"{client.state.url('inference')}/predictions{model_path(model, model_version)}"
    if engine == "wrk" and (count or not wrk_path()):
        raise ServetoolError("--engine wrk needs wrk installed (apt-get install wrk) and runs "
                             "for --duration, not --requests")
    use_wrk = engine == "wrk" or (engine == "auto" and not count and wrk_path() is not None)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    progress(f"{concurrency} clients on {url} for "
             + (f"{count} requests" if count else f"{duration:.0f} s")
             + f" ({'wrk' if use_wrk else 'Python'} engine)")
    if use_wrk:
        result = run_wrk(url, payload_files(sources), concurrency=concurrency,
                         duration_s=duration, headers=headers)
    else:
        result = run_load(url, load_payloads(sources), concurrency=concurrency,
                          duration_s=None if count else duration, requests=count,
                          headers=headers, progress=progress)
    summary = result.summary()
    summary["files"] = write_outputs(result, out, f"{model}-serve")
    emit(summary, as_json, markdown(summary) + "\nWritten: " + ", ".join(summary["files"].values()))


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
