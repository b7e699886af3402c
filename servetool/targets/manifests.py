"""Kubernetes manifests for a deployment: a kustomize base (generic) plus one overlay per deployment.

Design (why it looks like this):
- Every replica serves every model, also pods the autoscaler adds later: models load at pod start
  (`load_models` + per-model workers in the ConfigMap's config.properties), never by API calls to one
  pod. The model API is off in pods.
- TorchServe 0.12 makes new random keys at every start and cannot be given one, so replicas cannot
  share its keys. Each pod therefore runs servetool's gateway beside TorchServe: it checks the one
  key every replica shares (from a Secret) and forwards to its own TorchServe with that pod's key.
  TorchServe keeps its token check, bound to 127.0.0.1. `token_auth=False` (an explicit flag) drops
  the gateway and the Secret and serves TorchServe itself without tokens.
- Probes: the gateway answers /healthz and /readyz (ready = TorchServe healthy and every model has
  a READY worker) without a token; TorchServe's liveness is its token-free metrics port. Without the
  gateway, readiness is an exec probe that reads the pod's own key file.
- Management listens on 127.0.0.1 in the pod: reachable by `kubectl port-forward` or `kubectl exec`,
  not through the Service (inference only) nor from other pods.

`objects()` is the source of truth (what servetool applies); `write()` lays the same objects out as
kustomize files, and the tests check that `kubectl kustomize` of the overlay equals `objects()`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from servetool.engines.torchserve import archive, process, split
from servetool.errors import ServetoolError
from servetool.targets import image

BASE_NAME = "servetool"
BASE_IMAGE_NAME = "servetool"
CONFIG_DIR = "/etc/servetool/config"
KEYS_DIR = "/etc/servetool/keys"
POD_PORTS = {"http": 8080, "management": 8081, "metrics": 8082, "torchserve": 8085,
             "grpc_inference": 7070, "grpc_management": 7071,
             # the canary split (--split): TorchServe moves behind HAProxy to "upstream"
             "upstream": 8086, "split_exporter": 8087, "split_metrics": 8088}
CANARY_DIR = "/etc/servetool/canary"
CANARY_FILE = "weights.json"
NAME_RE = re.compile(r"\A[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")


class ManifestError(ServetoolError):
    pass


@dataclass
class WatchSpec:
    """Every pod follows one source with a watcher container of its own (servetool/operate/pod_watch.py)."""

    source: str
    endpoint_url: str | None = None
    secret: str | None = None  # a Secret whose keys (AWS_ACCESS_KEY_ID, ...) become the env
    interval_s: float | None = None
    keep: int | None = None


@dataclass
class KubeOptions:
    name: str
    image: str
    namespace: str = "default"
    min_replicas: int = 2
    max_replicas: int = 5
    target_cpu_percent: int = 70
    cpu_request: str = "1"
    memory_request: str = "1024Mi"
    memory_limit: str = "2048Mi"
    token_auth: bool = True
    models_pvc: str | None = None  # mount this PersistentVolumeClaim as the model store
    workers: dict[str, int] = field(default_factory=dict)  # per model; default: the archive's, or 1
    base_config: Path | None = None
    watch: WatchSpec | None = None
    split: bool = False  # HAProxy in every pod, its weights from the canary ConfigMap

    @property
    def canary_config_map(self) -> str:
        """Written by `servetool canary --target kubernetes`, not by deploy (a deploy must not
        reset a canary); the pods mount it as optional."""
        return f"{self.name}-{BASE_NAME}-canary"

    def check(self) -> None:
        if not NAME_RE.match(self.name) or len(self.name) > 40:
            raise ManifestError(f"deployment name {self.name!r} must be a DNS label (lowercase "
                                "letters, digits, '-'; at most 40 characters)")
        if not NAME_RE.match(self.namespace):
            raise ManifestError(f"namespace {self.namespace!r} is not a valid name")
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ManifestError(f"replicas: need 1 <= min ({self.min_replicas}) <= max "
                                f"({self.max_replicas})")
        cpu_cores(self.cpu_request)
        if self.models_pvc is not None and not NAME_RE.match(self.models_pvc):
            raise ManifestError(f"--models-pvc {self.models_pvc!r} is not a valid claim name")
        if self.watch is not None:
            if self.models_pvc is not None:
                raise ManifestError("--watch needs the pods' own writable model store (the watcher "
                                    "adds versions to it); it does not combine with --models-pvc")
            if self.watch.secret is not None and not NAME_RE.match(self.watch.secret):
                raise ManifestError(f"--watch-secret {self.watch.secret!r} is not a valid name")


# --- the generic base ---------------------------------------------------------------------------
def _labels(component: str | None = None) -> dict[str, str]:
    labels = {"app.kubernetes.io/name": "servetool", "app.kubernetes.io/managed-by": "servetool"}
    if component:
        labels["app.kubernetes.io/component"] = component
    return labels


SELECTOR = {"app.kubernetes.io/name": "servetool"}


def _security() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}


def _container(command: str, env: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    """One container of the pod: servetool's image running one command of its helper, with the
    pods' config and the common security settings."""
    config_env = {"name": "SERVETOOL_TS_CONFIG", "value": f"{CONFIG_DIR}/config.properties"}
    return {"name": command, "image": BASE_IMAGE_NAME, "imagePullPolicy": "IfNotPresent",
            "args": [command], "env": [config_env, *env], **spec, "securityContext": _security()}


