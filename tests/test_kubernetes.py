"""The Kubernetes target without a cluster: render, kustomize, schema-validate, check semantics, and
run the rendered pod's containers under the local Docker engine as a stand-in for a kubelet.

What is NOT tested here (no API server can run on this machine): server-side apply, the rollout
wait, `scale --replicas` and the exec into pods. test_live_cluster covers them when a kubeconfig is
given in SERVETOOL_TEST_KUBECONFIG.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from servetool.engines.torchserve import split
from servetool.engines.torchserve.pod import parse_properties
from servetool.engines.torchserve.process import free_ports, port_in_use
from servetool.targets import image, kubecheck, manifests
from servetool.targets.kubernetes import set_workers
from tests.conftest import LOCAL_BASE_IMAGE, ROOT, png_bytes
from tests.test_cli import assert_clean_error, run

VALIDATE = str(Path(sys.executable).with_name("kubernetes-validate"))
K8S_VERSIONS = ("1.29.0", "1.33.0", "1.37.0")
CI = os.environ.get("SERVETOOL_CI") == "1"


def render(tmp_path: Path, model_store: Path, *extra: str, name: str = "digits") -> dict:
    proc = run("deploy", "digits", "--target", "kubernetes", "--dry-run", "--name", name,
               "--model-store", str(model_store), "--config", str(ROOT / "config.properties"),
               "--json", *extra, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def kustomize(overlay: str) -> list[dict]:
    if shutil.which("kubectl") is None:
        if CI:
            pytest.fail("kubectl (with its built-in kustomize) is needed in CI")
        pytest.skip("kubectl is not installed")
    out = subprocess.run(["kubectl", "kustomize", overlay], capture_output=True, text=True,
                         check=True, env={**os.environ, "KUBECONFIG": "/dev/null"}).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(objs: list[dict]) -> dict[str, dict]:
    return {o["kind"]: o for o in objs}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory, model_store):
    work = tmp_path_factory.mktemp("kube")
    result = render(work, model_store)
    objs = kustomize(str(work / result["overlay"]))
    return work, result, objs


def test_kustomize_output_is_what_servetool_applies(rendered, model_store):
    work, result, objs = rendered
    opts = manifests.KubeOptions(name="digits", image=result["image"],
                                 base_config=ROOT / "config.properties")
    key = manifests.read_key(work / result["overlay"])
    assert key and len(key) >= 32
    ours = manifests.objects(opts, [model_store / "digits.mar"], key)

    def index(items):
        return {(o["kind"], o["metadata"]["name"]): o for o in items}

    assert index(objs) == index(ours)
    assert sorted(result["objects"]) == sorted(f"{k}/{n}" for k, n in index(objs))
    # Re-rendering keeps the Secret's key: clients keep working across deploys.
    again = render(work, model_store)
    assert manifests.read_key(work / again["overlay"]) == key
    assert oct((work / again["overlay"] / "secret.yaml").stat().st_mode & 0o777) == "0o600"


def assert_valid(objs: list[dict], version: str, folder: Path) -> None:
    """Every object passes the official schema of that Kubernetes version, strictly."""
    for obj in objs:
        path = folder / f"{obj['kind']}.yaml"
        path.write_text(yaml.safe_dump(obj))
        proc = subprocess.run([VALIDATE, "--strict", "-k", version, str(path)], capture_output=True,
                              text=True)
        assert proc.returncode == 0, f"{obj['kind']} on {version}: {proc.stdout}{proc.stderr}"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_passes_strict_schema_validation(rendered, tmp_path, version):
    assert_valid(rendered[2], version, tmp_path)


def test_schema_validation_catches_a_wrong_field(rendered, tmp_path):
    # The validator really rejects: a typo'd field in the Deployment fails --strict.
    _, _, objs = rendered
    bad = copy.deepcopy(by_kind(objs)["Deployment"])
    bad["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    proc = subprocess.run([VALIDATE, "--strict", "-k", K8S_VERSIONS[-1], str(path)],
                          capture_output=True, text=True)
    assert proc.returncode != 0


def test_semantics_hold_and_the_design_is_as_documented(rendered):
    _, _, objs = rendered
    assert kubecheck.problems(objs) == []
    kinds = by_kind(objs)
    dep, svc, hpa = kinds["Deployment"], kinds["Service"], kinds["HorizontalPodAutoscaler"]
    pod = dep["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    assert set(containers) == {"torchserve", "gateway"}
    # Inference only through the Service, to the gateway; management never exposed.
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["http"]
    assert [p["name"] for p in containers["gateway"]["ports"]] == ["http"]
    props = dict(line.split("=", 1) for line in
                 kinds["ConfigMap"]["data"]["config.properties"].splitlines()
                 if "=" in line and not line.startswith("#"))
    assert props["management_address"] == "http://127.0.0.1:8081"
    assert props["inference_address"] == "http://127.0.0.1:8085"
    assert props["enable_model_api"] == "false" and "disable_token_authorization" not in props
    assert props["load_models"] == "digits.mar" and "digits" in json.loads(props["models"])
    # Non-root, read-only root filesystem, no service account token, scrape annotations.
    assert pod["securityContext"]["runAsNonRoot"] and pod["automountServiceAccountToken"] is False
    assert all(c["securityContext"]["readOnlyRootFilesystem"] for c in pod["containers"])
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "8082" and annotations["prometheus.io/scrape"] == "true"
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert "replicas" not in dep["spec"]  # the autoscaler owns the count; re-applies keep it
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    assert kinds["PodDisruptionBudget"]["apiVersion"] == "policy/v1"


@pytest.mark.parametrize("breakage, expected", [
    (lambda k: k["Service"]["spec"]["selector"].update({"app.kubernetes.io/instance": "other"}),
     "Service/digits-servetool: its selector matches no pod template"),
    (lambda k: k["Service"]["spec"]["ports"][0].update({"targetPort": "web"}),
     "targetPort 'web'"),
    (lambda k: k["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"].update({"name": "nope"}),
     "scaleTargetRef Deployment/nope does not exist"),
    (lambda k: k["Deployment"]["spec"]["template"]["spec"]["containers"][1]["resources"]["requests"]
     .pop("cpu"), "container gateway has no CPU request"),
    (lambda k: k["Deployment"]["spec"]["template"]["spec"]["volumes"][0]["configMap"]
     .update({"name": "missing"}), "refers to ConfigMap/missing, which does not exist"),
    (lambda k: k["Deployment"]["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]
     ["httpGet"].update({"port": "admin"}), "livenessProbe uses port 'admin'"),
    (lambda k: k["Deployment"]["spec"]["template"]["spec"]["containers"][0]["ports"][0]
     .update({"containerPort": 99999}), "port 99999 is out of range"),
    (lambda k: k["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].update({"x": "y"}),
     "PodDisruptionBudget/digits-servetool: its selector matches no pod template"),
])
def test_semantic_checks_catch_each_breakage(rendered, breakage, expected):
    _, _, objs = rendered
    broken = copy.deepcopy(objs)
    breakage(by_kind(broken))
    found = kubecheck.problems(broken)
    assert any(expected in p for p in found), found


def test_variants_no_token_auth_and_models_volume(tmp_path, model_store):
    result = render(tmp_path, model_store, "--no-token-auth", "--models-pvc", "models",
                    "--replicas", "3", "--max-replicas", "2", name="open")
    objs = kustomize(str(tmp_path / result["overlay"]))
    kinds = by_kind(objs)
    assert "Secret" not in kinds
    assert kubecheck.problems(objs, ("PersistentVolumeClaim/models",)) == []
    assert any("PersistentVolumeClaim/models" in p for p in kubecheck.problems(objs))
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["torchserve"]
    container = pod["containers"][0]
    assert {"name": "models", "mountPath": image.CONTAINER_STORE, "readOnly": True} in \
        container["volumeMounts"]
    assert container["readinessProbe"]["exec"]["command"][-1] == "ready"
    assert "disable_token_authorization=true" in kinds["ConfigMap"]["data"]["config.properties"]
    hpa = kinds["HorizontalPodAutoscaler"]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (3, 3)
    for version in (K8S_VERSIONS[0], K8S_VERSIONS[-1]):
        assert_valid(objs, version, tmp_path)


def test_watching_pods_each_follow_the_bucket(tmp_path, model_store):
    """--watch: a watcher container per pod, a writable model store seeded from the image,
    registrations only through the front, readiness after the first check, credentials from a
    Secret the user owns (never in the manifests)."""
    result = render(tmp_path, model_store, "--watch", "s3://models/prod", "--watch-endpoint-url",
                    "http://minio.storage:9000", "--watch-secret", "models-s3", "--keep", "3",
                    name="watched")
    objs = kustomize(str(tmp_path / result["overlay"]))
    assert kubecheck.problems(objs, ("Secret/models-s3",)) == []
    kinds = by_kind(objs)
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    assert list(containers) == ["torchserve", "gateway", "watcher"]
    [seed] = pod["initContainers"]
    assert seed["args"] == ["seed", "/seed"] and seed["image"] == containers["watcher"]["image"]
    watcher = containers["watcher"]
    assert watcher["args"] == ["watch"] and watcher["envFrom"] == [{"secretRef": {"name": "models-s3"}}]
    env = {e["name"]: e["value"] for e in watcher["env"]}
    assert env["SERVETOOL_WATCH_SOURCE"] == "s3://models/prod"
    assert env["SERVETOOL_S3_ENDPOINT_URL"] == "http://minio.storage:9000"
    assert env["SERVETOOL_WATCH_KEEP"] == "3" and "AWS_SECRET_ACCESS_KEY" not in env
    store = {"name": "models", "mountPath": image.CONTAINER_STORE}
    assert store in containers["torchserve"]["volumeMounts"] and store in watcher["volumeMounts"]
    assert {"name": "models", "emptyDir": {"sizeLimit": "8Gi"}} in pod["volumes"]
    gateway_env = {e["name"]: e.get("value") for e in containers["gateway"]["env"]}
    assert gateway_env["SERVETOOL_WATCH_STATE"] == manifests.WATCH_STATE
    props = kinds["ConfigMap"]["data"]["config.properties"]
    assert "enable_model_api=true" in props
    assert f"management_address=unix:{image.CONTAINER_SOCKET}" in props
    for version in (K8S_VERSIONS[0], K8S_VERSIONS[-1]):
        assert_valid(objs, version, tmp_path)
    # the image it names carries the watcher: another tag than the plain one
    (tmp_path / "plain").mkdir()
    plain = render(tmp_path / "plain", model_store, name="plain")
    assert result["image"] != plain["image"]
    proc = run("deploy", "digits", "--target", "kubernetes", "--dry-run", "--model-store",
               str(model_store), "--watch", "s3://m/p", "--models-pvc", "pvc", cwd=tmp_path)
    assert_clean_error(proc, "does not combine with --models-pvc")


def test_split_pods_put_haproxy_between_the_gateway_and_torchserve(tmp_path, model_store):
    """--split: HAProxy in the TorchServe container on the port the gateway forwards to
    (TorchServe moves behind it), its weights from an optional canary ConfigMap that deploy never
    writes (a redeploy must not reset a canary); kustomize renders what servetool applies."""
    result = render(tmp_path, model_store, "--split", name="split")
    objs = kustomize(str(tmp_path / result["overlay"]))
    opts = manifests.KubeOptions(name="split", image=result["image"], split=True,
                                 base_config=ROOT / "config.properties")
    ours = manifests.objects(opts, [model_store / "digits.mar"],
                             manifests.read_key(tmp_path / result["overlay"]))
    assert {(o["kind"], o["metadata"]["name"]): o for o in objs} == \
        {(o["kind"], o["metadata"]["name"]): o for o in ours}
    assert kubecheck.problems(objs) == []
    kinds = by_kind(objs)
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    env = {e["name"]: e.get("value") for e in containers["torchserve"]["env"]}
    config = env["SERVETOOL_SPLIT_CONFIG_TEXT"]
    assert f"bind 127.0.0.1:{manifests.POD_PORTS['torchserve']}\n" in config
    assert f"server torchserve 127.0.0.1:{manifests.POD_PORTS['upstream']}\n" in config
    props = parse_properties(kinds["ConfigMap"]["data"]["config.properties"])
    assert props["inference_address"] == f"http://127.0.0.1:{manifests.POD_PORTS['upstream']}"
    gateway_env = {e["name"]: e.get("value") for e in containers["gateway"]["env"]}
    assert gateway_env["SERVETOOL_GATEWAY_UPSTREAM"] == f"127.0.0.1:{manifests.POD_PORTS['torchserve']}"
    canary = next(v for v in pod["volumes"] if v["name"] == "canary")
    assert canary["configMap"] == {"name": "split-servetool-canary", "optional": True}
    assert "split-servetool-canary" not in result["objects"]
    assert {"name": "split-metrics", "containerPort": manifests.POD_PORTS["split_metrics"],
            "protocol": "TCP"} in containers["torchserve"]["ports"]
    for version in (K8S_VERSIONS[0], K8S_VERSIONS[-1]):
        assert_valid(objs, version, tmp_path)
    # no gateway: HAProxy itself on the Service's port
    (tmp_path / "open").mkdir()
    open_result = render(tmp_path / "open", model_store, "--split", "--no-token-auth", name="open")
    open_pod = by_kind(kustomize(str(tmp_path / "open" / open_result["overlay"])))["Deployment"]
    open_env = {e["name"]: e.get("value") for e in
                open_pod["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert f"bind 0.0.0.0:{manifests.POD_PORTS['http']}\n" in open_env["SERVETOOL_SPLIT_CONFIG_TEXT"]
    # the image it names carries HAProxy: another tag than the plain one
    (tmp_path / "plain").mkdir()
    assert render(tmp_path / "plain", model_store, name="plain")["image"] != result["image"]


def test_kubernetes_canary_needs_a_cluster_and_refuses_auto(tmp_path):
    proc = run("canary", "digits", "2.0", "--weight", "10", "--target", "kubernetes", "--name",
               "digits", cwd=tmp_path)
    assert_clean_error(proc, "no kubeconfig given")
    proc = run("canary", "digits", "2.0", "--auto", "--target", "kubernetes", "--name", "digits",
               cwd=tmp_path)
    assert_clean_error(proc, "--auto judges one server's figures")


def test_cluster_commands_without_kubeconfig_say_so(tmp_path, model_store):
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    proc = run("deploy", "--target", "kubernetes", "--model-store", str(model_store), cwd=tmp_path,
               env=env)
    assert_clean_error(proc, "no kubeconfig given", "--dry-run")
    proc = run("scale", "digits", "--replicas", "3", "--target", "kubernetes", "--name", "digits",
               cwd=tmp_path, env=env)
    assert_clean_error(proc, "no kubeconfig given")
    proc = run("deploy", "--target", "kubernetes", "--dry-run", "--name", "Bad_Name",
               "--model-store", str(model_store), cwd=tmp_path, env=env)
    assert_clean_error(proc, "must be a DNS label")


def test_set_workers_edits_only_that_model():
    props = 'a=1\nmodels={"digits": {"1.0": {"minWorkers": 1, "maxWorkers": 2}}}\n'
    out = set_workers(props, "digits", 3)
    assert json.loads(out.splitlines()[1][7:]) == {"digits": {"1.0": {"minWorkers": 3, "maxWorkers": 3}}}
    assert out.splitlines()[0] == "a=1"



def test_the_watcher_loads_the_pod_helper_as_the_image_ships_it(monkeypatch):
    """The watcher container loads servetool_pod.py from a file (it is pod.py, copied alone into the
    image); the module must work loaded that way, dataclasses included, or the container exits."""
    from servetool.engines.torchserve import pod
    from servetool.operate import pod_watch
    monkeypatch.setenv("SERVETOOL_POD_HELPER", pod.__file__)
    helper = pod_watch.pod_helper()
    assert helper.canonical_target("/models?url=a.mar").params == {"url": "a.mar"}
    with pytest.raises(helper.TargetError, match="encoded"):
        helper.canonical_target("/models%2F?url=a.mar")

# --- the rendered pod under the local Docker engine --------------------------------------------------
def run_pod(engine, pod: dict, volumes_dir: Path, objs: list[dict], name: str,
            secrets: dict[str, dict[str, str]] | None = None) -> list:
    """Start each container of `pod` as the kubelet would (init containers first, to completion;
    image, args, env and envFrom, mounts, user, read-only root, dropped capabilities), on the host
    network (this engine has no bridge). `secrets`: the Secrets the user owns in the cluster."""
    kinds = by_kind(objs)
    binds: dict[str, dict] = {}
    for volume in pod["volumes"]:
        folder = volumes_dir / volume["name"]
        folder.mkdir(parents=True)
        if "configMap" in volume and volume["configMap"].get("optional"):
            pass  # the user's ConfigMap (the canary's), not there yet: an empty folder
        elif "configMap" in volume:
            for key, value in kinds["ConfigMap"]["data"].items():
                (folder / key).write_text(value)
        elif "secret" in volume:
            for key, value in kinds["Secret"]["stringData"].items():
                (folder / key).write_text(value)
                (folder / key).chmod(volume["secret"]["defaultMode"])
        os.chown(folder, 1000, 1000)  # emptyDir is writable by the pod's fsGroup
        for item in folder.iterdir():
            os.chown(item, 0, 1000)
        binds[volume["name"]] = {"path": str(folder)}
    uid = pod["securityContext"]["runAsUser"]
    started = []
    for init in (True, False):
        for c in pod.get("initContainers" if init else "containers", []):
            mounts = {binds[m["name"]]["path"]: {"bind": m["mountPath"],
                                                  "mode": "ro" if m.get("readOnly") else "rw"}
                      for m in c["volumeMounts"]}
            env = {k: v for ref in c.get("envFrom", [])
                   for k, v in (secrets or {})[ref["secretRef"]["name"]].items()}
            env |= {e["name"]: env_value(e, pod) for e in c.get("env", [])}
            container = engine.containers.run(
                c["image"], c.get("args"), detach=True, name=f"{name}-{c['name']}",
                environment=env, volumes=mounts,
                user=f"{uid}:{pod['securityContext']['runAsGroup']}",
                group_add=[str(pod["securityContext"]["fsGroup"])],
                read_only=c["securityContext"]["readOnlyRootFilesystem"],
                cap_drop=c["securityContext"]["capabilities"]["drop"],
                security_opt=["no-new-privileges"], network_mode="host")
            if init:  # to completion, before any container starts
                code = container.wait(timeout=120)["StatusCode"]
                logs = container.logs().decode(errors="replace")
                container.remove(force=True)
                assert code == 0, f"init container {c['name']}: {logs}"
            else:
                started.append(container)
    return started


def env_value(env: dict, pod: dict) -> str:
    """A literal value, or the Downward API's requests.cpu (rounded up, as with divisor 1)."""
    if "value" in env:
        return env["value"]
    field = env["valueFrom"]["resourceFieldRef"]
    assert field["resource"] == "requests.cpu" and field["divisor"] == "1"
    container = next(c for c in pod["containers"] if c["name"] == field["containerName"])
    return str(manifests.cpu_cores(container["resources"]["requests"]["cpu"]))


