"""What every command group shares: the group itself, option sets, output, error handling and
the choice of target."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any

import click

from servetool import __version__
from servetool.engines.torchserve.management import check_name, check_version
from servetool.engines.torchserve.process import ServerOptions
from servetool.errors import ServetoolError
from servetool.model.formats import FORMATS

RUN_DIR_DEFAULT = ".servetool"
FORMAT_NAMES = list(FORMATS)


def echo_stderr(message: str) -> None:
    click.echo(message, err=True)


def progress(message: str) -> None:
    """Progress goes to stderr so that --json output on stdout stays parseable."""
    echo_stderr(f"... {message}")


def friendly_errors(func):
    """Expected failures become one message and exit 1; never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ServetoolError as exc:
            echo_stderr(f"error: {exc}")
            sys.exit(1)
        except KeyboardInterrupt:
            echo_stderr("interrupted")
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
    # the crash supervisor, the watcher and a canary's controller: started and stopped around the
    # target's verbs, reported by its status
    from servetool.operate.companions import COMPANIONS

    if target == "docker":
        from servetool.targets.docker import DockerTarget

        opts = ServerOptions(run_dir=run_dir / "docker", model_store=model_store, **kwargs)
        return DockerTarget(opts, docker_opts, progress, COMPANIONS)
    from servetool.targets.local import LocalTarget

    return LocalTarget(ServerOptions(run_dir=run_dir, model_store=model_store, **kwargs), progress,
                       COMPANIONS)


def server_setting(state: Any, key: str) -> str | None:
    """A setting of the server's rendered config.properties (local target), if it says one."""
    from servetool.engines.torchserve.process import read_properties

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
