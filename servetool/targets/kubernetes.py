"""The Kubernetes target: render the manifests, and with a kubeconfig apply them (server-side apply),
wait for the rollout, and scale pods (replicas) or TorchServe workers in every pod.

Nothing here runs without a cluster except rendering (`--dry-run`); commands that need one say so
in one line when no kubeconfig is given, instead of falling back to whatever `localhost:8080` is.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from servetool.engines.torchserve import split_runtime
from servetool.errors import ServetoolError, first_line
from servetool.targets import image, kubecheck, manifests
from servetool.targets.common import find_archives

FIELD_MANAGER = "servetool"
POD_HELPER = ["python3", "/opt/servetool/servetool_pod.py"]


class KubeError(ServetoolError):
    pass


def object_names(objs: list[dict[str, Any]]) -> list[str]:
    return [f"{o['kind']}/{o['metadata']['name']}" for o in objs]


class KubernetesTarget:
    name = "kubernetes"

    def __init__(self, out_dir: Path, kubeconfig: Path | None = None, context: str | None = None,
                 progress: Callable[[str], None] = lambda _: None) -> None:
        self.out_dir = out_dir
        self.kubeconfig = kubeconfig
        self.context = context
        self.progress = progress
        self._api: Any = None

    # --- the cluster -----------------------------------------------------------------------------
    def api(self) -> Any:
        if self._api is not None:
            return self._api
        if self.kubeconfig is None:
            raise KubeError("no kubeconfig given: pass --kubeconfig FILE (or set KUBECONFIG) to reach "
                            "a cluster (`deploy --dry-run` renders the manifests without one)")
        if not self.kubeconfig.is_file():
            raise KubeError(f"kubeconfig {self.kubeconfig} does not exist")
        from kubernetes import config

        try:
            self._api = config.new_client_from_config(str(self.kubeconfig), context=self.context,
                                                      persist_config=False)
        except Exception as exc:
            raise KubeError(f"cannot load kubeconfig {self.kubeconfig}: {first_line(exc)}") from None
        return self._api

    def _call(self, what: str, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            return func(*args, **kwargs)
        except ApiException as exc:
            detail = exc.reason
            try:
                detail = json.loads(exc.body).get("message", detail)
            except (TypeError, ValueError):
                pass
            raise KubeError(f"{what}: the cluster answered {exc.status}: {detail}") from None
        except Exception as exc:  # connection refused, TLS, DNS: one line
            raise KubeError(f"{what}: cannot reach the cluster ({first_line(exc)})") from None

    # --- deploy ----------------------------------------------------------------------------------
    def deploy(self, opts: manifests.KubeOptions, archives: list[Path], dry_run: bool,
               timeout_s: float = 600) -> dict[str, Any]:
        rendered = manifests.write(opts, archives, self.out_dir)
        objs = manifests.objects(opts, archives, rendered["key"])
        # what the user owns in the cluster: a claim with the archives, the watcher's credentials
        external = ((f"PersistentVolumeClaim/{opts.models_pvc}",) if opts.models_pvc else ()) + \
            ((f"Secret/{opts.watch.secret}",) if opts.watch and opts.watch.secret else ())
        if found := kubecheck.problems(objs, external):
            raise KubeError("the rendered manifests are inconsistent: " + "; ".join(found))
        result = {"target": self.name, "dry_run": dry_run, "folder": rendered["folder"],
                  "overlay": rendered["overlay"], "image": opts.image, "namespace": opts.namespace,
                  "objects": object_names(objs), "token_auth": opts.token_auth,
                  "models": [p.stem for p in archives],
                  "apply_with": f"kubectl apply --server-side -k {rendered['overlay']}"}
        if dry_run:
            return result
        self._apply(objs)
        deployment = next(o for o in objs if o["kind"] == "Deployment")
        result["rollout"] = self.wait_rollout(opts.namespace, deployment["metadata"]["name"],
                                              timeout_s, at_least=opts.min_replicas)
        return result

    def deploy_kserve(self, opts: manifests.KubeOptions, archives: list[Path], dry_run: bool
                      ) -> dict[str, Any]:
        """The KServe engine's InferenceService (RawDeployment) and its key's Secret, written to
        OUT/kserve/NAME/ and, unless a dry run, applied. KServe's controller then makes the
        Deployment, Service and autoscaler."""
        import secrets

        from servetool.engines.kserve import manifest

        folder = (self.out_dir / "kserve" / opts.name).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        service = manifest.inference_service(
            opts.name, opts.namespace, opts.image, min_replicas=opts.min_replicas,
            max_replicas=opts.max_replicas, cpu=opts.cpu_request,
            memory_request=opts.memory_request, memory_limit=opts.memory_limit,
            token_auth=opts.token_auth, target_cpu_percent=opts.target_cpu_percent)
        if found := manifest.check(service):
            raise KubeError("the rendered InferenceService is inconsistent: " + "; ".join(found))
        objs = [service]
        secret_path = folder / "secret.yaml"
        if opts.token_auth:
            try:
                key = yaml.safe_load(secret_path.read_text())["stringData"]["key"]
            except (OSError, KeyError, TypeError, yaml.YAMLError):
                key = secrets.token_urlsafe(32)  # kept across renders: clients keep working
            objs.insert(0, manifest.key_secret(opts.name, opts.namespace, key))
            secret_path.write_text(yaml.safe_dump(objs[0], sort_keys=False))
            secret_path.chmod(0o600)
        (folder / "inferenceservice.yaml").write_text(yaml.safe_dump(service, sort_keys=False))
        result = {"target": self.name, "engine": "kserve", "dry_run": dry_run,
                  "folder": str(folder), "overlay": str(folder), "image": opts.image,
                  "namespace": opts.namespace, "objects": object_names(objs),
                  "token_auth": opts.token_auth, "models": [p.stem for p in archives],
                  "apply_with": f"kubectl apply --server-side -f {folder}"}
        if dry_run:
            return result
        self._apply(objs, " (is KServe installed in the cluster?)")
        return result

    def _apply(self, objs: list[dict[str, Any]], missing_hint: str = "") -> None:
        """Server-side apply of each object, in order; `missing_hint` says what a kind the
        cluster does not know means."""
        from kubernetes import dynamic

        dyn = dynamic.DynamicClient(self.api())
        for obj in objs:
            self.progress(f"applying {obj['kind']}/{obj['metadata']['name']}")
            resource = self._call(f"looking up {obj['kind']}{missing_hint}", dyn.resources.get,
                                  api_version=obj["apiVersion"], kind=obj["kind"])
            self._call(f"applying {obj['kind']}/{obj['metadata']['name']}", dyn.server_side_apply,
                       resource, body=obj, name=obj["metadata"]["name"],
                       namespace=obj["metadata"]["namespace"], field_manager=FIELD_MANAGER,
                       force_conflicts=True)

    def wait_rollout(self, namespace: str, name: str, timeout_s: float,
                     at_least: int = 1) -> dict[str, Any]:
        """Until every pod runs the current template and at least `at_least` are available (the
        autoscaler raises a new Deployment from one pod to its minimum)."""
        from kubernetes import client

        apps = client.AppsV1Api(self.api())
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            dep = self._call(f"reading Deployment/{name}", apps.read_namespaced_deployment, name,
                             namespace)
            want, status = max(dep.spec.replicas or 0, at_least), dep.status
            updated, available = status.updated_replicas or 0, status.available_replicas or 0
            done = (status.observed_generation or 0) >= dep.metadata.generation and \
                updated >= want and available >= want and (status.replicas or 0) == updated
            last = f"{updated}/{want} updated, {available} available"
            if done:
                return {"replicas": status.replicas, "available": available}
            self.progress(f"rollout of {name}: {last}")
            time.sleep(3)
        raise KubeError(f"rollout of Deployment/{name} not finished within {timeout_s:.0f} s ({last}); "
                        f"see `kubectl -n {namespace} describe deployment {name}`")

    # --- operate ---------------------------------------------------------------------------------
    def pods(self, namespace: str, name: str) -> list[Any]:
        from kubernetes import client

        core = client.CoreV1Api(self.api())
        selector = f"app.kubernetes.io/name=servetool,app.kubernetes.io/instance={name}"
        found = self._call("listing pods", core.list_namespaced_pod, namespace,
                           label_selector=selector)
        return [p for p in found.items if p.status.phase == "Running"]

    def scale_replicas(self, namespace: str, name: str, replicas: int) -> dict[str, Any]:
        """The autoscaler's minimum is what holds: raise (or lower) it, and its maximum with it
        when needed; the Deployment's count is set too, so that it does not wait for the HPA."""
        from kubernetes import client

        full = f"{name}-{manifests.BASE_NAME}"
        auto = client.AutoscalingV2Api(self.api())
        hpa = self._call(f"reading HorizontalPodAutoscaler/{full}",
                         auto.read_namespaced_horizontal_pod_autoscaler, full, namespace)
        patch = {"spec": {"minReplicas": replicas,
                          "maxReplicas": max(replicas, hpa.spec.max_replicas)}}
        self._call("patching the autoscaler", auto.patch_namespaced_horizontal_pod_autoscaler,
                   full, namespace, patch)
        apps = client.AppsV1Api(self.api())
        self._call("scaling the Deployment", apps.patch_namespaced_deployment_scale, full, namespace,
                   {"spec": {"replicas": replicas}})
        return {"deployment": full, "replicas": replicas,
                "rollout": self.wait_rollout(namespace, full, 600, at_least=replicas)}

    def scale_workers(self, namespace: str, name: str, model: str, workers: int) -> dict[str, Any]:
        """Every running pod through its own management API (an exec of the in-pod helper), and
        the ConfigMap, so that pods started later come up with the same count."""
        from kubernetes import client
        from kubernetes.stream import stream

        core = client.CoreV1Api(self.api())
        full = f"{name}-{manifests.BASE_NAME}"
        cm = self._call(f"reading ConfigMap/{full}", core.read_namespaced_config_map, full, namespace)
        props = cm.data["config.properties"]
        updated = set_workers(props, model, workers)
        self._call("patching the ConfigMap", core.patch_namespaced_config_map, full, namespace,
                   {"data": {"config.properties": updated}})
        results = []
        for pod in self.pods(namespace, name):
            out = self._call(f"exec in {pod.metadata.name}", stream,
                             core.connect_get_namespaced_pod_exec, pod.metadata.name, namespace,
                             container="torchserve", command=[*POD_HELPER, "scale", model, str(workers)],
                             stderr=True, stdin=False, stdout=True, tty=False)
            answer = str(out).strip()
            results.append({"pod": pod.metadata.name, "ok": "Workers scaled" in answer,
                            "answer": answer[:300]})
        failed = [r for r in results if not r["ok"]]
        if failed:
            raise KubeError(f"scaling {model} failed in {len(failed)} of {len(results)} pods: "
                            + "; ".join(f"{r['pod']}: {r['answer']}" for r in failed))
        return {"model": model, "workers": workers, "pods": results}

    def set_canary(self, namespace: str, name: str, model: str, version: str | None,
                   weight: int) -> dict[str, Any]:
        """MODEL's canary weight for every pod: the canary ConfigMap, which each pod's split reads
        again every few seconds once the kubelet has updated its mount (up to a minute or so).
        VERSION None: the version the ConfigMap names (an abort)."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        if not split_runtime.NAME.match(model) or \
                (version is not None and not split_runtime.NAME.match(version)):
            raise KubeError(f"not a model name and version: {model!r} {version!r}")
        core = client.CoreV1Api(self.api())
        opts = manifests.KubeOptions(name=name, image="", namespace=namespace)
        cm_name = opts.canary_config_map
        try:
            found = core.read_namespaced_config_map(cm_name, namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise KubeError(f"reading ConfigMap/{cm_name}: the cluster answered {exc.status}: "
                                f"{exc.reason}") from None
            found = None
        except Exception as exc:
            raise KubeError(f"reading ConfigMap/{cm_name}: cannot reach the cluster "
                            f"({first_line(exc)})") from None
        weights = json.loads(((found.data or {}) if found else {}).get(manifests.CANARY_FILE) or "{}")
        version = version or weights.get(model, {}).get("version")
        if version is None:
            raise KubeError(f"no canary of {model} in {cm_name} to abort")
        weights[model] = {"version": version, "weight": weight}
        body = manifests.canary_config_map(opts, weights)
        if found is None:
            self._call(f"creating ConfigMap/{cm_name}", core.create_namespaced_config_map,
                       namespace, body)
        else:
            self._call(f"writing ConfigMap/{cm_name}", core.patch_namespaced_config_map, cm_name,
                       namespace, body)
        return {"model": model, "candidate": version, "weight": weight, "config_map": cm_name,
                "status": "manual", "reason": "every pod applies it once its mount updates"}

    def status(self, namespace: str, name: str) -> dict[str, Any]:
        pods = self.pods(namespace, name)
        return {"target": self.name, "namespace": namespace, "deployment": name,
                "pods": [{"name": p.metadata.name, "ready": all(c.ready for c in
                                                                (p.status.container_statuses or []))}
                         for p in pods]}


@dataclass
class KubeRequest:
    models: tuple[str, ...]
    model_store: Path
    base_config: Path | None
    name: str | None
    namespace: str
    image: str | None
    replicas: int
    max_replicas: int
    cpu: str
    memory: str
    models_pvc: str | None
    token_auth: bool
    dry_run: bool
    timeout_s: float
    watch: manifests.WatchSpec | None = None
    split: bool = False
    engine: str = "torchserve"


def default_name(archives: list[Path]) -> str:
    name = "-".join(sorted(p.stem for p in archives)).lower()
    name = re.sub(r"[^a-z0-9-]+", "-", name).strip("-")[:40].strip("-")
    return name or "models"


def deploy_kubernetes(req: KubeRequest, target: KubernetesTarget) -> dict[str, Any]:
    """Render (and, unless a dry run, apply) the manifests for these archives."""
    archives = find_archives(req.models, req.model_store)
    if req.image is None:
        # The same tag `deploy --target docker` builds for these archives (context under deploy/).
        opts = image.ImageOptions(model_store=req.model_store, base_config=req.base_config,
                                  bake_models=req.models_pvc is None, ca_certs=[],
                                  with_watcher=req.watch is not None, with_split=req.split,
                                  engine=req.engine)
        req.image = image.render_tagged(opts, archives)[1]
    memory = parse_memory(req.memory)
    opts = manifests.KubeOptions(
        name=req.name or default_name(archives), image=req.image, namespace=req.namespace,
        min_replicas=req.replicas,
        max_replicas=max(req.max_replicas, req.replicas), cpu_request=req.cpu,
        memory_request=f"{memory // 2}Mi", memory_limit=f"{memory}Mi",
        token_auth=req.token_auth, models_pvc=req.models_pvc, base_config=req.base_config,
        watch=req.watch, split=req.split)
    if req.engine == "kserve":
        if req.watch is not None or req.split or req.models_pvc is not None:
            raise KubeError("--engine kserve on kubernetes bakes the archives into its image: no "
                            "--watch, --split or --models-pvc yet (TorchServe's pods have them)")
        opts.check()
        result = target.deploy_kserve(opts, archives, req.dry_run)
    else:
        result = target.deploy(opts, archives, req.dry_run, req.timeout_s)
    result["name"] = opts.name
    return result


def parse_memory(text: str) -> int:
    """'2Gi' / '1536Mi' -> MiB; anything else is a clear error."""
    match = re.fullmatch(r"(\d+)(Mi|Gi)", text.strip())
    if not match or int(match.group(1)) == 0:
        raise KubeError(f"--memory {text!r}: give a size like 1536Mi or 2Gi")
    return int(match.group(1)) * (1024 if match.group(2) == "Gi" else 1)


def set_workers(properties: str, model: str, workers: int) -> str:
    """config.properties with MODEL's min/max workers set in its `models=` JSON."""
    lines = properties.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("models="):
            models = json.loads(line[len("models="):])
            if model not in models:
                raise KubeError(f"no model {model!r} in this deployment (it has: "
                                f"{', '.join(sorted(models))})")
            for version in models[model].values():
                version["minWorkers"] = workers
                version["maxWorkers"] = workers
            lines[i] = "models=" + json.dumps(models, sort_keys=True)
            return "\n".join(lines) + "\n"
    raise KubeError("the ConfigMap's config.properties has no models= line (not rendered by servetool?)")