def probe(container: dict, kind: str, engine_container) -> tuple[bool, str]:
    spec = container[kind]
    if "exec" in spec:
        code, out = engine_container.exec_run(spec["exec"]["command"])
        return code == 0, out.decode(errors="replace")
    port = spec["httpGet"]["port"]
    if isinstance(port, str):
        port = next(p["containerPort"] for p in container["ports"] if p["name"] == port)
    try:
        reply = requests.get(f"http://127.0.0.1:{port}{spec['httpGet']['path']}", timeout=5)
    except requests.ConnectionError as exc:
        return False, str(exc)
    return 200 <= reply.status_code < 400, reply.text


def wait_pod_ready(handles: dict, containers: dict, timeout_s: float = 180) -> tuple[bool, str]:
    """Poll the gateway's readiness probe while every container keeps running."""
    deadline = time.monotonic() + timeout_s
    ready = (False, "")
    while time.monotonic() < deadline and not ready[0]:
        for handle in handles.values():
            handle.reload()
            assert handle.status == "running", handle.logs(tail=30).decode()
        ready = probe(containers["gateway"], "readinessProbe", handles["gateway"])
        time.sleep(1)
    return ready


def worker_count(container) -> int:
    """digits' workers, asked inside the container with the pod's own management key."""
    code, out = container.exec_run(
        ["python3", "-c", "import sys; sys.path.insert(0, '/opt/servetool'); "
         "import servetool_pod as p, json; print(len(json.loads(p.call('GET', 'management', "
         "'/models/digits')[1])[0]['workers']))"])
    assert code == 0, out
    return int(out.decode().strip())