def _torchserve_container() -> dict[str, Any]:
    # SERVETOOL_CPUS: the handlers size their threads by the CPU request (rounded up), not by the
    # node's cores, which a container sees all of.
    return _container(
        "torchserve",
        env=[{"name": "SERVETOOL_CPUS", "valueFrom": {"resourceFieldRef": {
            "containerName": "torchserve", "resource": "requests.cpu", "divisor": "1"}}}],
        ports=[{"name": "metrics", "containerPort": POD_PORTS["metrics"], "protocol": "TCP"}],
        resources={"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
        # The metrics port needs no token: it says the frontend is up (models may still load).
        startupProbe={"httpGet": {"path": "/metrics", "port": "metrics"}, "periodSeconds": 5,
                      "failureThreshold": 60},
        livenessProbe={"httpGet": {"path": "/metrics", "port": "metrics"}, "periodSeconds": 20,
                       "timeoutSeconds": 5, "failureThreshold": 3},
        volumeMounts=[{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                      {"name": "work", "mountPath": image.CONTAINER_WORK},
                      {"name": "tmp", "mountPath": "/tmp"}])


def _gateway_container() -> dict[str, Any]:
    return _container(
        "gateway",
        env=[{"name": "SERVETOOL_GATEWAY_LISTEN", "value": f"0.0.0.0:{POD_PORTS['http']}"},
             {"name": "SERVETOOL_GATEWAY_KEYS", "value": KEYS_DIR}],
        ports=[{"name": "http", "containerPort": POD_PORTS["http"], "protocol": "TCP"}],
        resources={"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
        readinessProbe={"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5,
                        "timeoutSeconds": 5, "failureThreshold": 2},
        livenessProbe={"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 20,
                       "timeoutSeconds": 5, "failureThreshold": 3},
        volumeMounts=[{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                      {"name": "work", "mountPath": image.CONTAINER_WORK, "readOnly": True},
                      {"name": "keys", "mountPath": KEYS_DIR, "readOnly": True},
                      {"name": "tmp", "mountPath": "/tmp"}])


def base_objects() -> list[dict[str, Any]]:
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": BASE_NAME, "labels": _labels("inference")},
        # No spec.replicas: the autoscaler owns the count. Re-applying a fixed count (server-side
        # apply takes the field back) would reset it on every deploy and fight the autoscaler.
        "spec": {
            "selector": {"matchLabels": dict(SELECTOR)},
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {
                    "labels": _labels("inference"),
                    "annotations": {"prometheus.io/scrape": "true",
                                    "prometheus.io/port": str(POD_PORTS["metrics"]),
                                    "prometheus.io/path": "/metrics"},
                },
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "terminationGracePeriodSeconds": 30,
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000,
                                        "fsGroup": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [_torchserve_container(), _gateway_container()],
                    "volumes": [
                        {"name": "config", "configMap": {"name": BASE_NAME}},
                        {"name": "work", "emptyDir": {"sizeLimit": "2Gi"}},
                        {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
                        {"name": "keys", "secret": {"secretName": f"{BASE_NAME}-keys",
                                                    "defaultMode": 0o440}},
                    ],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": BASE_NAME, "labels": _labels("inference")},
        "spec": {"type": "ClusterIP", "selector": dict(SELECTOR),
                 "ports": [{"name": "http", "port": POD_PORTS["http"], "targetPort": "http",
                            "protocol": "TCP"}]},
    }
    hpa = {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": BASE_NAME, "labels": _labels("inference")},
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": BASE_NAME},
                 "minReplicas": 2, "maxReplicas": 5,
                 "metrics": [{"type": "Resource", "resource": {
                     "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}]},
    }
    pdb = {
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": BASE_NAME, "labels": _labels("inference")},
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": dict(SELECTOR)}},
    }
    config = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": BASE_NAME, "labels": _labels("config")},
        "data": {"config.properties": "# replaced by each overlay\n"},
    }
    return [config, deployment, service, hpa, pdb]


# --- per deployment -----------------------------------------------------------------------------
def pod_properties(opts: KubeOptions, archives: list[Path]) -> str:
    """config.properties for the pods: models loaded at start with their workers, model API off."""
    base = process.read_properties(opts.base_config) if opts.base_config else {}
    ports = {"inference": POD_PORTS["torchserve"] if opts.token_auth else POD_PORTS["http"],
             "management": POD_PORTS["management"], "metrics": POD_PORTS["metrics"],
             "grpc_inference": POD_PORTS["grpc_inference"],
             "grpc_management": POD_PORTS["grpc_management"]}
    # A watching pod registers versions: through the management front, which admits only archives
    # of the model store (servetool/engines/torchserve/pod.py), with TorchServe's own API on a Unix socket.
    props = process.server_properties(base, "127.0.0.1", ports, image.CONTAINER_STORE,
                                         "/opt/servetool/log4j2.xml",
                                         image.CONTAINER_SOCKET if opts.watch else None,
                                         sizes=archive.archive_sizes(archives),
                                         metrics_config=image.CONTAINER_METRICS_CONFIG)
    bind_all = "0.0.0.0"
    props["metrics_address"] = f"http://{bind_all}:{POD_PORTS['metrics']}"
    if not opts.token_auth:
        props["inference_address"] = f"http://{bind_all}:{POD_PORTS['http']}"
        props["disable_token_authorization"] = "true"
    else:
        props.pop("disable_token_authorization", None)
    if opts.split:  # HAProxy takes TorchServe's place; TorchServe listens behind it
        props["inference_address"] = f"http://127.0.0.1:{POD_PORTS['upstream']}"
    props["enable_model_api"] = "true" if opts.watch else "false"
    props["enable_envvars_config"] = "false"
    models: dict[str, Any] = {}
    for path in archives:
        contents = archive.archive_manifest(path)
        meta = contents["manifest"]["model"]
        config = contents["config"]
        # Workers left on auto: one per requested core, as the local target does per core.
        workers = opts.workers.get(meta["modelName"]) or int(config.get("minWorkers") or
                                                             cpu_cores(opts.cpu_request))
        models[meta["modelName"]] = {meta["modelVersion"]: {
            "defaultVersion": True, "marName": path.name, "minWorkers": workers,
            "maxWorkers": max(workers, int(config.get("maxWorkers") or workers)),
            "batchSize": int(config.get("batchSize", 1)),
            "maxBatchDelay": int(config.get("maxBatchDelay", 100)),
            "responseTimeout": int(config.get("responseTimeout", 120))}}
    props["load_models"] = ",".join(p.name for p in archives)
    props["models"] = json.dumps(models, sort_keys=True)
    return process.format_properties(
        props, "Rendered by servetool for Kubernetes pods: models load at start (load_models, "
               "models); the model API is off"
               + (", except through the front, for the pod's watcher." if opts.watch else "."))


def cpu_cores(quantity: str) -> int:
    """A CPU quantity ("1", "2.5", "500m") as whole cores, rounded up (at least one)."""
    text = quantity.strip()
    try:
        value = float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        raise ManifestError(f"CPU request {quantity!r} is not a quantity like 1, 2.5 or 500m") from None
    if value <= 0:
        raise ManifestError(f"CPU request {quantity!r} must be positive")
    return max(1, -int(-value // 1))


def split_image(ref: str) -> tuple[str, str]:
    """'registry:5000/name:tag' -> ('registry:5000/name', 'tag'); a digest stays with the name."""
    if "@" in ref:
        return ref, ""
    name, _, tag = ref.rpartition(":")
    if not name or "/" in tag:
        return ref, "latest"
    return name, tag


def overlay(opts: KubeOptions, archives: list[Path]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The overlay's kustomization and its JSON patches (per target object)."""
    props = pod_properties(opts, archives)
    new_name, new_tag = split_image(opts.image)
    images = {"name": BASE_IMAGE_NAME, "newName": new_name}
    if new_tag:
        images["newTag"] = new_tag
    checksum = hashlib.sha256(props.encode()).hexdigest()[:16]
    deploy_ops: list[dict[str, Any]] = [
        {"op": "replace", "path": "/spec/template/spec/containers/0/resources",
         "value": {"requests": {"cpu": opts.cpu_request, "memory": opts.memory_request},
                   "limits": {"memory": opts.memory_limit}}},
        # A changed config (models, workers) rolls the pods; `servetool scale --workers` patches
        # the ConfigMap alone and reaches the running pods through their management API.
        {"op": "add", "path": "/spec/template/metadata/annotations/servetool.io~1config-checksum",
         "value": checksum},
    ]
    if opts.models_pvc:
        deploy_ops += [
            {"op": "add", "path": "/spec/template/spec/volumes/-",
             "value": {"name": "models", "persistentVolumeClaim": {"claimName": opts.models_pvc,
                                                                   "readOnly": True}}},
            {"op": "add", "path": "/spec/template/spec/containers/0/volumeMounts/-",
             "value": {"name": "models", "mountPath": image.CONTAINER_STORE, "readOnly": True}},
        ]
    if not opts.token_auth:
        deploy_ops += [
            {"op": "remove", "path": "/spec/template/spec/containers/1"},  # the gateway
            {"op": "remove", "path": "/spec/template/spec/volumes/3"},  # the keys Secret
            {"op": "add", "path": "/spec/template/spec/containers/0/ports/-",
             "value": {"name": "http", "containerPort": POD_PORTS["http"], "protocol": "TCP"}},
            {"op": "add", "path": "/spec/template/spec/containers/0/readinessProbe",
             "value": {"exec": {"command": ["python3", "/opt/servetool/servetool_pod.py", "ready"]},
                       "periodSeconds": 5, "timeoutSeconds": 10, "failureThreshold": 2}},
        ]
    if opts.watch:
        deploy_ops += watch_ops(opts.watch, opts.token_auth)
    if opts.split:
        deploy_ops += split_ops(opts)
    patches = [
        {"target": {"kind": "ConfigMap", "name": BASE_NAME},
         "patch": [{"op": "replace", "path": "/data/config.properties", "value": props}]},
        {"target": {"kind": "Deployment", "name": BASE_NAME}, "patch": deploy_ops},
        {"target": {"kind": "HorizontalPodAutoscaler", "name": BASE_NAME},
         "patch": [{"op": "replace", "path": "/spec/minReplicas", "value": opts.min_replicas},
                   {"op": "replace", "path": "/spec/maxReplicas", "value": opts.max_replicas},
                   {"op": "replace", "path": "/spec/metrics/0/resource/target/averageUtilization",
                    "value": opts.target_cpu_percent}]},
    ]
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "namespace": opts.namespace,
        "namePrefix": f"{opts.name}-",
        "labels": [{"pairs": {"app.kubernetes.io/instance": opts.name}, "includeSelectors": True,
                    "includeTemplates": True}],
        "resources": ["../../base"] + (["secret.yaml"] if opts.token_auth else []),
        "images": [images],
        "patches": [{"target": p["target"], "path": f"patch-{p['target']['kind'].lower()}.yaml"}
                    for p in patches],
    }
    return kustomization, patches


WATCH_STATE = f"{image.CONTAINER_WORK}/watch-state.json"
WATCH_METRICS_PORT = 8090
FRONT_LISTEN = f"127.0.0.1:{POD_PORTS['management']}"


def watch_ops(watch: WatchSpec, token_auth: bool) -> list[dict[str, Any]]:
    """The pod's watcher: a writable model store seeded with the image's archives, the watcher
    container, the front for registrations, and readiness that waits for the first check."""
    pod = "/spec/template/spec"
    models = {"name": "models", "mountPath": image.CONTAINER_STORE}
    state_env = {"name": "SERVETOOL_WATCH_STATE", "value": WATCH_STATE}
    seed = _container("seed", env=[], volumeMounts=[{"name": "models", "mountPath": "/seed"}],
                      resources={"requests": {"cpu": "100m", "memory": "64Mi"},
                                 "limits": {"memory": "256Mi"}})
    seed["args"] = ["seed", "/seed"]
    env = [{"name": "SERVETOOL_WATCH_SOURCE", "value": watch.source},
           {"name": "SERVETOOL_FRONT_LISTEN", "value": FRONT_LISTEN},
           {"name": "SERVETOOL_WATCH_METRICS_PORT", "value": str(WATCH_METRICS_PORT)}]
    for name, value in (("SERVETOOL_S3_ENDPOINT_URL", watch.endpoint_url),
                        ("SERVETOOL_WATCH_INTERVAL", watch.interval_s),
                        ("SERVETOOL_WATCH_KEEP", watch.keep)):
        if value is not None:
            env.append({"name": name, "value": str(value)})
    watcher = _container(
        "watch", env=env,
        ports=[{"name": "watch-metrics", "containerPort": WATCH_METRICS_PORT, "protocol": "TCP"}],
        resources={"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
        volumeMounts=[{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                      {"name": "work", "mountPath": image.CONTAINER_WORK}, models,
                      {"name": "tmp", "mountPath": "/tmp"}])
    watcher["name"] = "watcher"
    if watch.secret:  # credentials from a Secret, never in the manifests or the arguments
        watcher["envFrom"] = [{"secretRef": {"name": watch.secret}}]
    ops = [
        {"op": "add", "path": f"{pod}/volumes/-",
         "value": {"name": "models", "emptyDir": {"sizeLimit": "8Gi"}}},
        {"op": "add", "path": f"{pod}/initContainers", "value": [seed]},
        {"op": "add", "path": f"{pod}/containers/0/volumeMounts/-", "value": models},
        {"op": "add", "path": f"{pod}/containers/0/env/-",
         "value": {"name": "SERVETOOL_FRONT_LISTEN", "value": FRONT_LISTEN}},
        {"op": "add", "path": f"{pod}/containers/0/env/-", "value": state_env},
    ]
    if token_auth:  # the gateway's /readyz
        ops.append({"op": "add", "path": f"{pod}/containers/1/env/-", "value": state_env})
    ops.append({"op": "add", "path": f"{pod}/containers/-", "value": watcher})
    return ops


def split_ops(opts: KubeOptions) -> list[dict[str, Any]]:
    """The canary split in the pod: HAProxy and servetool's exporter beside TorchServe in its
    container (split_runtime.py), where the gateway (or, without one, the Service) sends requests;
    the weights come from the canary ConfigMap, which the pod reads again every few seconds."""
    pod = "/spec/template/spec"
    listen = ("127.0.0.1", POD_PORTS["torchserve"]) if opts.token_auth else \
        ("0.0.0.0", POD_PORTS["http"])
    text = split.render_text(split.SplitOptions(
        Path(image.CONTAINER_WORK), listen, ("127.0.0.1", POD_PORTS["upstream"]),
        ("0.0.0.0", POD_PORTS["split_metrics"]), POD_PORTS["split_exporter"]))
    env = {"SERVETOOL_SPLIT_CONFIG_TEXT": text,
           "SERVETOOL_SPLIT_EXPORTER_PORT": str(POD_PORTS["split_exporter"]),
           "SERVETOOL_SPLIT_RUNTIME": image.CONTAINER_SPLIT_RUNTIME,
           "SERVETOOL_SPLIT_WEIGHTS": f"{CANARY_DIR}/{CANARY_FILE}"}
    ops = [{"op": "add", "path": f"{pod}/containers/0/env/-", "value": {"name": k, "value": v}}
           for k, v in env.items()]
    ops += [
        {"op": "add", "path": f"{pod}/containers/0/ports/-",
         "value": {"name": "split-metrics", "containerPort": POD_PORTS["split_metrics"],
                   "protocol": "TCP"}},
        {"op": "add", "path": f"{pod}/volumes/-",
         "value": {"name": "canary", "configMap": {"name": opts.canary_config_map,
                                                   "optional": True}}},
        {"op": "add", "path": f"{pod}/containers/0/volumeMounts/-",
         "value": {"name": "canary", "mountPath": CANARY_DIR, "readOnly": True}},
    ]
    if opts.token_auth:  # the gateway forwards to the split, not to TorchServe itself
        ops.append({"op": "add", "path": f"{pod}/containers/1/env/-", "value": {
            "name": "SERVETOOL_GATEWAY_UPSTREAM", "value": f"127.0.0.1:{POD_PORTS['torchserve']}"}})
    return ops


def canary_config_map(opts: KubeOptions, weights: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The canary ConfigMap: {MODEL: {"version": V, "weight": W}} for every pod's split."""
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": opts.canary_config_map, "namespace": opts.namespace,
                         "labels": {**_labels("canary"), "app.kubernetes.io/instance": opts.name}},
            "data": {CANARY_FILE: json.dumps(weights, sort_keys=True)}}


def secret_object(key: str) -> dict[str, Any]:
    """The shared client key. Written to the overlay (git-ignored, mode 600), never into the base."""
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": f"{BASE_NAME}-keys", "labels": _labels("auth")},
            "stringData": {"inference-key": key}}


# --- what kustomize makes of it -------------------------------------------------------------------
def objects(opts: KubeOptions, archives: list[Path], key: str | None) -> list[dict[str, Any]]:
    """The final objects of the overlay, as `kubectl kustomize` renders them (the tests check)."""
    kustomization, patches = overlay(opts, archives)
    objs = copy.deepcopy(base_objects())
    if opts.token_auth:
        objs.append(secret_object(key or ""))
    for p in patches:
        for obj in objs:
            if obj["kind"] == p["target"]["kind"] and obj["metadata"]["name"] == BASE_NAME:
                json_patch(obj, p["patch"])
    prefix = kustomization["namePrefix"]
    instance = {"app.kubernetes.io/instance": opts.name}
    new_name, new_tag = split_image(opts.image)
    ref = f"{new_name}:{new_tag}" if new_tag else new_name
    for obj in objs:
        obj["metadata"]["name"] = prefix + obj["metadata"]["name"]
        obj["metadata"]["namespace"] = opts.namespace
        obj["metadata"]["labels"] = {**obj["metadata"].get("labels", {}), **instance}
        spec = obj.get("spec", {})
        kind = obj["kind"]
        if kind == "Deployment":
            spec["selector"]["matchLabels"].update(instance)
            pod = spec["template"]
            pod["metadata"]["labels"].update(instance)
            for container in pod["spec"]["containers"] + pod["spec"].get("initContainers", []):
                if container["image"] == BASE_IMAGE_NAME:
                    container["image"] = ref
            for volume in pod["spec"]["volumes"]:
                # kustomize renames references to its own objects only (not the canary's)
                if "configMap" in volume and volume["configMap"]["name"] == BASE_NAME:
                    volume["configMap"]["name"] = prefix + volume["configMap"]["name"]
                if "secret" in volume:
                    volume["secret"]["secretName"] = prefix + volume["secret"]["secretName"]
        elif kind == "Service":
            spec["selector"].update(instance)
        elif kind == "PodDisruptionBudget":
            spec["selector"]["matchLabels"].update(instance)
        elif kind == "HorizontalPodAutoscaler":
            spec["scaleTargetRef"]["name"] = prefix + spec["scaleTargetRef"]["name"]
    return objs


def json_patch(obj: dict[str, Any], ops: list[dict[str, Any]]) -> None:
    """RFC 6902 add/replace/remove, the subset the overlay uses."""
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
        parent: Any = obj
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent.setdefault(part, {})
        last = parts[-1]
        if isinstance(parent, list):
            if op["op"] == "remove":
                parent.pop(int(last))
            elif last == "-":
                parent.append(copy.deepcopy(op["value"]))
            elif op["op"] == "add":
                parent.insert(int(last), copy.deepcopy(op["value"]))
            else:
                parent[int(last)] = copy.deepcopy(op["value"])
        elif op["op"] == "remove":
            del parent[last]
        else:
            parent[last] = copy.deepcopy(op["value"])


# --- files ----------------------------------------------------------------------------------------
def _dump(docs: list[dict[str, Any]] | dict[str, Any]) -> str:
    docs = docs if isinstance(docs, list) else [docs]
    return "---\n".join(yaml.safe_dump(d, sort_keys=False, width=100) for d in docs)


def write(opts: KubeOptions, archives: list[Path], out: Path) -> dict[str, Any]:
    """deploy/kubernetes/{base,overlays/NAME}; the Secret's key is kept across renders."""
    opts.check()
    base_dir, overlay_dir = out / "base", out / "overlays" / opts.name
    base_dir.mkdir(parents=True, exist_ok=True)
    overlay_dir.mkdir(parents=True, exist_ok=True)
    files = []
    names = []
    for obj in base_objects():
        fname = f"{obj['kind'].lower()}.yaml"
        (base_dir / fname).write_text(_dump(obj))
        names.append(fname)
    (base_dir / "kustomization.yaml").write_text(_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": names}))
    files += [str(base_dir / n) for n in ["kustomization.yaml", *names]]
    kustomization, patches = overlay(opts, archives)
    for old in overlay_dir.glob("patch-*.yaml"):
        old.unlink()
    for p, entry in zip(patches, kustomization["patches"], strict=True):
        (overlay_dir / entry["path"]).write_text(yaml.safe_dump(p["patch"], sort_keys=False,
                                                                width=100))
        files.append(str(overlay_dir / entry["path"]))
    key = None
    secret = overlay_dir / "secret.yaml"
    if opts.token_auth:
        key = read_key(overlay_dir) or secrets.token_urlsafe(32)
        secret.write_text(_dump(secret_object(key)))
        secret.chmod(0o600)
        files.append(str(secret))
    else:
        secret.unlink(missing_ok=True)
    (overlay_dir / "kustomization.yaml").write_text(_dump(kustomization))
    files.append(str(overlay_dir / "kustomization.yaml"))
    return {"folder": str(out), "overlay": str(overlay_dir), "files": files, "key": key}


def read_key(overlay_dir: Path) -> str | None:
    try:
        doc = yaml.safe_load((overlay_dir / "secret.yaml").read_text())
        return doc["stringData"]["inference-key"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return None
