"""Semantic checks of a set of Kubernetes objects: what schema validation does not catch.

The official schemas (kubernetes-validate) check types and fields; they accept a Service whose
selector matches no pod, a probe on a port no container has, an autoscaler aimed at nothing, or a
volume naming a ConfigMap that does not exist. servetool runs these checks on what it renders
before writing or applying it.
"""

from __future__ import annotations

import re
from typing import Any

DNS_LABEL = re.compile(r"\A[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
DNS_SUBDOMAIN = re.compile(r"\A[a-z0-9]([-a-z0-9.]*[a-z0-9])?\Z")
QUANTITY = re.compile(r"\A\d+(\.\d+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?\Z")


def _pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
        return obj["spec"]["template"]["spec"]
    return None


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def problems(objs: list[dict[str, Any]], external: tuple[str, ...] = ()) -> list[str]:
    """Every inconsistency found, as one sentence each (empty when all is well). `external` names
    objects expected to exist in the cluster already, e.g. "PersistentVolumeClaim/models"."""
    found: list[str] = []
    names = {f"{o['kind']}/{o['metadata']['name']}" for o in objs} | set(external)
    workloads = [o for o in objs if _pod_spec(o) is not None]
    for obj in objs:
        name = obj["metadata"]["name"]
        where = f"{obj['kind']}/{name}"
        if len(name) > 63 or not DNS_SUBDOMAIN.match(name):
            found.append(f"{where}: the name is not a valid DNS name")
        for key, value in obj["metadata"].get("labels", {}).items():
            if len(value) > 63:
                found.append(f"{where}: label {key} is longer than 63 characters")
        pod = _pod_spec(obj)
        if pod is not None:
            found += _check_workload(obj, pod, names)
        elif obj["kind"] == "Service":
            found += _check_service(obj, workloads)
        elif obj["kind"] == "HorizontalPodAutoscaler":
            found += _check_hpa(obj, objs)
        elif obj["kind"] == "PodDisruptionBudget":
            selector = obj["spec"]["selector"].get("matchLabels", {})
            if not any(_matches(selector, w["spec"]["template"]["metadata"]["labels"])
                       for w in workloads):
                found.append(f"{where}: its selector matches no pod template")
    return found


def _check_workload(obj: dict[str, Any], pod: dict[str, Any], names: set[str]) -> list[str]:
    where = f"{obj['kind']}/{obj['metadata']['name']}"
    found = []
    selector = obj["spec"]["selector"].get("matchLabels", {})
    if not _matches(selector, obj["spec"]["template"]["metadata"].get("labels", {})):
        found.append(f"{where}: spec.selector does not match the pod template's labels")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for volume in volumes.values():
        ref = (f"ConfigMap/{volume['configMap']['name']}" if "configMap" in volume else
               f"Secret/{volume['secret']['secretName']}" if "secret" in volume else
               f"PersistentVolumeClaim/{volume['persistentVolumeClaim']['claimName']}"
               if "persistentVolumeClaim" in volume else None)
        optional = (volume.get("configMap") or volume.get("secret") or {}).get("optional")
        if ref and ref not in names and not optional:  # an optional one may come later
            found.append(f"{where}: volume {volume['name']} refers to {ref}, which does not exist")
    for c in pod["containers"]:
        cwhere = f"{where} container {c['name']}"
        ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
        for port in ports.values():
            if not 1 <= port <= 65535:
                found.append(f"{cwhere}: port {port} is out of range")
        for mount in c.get("volumeMounts", []):
            if mount["name"] not in volumes:
                found.append(f"{cwhere}: mounts volume {mount['name']}, which the pod does not have")
        for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c.get(probe_name)
            if probe and "httpGet" in probe:
                port = probe["httpGet"]["port"]
                if isinstance(port, str) and port not in ports:
                    found.append(f"{cwhere}: {probe_name} uses port {port!r}, which it does not name")
                if not str(probe["httpGet"].get("path", "/")).startswith("/"):
                    found.append(f"{cwhere}: {probe_name} path must start with /")
        resources = c.get("resources", {})
        for kind in ("requests", "limits"):
            for res, qty in resources.get(kind, {}).items():
                if not QUANTITY.match(str(qty)):
                    found.append(f"{cwhere}: {kind}.{res} {qty!r} is not a quantity")
        for env in c.get("env", []):
            field = env.get("valueFrom", {}).get("resourceFieldRef")
            if field and field.get("containerName", c["name"]) not in \
                    {x["name"] for x in pod["containers"]}:
                found.append(f"{cwhere}: env {env['name']} refers to a container the pod lacks")
        for ref in c.get("envFrom", []):
            if "configMapRef" in ref and f"ConfigMap/{ref['configMapRef']['name']}" not in names:
                found.append(f"{cwhere}: envFrom refers to a missing ConfigMap")
            if "secretRef" in ref and f"Secret/{ref['secretRef']['name']}" not in names:
                found.append(f"{cwhere}: envFrom refers to a missing Secret")
    return found


def _check_service(obj: dict[str, Any], workloads: list[dict[str, Any]]) -> list[str]:
    where = f"Service/{obj['metadata']['name']}"
    selector = obj["spec"].get("selector", {})
    targets = [w for w in workloads if _matches(selector, w["spec"]["template"]["metadata"]["labels"])]
    if not targets:
        return [f"{where}: its selector matches no pod template"]
    found = []
    for port in obj["spec"]["ports"]:
        target = port.get("targetPort", port["port"])
        named = {p.get("name"): p["containerPort"] for w in targets
                 for c in w["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        if isinstance(target, str) and target not in named:
            found.append(f"{where}: targetPort {target!r} is not a port any selected container names")
        if isinstance(target, int) and target not in named.values():
            found.append(f"{where}: targetPort {target} is not a port any selected container opens")
    return found


def _check_hpa(obj: dict[str, Any], objs: list[dict[str, Any]]) -> list[str]:
    where = f"HorizontalPodAutoscaler/{obj['metadata']['name']}"
    ref = obj["spec"]["scaleTargetRef"]
    target = next((o for o in objs if o["kind"] == ref["kind"]
                   and o["metadata"]["name"] == ref["name"]), None)
    if target is None:
        return [f"{where}: scaleTargetRef {ref['kind']}/{ref['name']} does not exist"]
    found = []
    if obj["spec"].get("minReplicas", 1) > obj["spec"]["maxReplicas"]:
        found.append(f"{where}: minReplicas is above maxReplicas")
    uses_cpu = any(m.get("resource", {}).get("name") == "cpu" for m in obj["spec"].get("metrics", []))
    if uses_cpu:
        for c in target["spec"]["template"]["spec"]["containers"]:
            if "cpu" not in c.get("resources", {}).get("requests", {}):
                found.append(f"{where}: scales on CPU utilization but container {c['name']} has no "
                             "CPU request")
    return found