@pytest.mark.docker
def test_rendered_pod_runs_under_docker_and_its_probes_answer(tmp_path, model_store,
                                                              docker_engine, held_out):
    engine = image.docker_client_for(docker_engine["DOCKER_HOST"])
    busy = [p for p in manifests.POD_PORTS.values()
            if port_in_use("127.0.0.1", p)]
    assert not busy, f"the stand-in pod needs ports {busy} free on this machine"
    # The image the manifests name, built here on the local base image.
    proc = run("image", "digits", "--model-store", str(model_store), "--base-image",
               LOCAL_BASE_IMAGE, "--config", str(ROOT / "config.properties"), "--json",
               cwd=tmp_path, env=docker_engine, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    built = json.loads(proc.stdout)
    result = render(tmp_path, model_store, "--image", built["tag"])
    objs = kustomize(str(tmp_path / result["overlay"]))
    pod = by_kind(objs)["Deployment"]["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    started = run_pod(engine, pod, tmp_path / "volumes", objs, "standin")
    try:
        handles = {c.name.split("-", 1)[1]: c for c in started}
        ready = wait_pod_ready(handles, containers)
        assert ready[0], ready[1]
        for name, kind in (("gateway", "livenessProbe"), ("torchserve", "startupProbe"),
                           ("torchserve", "livenessProbe")):
            ok, detail = probe(containers[name], kind, handles[name])
            assert ok, f"{name} {kind}: {detail}"

        # Workers come from the ConfigMap's per-model settings (models loaded at start).
        code, out = handles["torchserve"].exec_run(["python3", "/opt/servetool/servetool_pod.py",
                                                    "ready"])
        assert code == 0, out
        rendered_models = json.loads(next(
            line[7:] for line in by_kind(objs)["ConfigMap"]["data"]["config.properties"].splitlines()
            if line.startswith("models=")))
        assert rendered_models["digits"]["1.0"]["minWorkers"] == 1  # auto: one per requested core
        assert worker_count(handles["torchserve"]) == 1
        key = by_kind(objs)["Secret"]["stringData"]["inference-key"]
        url = "http://127.0.0.1:8080/predictions/digits"
        images, labels = held_out
        names = (ROOT / "models/digits/labels.txt").read_text().split()
        reply = requests.post(url, data=png_bytes(images[0]),
                              headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert reply.status_code == 200, reply.text
        assert max(reply.json(), key=reply.json().get) == names[int(labels[0])]
        # Without the shared key the gateway refuses; TorchServe behind it is not reachable from
        # outside the pod on the Service's port.
        denied = requests.post(url, data=png_bytes(images[0]), timeout=30)
        assert denied.status_code == 401 and "API key" in denied.json()["error"]
        wrong = requests.post(url, data=b"x", headers={"Authorization": "Bearer nope"}, timeout=30)
        assert wrong.status_code == 401
        bad = requests.post(url, data=b"not an image", headers={"Authorization": f"Bearer {key}"},
                            timeout=30)
        assert bad.status_code == 400 and "error" in bad.json()

        # What `servetool scale --workers` runs in every pod.
        code, out = handles["torchserve"].exec_run(["python3", "/opt/servetool/servetool_pod.py",
                                                    "scale", "digits", "2"])
        assert code == 0, out
        assert worker_count(handles["torchserve"]) == 2
    finally:
        for handle in started:
            handle.remove(force=True)


@pytest.mark.skipif(not os.environ.get("SERVETOOL_TEST_KUBECONFIG"),
                    reason="live cluster test: set SERVETOOL_TEST_KUBECONFIG (and push the image "
                           "to a registry the cluster pulls from, SERVETOOL_TEST_IMAGE)")
def test_live_cluster(tmp_path, model_store):
    kubeconfig = os.environ["SERVETOOL_TEST_KUBECONFIG"]
    namespace = os.environ.get("SERVETOOL_TEST_NAMESPACE", "default")
    common = ["--target", "kubernetes", "--kubeconfig", kubeconfig, "--namespace", namespace,
              "--name", "servetool-test"]
    image_args = ["--image", os.environ["SERVETOOL_TEST_IMAGE"]] \
        if os.environ.get("SERVETOOL_TEST_IMAGE") else []
    proc = run("deploy", "digits", *common, *image_args, "--model-store", str(model_store),
               "--json", cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["rollout"]["available"] >= 2
    proc = run("scale", "digits", *common, "--replicas", "3", "--workers", "2", "--json",
               cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr
    scaled = json.loads(proc.stdout)
    assert scaled["replicas"]["rollout"]["available"] >= 3
    assert len(scaled["workers"]["pods"]) == 3


@pytest.mark.docker
def test_a_watching_pod_under_docker_serves_what_is_published_to_the_bucket(
        tmp_path, model_store, docker_engine):
    """The rendered watching pod (seed init container, TorchServe, gateway, watcher) as a kubelet
    would run it, following a bucket of moto's S3 server: version 2.0 uploaded there is served
    through the gateway without anyone calling the pod. The pod has the canary split too: the
    weights written to its canary ConfigMap's mount send a share back to 1.0."""
    from tests.test_lifecycle import moto_server, rewrite_archive

    engine = image.docker_client_for(docker_engine["DOCKER_HOST"])
    busy = [p for p in (*manifests.POD_PORTS.values(), manifests.WATCH_METRICS_PORT)
            if port_in_use("127.0.0.1", p)]
    assert not busy, f"the stand-in pod needs ports {busy} free on this machine"
    proc = run("image", "digits", "--with-watcher", "--with-split", "--model-store", str(model_store),
               "--base-image", LOCAL_BASE_IMAGE, "--config", str(ROOT / "config.properties"),
               "--json", cwd=tmp_path, env=docker_engine, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    built = json.loads(proc.stdout)
    import boto3

    s3_port = free_ports(("s3",))["s3"]
    s3_server = moto_server(s3_port)
    endpoint = f"http://127.0.0.1:{s3_port}"
    creds = {"AWS_ACCESS_KEY_ID": "pod", "AWS_SECRET_ACCESS_KEY": "pod-secret",
             "AWS_DEFAULT_REGION": "us-east-1"}
    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="pod",
                      aws_secret_access_key="pod-secret", region_name="us-east-1")
    s3.create_bucket(Bucket="models")
    result = render(tmp_path, model_store, "--image", built["tag"], "--watch", "s3://models/prod",
                    "--watch-endpoint-url", endpoint, "--watch-interval", "1", "--watch-secret",
                    "models-s3", "--split", name="watched")
    objs = kustomize(str(tmp_path / result["overlay"]))
    pod = by_kind(objs)["Deployment"]["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    started = run_pod(engine, pod, tmp_path / "volumes", objs, "watched",
                      secrets={"models-s3": creds})
    key = by_kind(objs)["Secret"]["stringData"]["inference-key"]
    url = "http://127.0.0.1:8080/predictions/digits"
    body = (ROOT / "models" / "digits" / "samples" / "digit_3.png").read_bytes()

    def answering() -> str | None:
        reply = requests.post(url, data=body, headers={"Authorization": f"Bearer {key}"},
                              timeout=30)
        return reply.headers.get("X-Model-Version") if reply.status_code == 200 else None

    try:
        handles = {c.name.split("-", 1)[1]: c for c in started}
        ready = wait_pod_ready(handles, containers)
        assert ready[0], ready[1] + handles["watcher"].logs(tail=30).decode()
        assert answering() == "1.0"
        v2 = rewrite_archive(model_store / "digits.mar", tmp_path / "v2" / "digits.mar",
                             version="2.0")
        s3.upload_file(str(v2), "models", "prod/digits/2.0/digits.mar")
        s3.put_object(Bucket="models", Key="prod/digits/2.0/READY", Body=b"")
        deadline = time.monotonic() + 90
        while answering() != "2.0":
            assert time.monotonic() < deadline, handles["watcher"].logs(tail=40).decode()
            time.sleep(0.5)
        deadline = time.monotonic() + 30
        while "digits 2.0: serving" not in (logs := handles["watcher"].logs().decode()):
            assert time.monotonic() < deadline, logs
            time.sleep(0.5)
        assert "pod-secret" not in logs
        # the version the pod started with stays loaded for a rollback (keep 2), with its workers
        assert "unloading" not in logs and "starting 1 worker(s)" in logs, logs
        metrics = requests.get(f"http://127.0.0.1:{manifests.WATCH_METRICS_PORT}/metrics",
                               timeout=5).text
        assert 'servetool_watch_publishes_total{model="digits",outcome="serving"} 1.0' in metrics
        # the front still refuses what it refuses on the other targets: a path outside the store
        code, out = handles["torchserve"].exec_run(
            ["python3", "-c", "import sys; sys.path.insert(0, '/opt/servetool'); "
             "import servetool_pod as p, json, urllib.request as u; "
             "r = u.Request('http://127.0.0.1:8081/models?url=/etc&model_name=x', method='POST', "
             "headers={'Authorization': 'Bearer ' + p.client_keys()['management']['key']}); "
             "import urllib.error as e\ntry: u.urlopen(r)\nexcept e.HTTPError as x: print(x.code)"])
        assert out.decode().strip() == "403", out
        check_canary_in_pod(tmp_path / "volumes" / "canary", answering)
    finally:
        for handle in started:
            handle.remove(force=True)
        s3_server.terminate()


def check_canary_in_pod(mount: Path, answering) -> None:
    """What `servetool canary --target kubernetes` writes, as the kubelet lays out the mount:
    half of the unversioned requests go to 1.0; servetool's figures at the split say so."""
    from prometheus_client.parser import text_string_to_metric_families

    (mount / manifests.CANARY_FILE).write_text(json.dumps({"digits": {"version": "1.0",
                                                                      "weight": 50}}))
    deadline = time.monotonic() + 20
    while answering() != "1.0":  # the pod reads the file again every 2 s
        assert time.monotonic() < deadline, "the split never sent a request to 1.0"
    seen = [answering() for _ in range(120)]
    assert 0.5 - 0.16 < seen.count("1.0") / 120 < 0.5 + 0.16, seen  # 3.5 sigma
    text = requests.get(f"http://127.0.0.1:{manifests.POD_PORTS['split_metrics']}"
                        f"{split.EXPORTER_PATH}", timeout=5).text
    samples = {(s.name, s.labels.get("version")): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("servetool_canary_weight", "1.0")] == 50
    assert samples[("servetool_request_seconds_count", "1.0")] >= seen.count("1.0")
    (mount / manifests.CANARY_FILE).write_text(json.dumps({"digits": {"version": "1.0",
                                                                      "weight": 0}}))
    time.sleep(3)
    assert {answering() for _ in range(30)} == {"2.0"}


def test_kserve_engine_renders_a_raw_deployment_inference_service(tmp_path, model_store):
    """--engine kserve: a KServe InferenceService (RawDeployment: no Knative) running the
    KServe-engine image, its key in a Secret; the predictor's pod spec passes the official
    schema strictly, and the structural check catches what would break it."""
    from servetool.engines.kserve import manifest

    result = render(tmp_path, model_store, "--engine", "kserve")
    assert result["engine"] == "kserve" and result["objects"] == [
        "Secret/digits-key", "InferenceService/digits"]
    folder = Path(result["folder"])
    service = yaml.safe_load((folder / "inferenceservice.yaml").read_text())
    secret = yaml.safe_load((folder / "secret.yaml").read_text())
    assert oct((folder / "secret.yaml").stat().st_mode & 0o777) == "0o600"
    assert manifest.check(service) == []
    annotations = service["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] == "RawDeployment"
    container = service["spec"]["predictor"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["SERVETOOL_KSERVE_LOAD_MODELS"]["value"] == "all"
    assert env["SERVETOOL_KSERVE_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "digits-key",
                                                                         "key": "key"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["image"].startswith("servetool/digits:")
    pod = manifest.predictor_pod(service)
    for version in K8S_VERSIONS:
        assert_valid([pod, secret], version, tmp_path)
    # the same key on a second render (clients keep working across deploys)
    again = render(tmp_path, model_store, "--engine", "kserve")
    assert yaml.safe_load((Path(again["folder"]) / "secret.yaml").read_text()) == secret
    broken = copy.deepcopy(service)
    broken["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] = "Serverless"
    broken["spec"]["predictor"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = 9999
    found = manifest.check(broken)
    assert any("RawDeployment" in p for p in found) and any("port 9999" in p for p in found)
    refused = run("deploy", "digits", "--target", "kubernetes", "--dry-run", "--name", "d",
                  "--engine", "kserve", "--split", "--model-store", str(model_store), cwd=tmp_path)
    assert_clean_error(refused, "--engine kserve on kubernetes", "--split")
