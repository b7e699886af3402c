"""The KServe engine on Kubernetes: a KServe `InferenceService` (v1beta1) whose predictor runs
servetool's KServe-engine image (Dockerfile.kserve), in KServe's RawDeployment mode (a plain
Deployment, Service and HorizontalPodAutoscaler: no Knative, no Istio needed).

Every pod loads every archive of its image at start (SERVETOOL_KSERVE_LOAD_MODELS=all) before it
opens its port, so the readiness probe holds traffic back until the models answer. Token auth
stays on: one key, from a Secret, for inference and management, as on the TorchServe pods.

No cluster runs here: the InferenceService is checked structurally (check()), and its predictor's
pod spec strictly against the official Kubernetes schemas by the tests (as a Pod: KServe inlines
core/v1 PodSpec fields into the predictor).
"""

from __future__ import annotations

from typing import Any

from servetool.errors import ServetoolError

API_VERSION = "serving.kserve.io/v1beta1"
CONTAINER = "kserve-container"  # the name KServe expects for a custom predictor's container
PORT = 8080
METRICS_PORT = 8082
# The predictor's own fields beside the inlined PodSpec (ComponentExtensionSpec).
EXTENSION_FIELDS = ("minReplicas", "maxReplicas", "scaleTarget", "scaleMetric",
                    "containerConcurrency", "timeout", "canaryTrafficPercent", "logger", "batcher",
                    "labels", "annotations", "deploymentStrategy")


class ManifestError(ServetoolError):
    pass


def key_secret(name: str, namespace: str, key: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": f"{name}-key", "namespace": namespace,
                         "labels": {"app.kubernetes.io/managed-by": "servetool"}},
            "stringData": {"key": key}}


def inference_service(name: str, namespace: str, image: str, *, min_replicas: int,
                      max_replicas: int, cpu: str, memory_request: str, memory_limit: str,
                      token_auth: bool, target_cpu_percent: int = 70) -> dict[str, Any]:
    env = [{"name": "SERVETOOL_KSERVE_HOST", "value": "0.0.0.0"},
           {"name": "SERVETOOL_KSERVE_LOAD_MODELS", "value": "all"},
           {"name": "SERVETOOL_CPUS", "value": cpu}]
    if token_auth:
        env.append({"name": "SERVETOOL_KSERVE_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": f"{name}-key", "key": "key"}}})
    probe = {"httpGet": {"path": "/ping", "port": PORT}, "periodSeconds": 5, "timeoutSeconds": 3}
    container = {
        "name": CONTAINER, "image": image, "imagePullPolicy": "IfNotPresent",
        "ports": [{"name": "http1", "containerPort": PORT, "protocol": "TCP"},
                  {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
        "env": env,
        "resources": {"requests": {"cpu": cpu, "memory": memory_request},
                      "limits": {"memory": memory_limit}},
        "startupProbe": {**probe, "failureThreshold": 60},
        "readinessProbe": probe,
        "livenessProbe": {**probe, "httpGet": {"path": "/v2/health/live", "port": PORT},
                          "failureThreshold": 3},
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "runAsNonRoot": True, "runAsUser": 1000,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "work", "mountPath": "/home/model-server/work"}],
    }
    return {
        "apiVersion": API_VERSION, "kind": "InferenceService",
        "metadata": {
            "name": name, "namespace": namespace,
            "labels": {"app.kubernetes.io/name": "servetool",
                       "app.kubernetes.io/managed-by": "servetool"},
            "annotations": {
                "serving.kserve.io/deploymentMode": "RawDeployment",
                "serving.kserve.io/autoscalerClass": "hpa",
                "serving.kserve.io/metric": "cpu",
                "serving.kserve.io/targetUtilizationPercentage": str(target_cpu_percent),
                "serving.kserve.io/enable-prometheus-scraping": "true",
                "prometheus.kserve.io/port": str(METRICS_PORT),
                "prometheus.kserve.io/path": "/metrics"}},
        "spec": {"predictor": {
            "minReplicas": min_replicas, "maxReplicas": max_replicas,
            "containers": [container],
            "volumes": [{"name": "work", "emptyDir": {"sizeLimit": "2Gi"}}],
            "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000},
            "automountServiceAccountToken": False}},
    }


def predictor_pod(service: dict[str, Any]) -> dict[str, Any]:
    """The predictor's inlined PodSpec as a core/v1 Pod, for the official schema."""
    spec = {k: v for k, v in service["spec"]["predictor"].items() if k not in EXTENSION_FIELDS}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": service["metadata"]["name"]}, "spec": spec}


def check(service: dict[str, Any]) -> list[str]:
    """What the InferenceService must hold for KServe to run it as servetool means it; [] when
    it does."""
    problems = []
    meta, predictor = service.get("metadata", {}), service.get("spec", {}).get("predictor", {})
    if service.get("apiVersion") != API_VERSION or service.get("kind") != "InferenceService":
        problems.append(f"not a {API_VERSION} InferenceService")
    if meta.get("annotations", {}).get("serving.kserve.io/deploymentMode") != "RawDeployment":
        problems.append("not in RawDeployment mode (it would need Knative)")
    containers = predictor.get("containers") or []
    if [c.get("name") for c in containers] != [CONTAINER]:
        problems.append(f"the predictor must have one container named {CONTAINER}")
    else:
        ports = {p["containerPort"] for p in containers[0].get("ports", [])}
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            port = containers[0].get(probe, {}).get("httpGet", {}).get("port")
            if port not in ports:
                problems.append(f"{probe} aims at port {port}, which the container does not open")
    if not 1 <= predictor.get("minReplicas", 0) <= predictor.get("maxReplicas", 0):
        problems.append("replicas: need 1 <= minReplicas <= maxReplicas")
    return problems
