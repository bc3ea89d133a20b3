"""The Helm chart and the plain manifests, validated offline: no cluster can run here.

No kube-apiserver, kind or k3s can run on this machine (no registry reached has one; kind and
k3s need Docker), so nothing here was applied to a real cluster. What is checked instead:
- the chart renders and lints with the Helm 4 SDK (PyPI helm-python-sdk, no helm binary);
- every object passes `kubernetes-validate --strict` against Kubernetes 1.27, the oldest
  release the chart supports (native gRPC probes GA), and 1.37, the newest with schemas; the
  two custom resources (InferencePool v1, ServiceMonitor) against the fields their CRDs define;
- the Envoy bootstrap the init container renders passes `envoy --mode validate` (Envoy 1.40);
- the cross-references a typo breaks silently on a real cluster: selectors, named ports,
  probes, RBAC against the requests the real discovery code makes (to the fake API server of
  router_ext/harness/kube_fake.py), the NetworkPolicy, the drain timing, the file paths;
- deploy/kubernetes/ and docs/kubernetes.md's values table are not stale.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import grpc
import jsonschema
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from router_ext.app.server import RouterApp
from router_ext.config import RouterConfig, load_config
from router_ext.fleet.kubernetes import KubernetesDiscovery
from router_ext.harness import kube_fake
from router_ext.harness.envoy_proc import envoy_binary, free_port

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "router-ext"
OLDEST_K8S = "1.27.0"
NEWEST_K8S = "1.37.0"


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("render_k8s", ROOT / "scripts" / "render-k8s.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gen = _load_generator()

#: Value sets rendered and validated: the defaults, and every optional object switched on.
VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "everything-on": {
        "metrics": {"expose": True},
        "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
        "inferencePool": {"create": True},
        "discovery": {"kind": "inferencepool"},
        "networkPolicy": {
            "metricsFrom": [
                {"namespaceSelector": {"matchLabels": {"name": "monitoring"}}},
            ],
        },
        "auth": {"token": "t" * 32},
    },
    # `--set router.replicas=3`: three StatefulSet pods, three names in Envoy's bootstrap.
    "three-routers": {"router": {"replicas": 3}},
    "pods-kind": {"discovery": {"kind": "pods", "selector": {"app": "vllm"}, "targetPort": 8000}},
    "no-envoy-epp": {
        "envoy": {"enabled": False},
        "config": {"router": {"answer": "epp"}},
        "networkPolicy": {"grpcFrom": [{"podSelector": {"matchLabels": {"app": "gateway"}}}]},
        "auth": {"existingSecret": "my-token", "mode": "none"},
    },
}


def render(
    values: dict[str, Any] | None = None, namespace: str = "router-ext"
) -> list[dict[str, Any]]:
    objs: list[dict[str, Any]] = gen.objects(gen.render_chart(values, namespace=namespace))
    return objs


@pytest.fixture(scope="module")
def default_objects() -> list[dict[str, Any]]:
    return render()


def one(objs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind} *{name_suffix}, got {len(found)}"
    return found[0]


def pod_spec(deploy: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = deploy["spec"]["template"]["spec"]
    return spec


def router_cfg(objs: list[dict[str, Any]], tmp: Path) -> RouterConfig:
    p = tmp / "router-ext.yaml"
    p.write_text(one(objs, "ConfigMap", "-config")["data"]["router-ext.yaml"])
    return load_config(p)


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# --- rendering and schemas --------------------------------------------------------------


def test_committed_manifests_and_values_table_are_fresh() -> None:
    assert gen.stale() == [], "stale generated files: run .venv/bin/python scripts/render-k8s.py"


def test_chart_lints_clean() -> None:
    import helm_python as helm

    with gen._quiet_stderr():
        result = helm.lint(CHART)
    assert result["errors"] == []
    # Only INFO (severity 1: "icon is recommended") is tolerated; warnings and errors fail.
    assert [m for m in result["messages"] if m["severity"] > 1] == []


def test_every_value_is_documented() -> None:
    entries = gen.values_entries()
    assert len(entries) > 50
    undocumented = [k for k, _, why in entries if not why]
    assert undocumented == []
    keys = {k for k, _, _ in entries}
    assert {"router.replicas", "discovery.kind", "inferencePool.create"} <= keys


def test_values_parser_reports_an_undocumented_value() -> None:
    entries = gen.values_entries("# documented\na: 1\ngroup:\n  # yes\n  b: 2\n  c: 3\n")
    assert entries == [("a", "1", "documented"), ("group.b", "2", "yes"), ("group.c", "3", "")]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_objects_validate_strictly_against_oldest_and_newest_kubernetes(
    variant: str, tmp_path: Path
) -> None:
    objs = render(VARIANTS[variant])
    builtin = [o for o in objs if o["kind"] not in CRD_SCHEMAS]
    files = []
    for i, o in enumerate(builtin):
        f = tmp_path / f"{i:02d}-{o['kind']}.yaml"
        f.write_text(yaml.safe_dump(o))
        files.append(str(f))
    exe = Path(sys.executable).parent / "kubernetes-validate"
    for version in (OLDEST_K8S, NEWEST_K8S):
        r = subprocess.run(
            [str(exe), "--strict", "-k", version, *files], capture_output=True, text=True
        )
        out = r.stdout + r.stderr
        assert r.returncode == 0, out
        # A missing schema is only a warning to the tool: every object here must have one.
        assert "WARN" not in out and "ERROR" not in out, out
        assert out.count("passed for resource") == len(files), out
    for o in objs:
        if o["kind"] in CRD_SCHEMAS:
            jsonschema.validate(o, CRD_SCHEMAS[o["kind"]])


def test_strict_validation_catches_an_unknown_field(tmp_path: Path) -> None:
    """The validator run above is not a rubber stamp: a misspelt field fails it."""
    sts = one(render(), "StatefulSet", "-router")
    pod_spec(sts)["containers"][0]["readinesProbe"] = {"grpc": {"port": 50051}}
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(sts))
    exe = Path(sys.executable).parent / "kubernetes-validate"
    r = subprocess.run([str(exe), "--strict", "-k", OLDEST_K8S, str(f)], capture_output=True)
    assert r.returncode != 0 and b"readinesProbe" in r.stdout + r.stderr


def test_chart_refuses_kubernetes_older_than_1_27() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == ">=1.27.0-0"


# Fields of the two custom resources, from their CRDs (InferencePool: Gateway API Inference
# Extension v1; ServiceMonitor: prometheus-operator v1, the subset the chart uses).
_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 253}
_META = {"type": "object", "required": ["name"], "properties": {"name": _NAME}}
CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    "InferencePool": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "inference.networking.k8s.io/v1"},
            "metadata": _META,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["selector", "targetPorts"],
                "properties": {
                    "selector": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["matchLabels"],
                        "properties": {
                            "matchLabels": {
                                "type": "object",
                                "minProperties": 1,
                                "additionalProperties": {"type": "string", "maxLength": 63},
                            }
                        },
                    },
                    "targetPorts": {
                        "type": "array",
                        "minItems": 1,
                        "maxItems": 8,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["number"],
                            "properties": {
                                "number": {"type": "integer", "minimum": 1, "maximum": 65535}
                            },
                        },
                    },
                    "appProtocol": {"type": "string"},
                    "endpointPickerRef": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name"],
                        "properties": {
                            "group": {"type": "string"},
                            "kind": {"type": "string"},
                            "name": _NAME,
                            "port": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["number"],
                                "properties": {
                                    "number": {"type": "integer", "minimum": 1, "maximum": 65535}
                                },
                            },
                            "failureMode": {"enum": ["FailOpen", "FailClose"]},
                        },
                    },
                },
            },
        },
    },
    "ServiceMonitor": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "metadata": _META,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["selector", "endpoints"],
                "properties": {
                    "selector": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {"matchLabels": {"type": "object"}},
                    },
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"type": "string"},
                                "interval": {"type": "string", "pattern": r"^\d+(ms|s|m|h)$"},
                            },
                        },
                    },
                },
            },
        },
    },
}


# --- Envoy ---------------------------------------------------------------------------------


def test_envoy_bootstrap_from_the_chart_config_passes_envoy_validate(
    default_objects: list[dict[str, Any]], tmp_path: Path
) -> None:
    """What the init container runs (`router-ext envoy-config -c ... --out ...`), then
    `envoy --mode validate` on its output. Only the two paths that point into the pod (base_dir,
    token file) are moved into tmp_path."""
    text = one(default_objects, "ConfigMap", "-config")["data"]["router-ext.yaml"]
    raw = yaml.safe_load(text)
    raw["base_dir"] = str(tmp_path)
    raw["router"]["auth"]["token_file"] = str(tmp_path / "token")
    (tmp_path / "token").write_text("k8s-test-token-0123456789abcdef\n")
    cfg_file = tmp_path / "router-ext.yaml"
    cfg_file.write_text(yaml.safe_dump(raw))
    out = tmp_path / "envoy"
    cli = Path(sys.executable).parent / "router-ext"
    subprocess.run([str(cli), "envoy-config", "-c", str(cfg_file), "--out", str(out)], check=True)
    bootstrap = out / "envoy.yaml"
    r = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(bootstrap)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    doc = yaml.safe_load(bootstrap.read_text())
    clusters = {c["name"]: c for c in doc["static_resources"]["clusters"]}
    # Pods over gRPC EDS from router-ext, at router DNS names under the headless Service (the
    # Service's own name or a replica's): separate pods.
    eds = clusters["pods"]["eds_cluster_config"]["eds_config"]["api_config_source"]
    assert eds["api_type"] == "GRPC"
    xds = clusters[eds["grpc_services"][0]["envoy_grpc"]["cluster_name"]]
    svc = one(default_objects, "Service", "-router")
    svc_host = f"{svc['metadata']['name']}.router-ext.svc.cluster.local"
    port = svc["spec"]["ports"][0]["port"]
    xds_hosts = _endpoints(xds)
    assert xds_hosts
    for h in xds_hosts:
        host, _, p = h.rpartition(":")
        assert (host == svc_host or host.endswith("." + svc_host)) and int(p) == port, h
    # The listener is the port the Envoy container declares and its Service targets.
    listener = doc["static_resources"]["listeners"][0]["address"]["socket_address"]
    envoy = one(default_objects, "Deployment", "-envoy")
    ports = {p["name"]: p["containerPort"] for p in pod_spec(envoy)["containers"][0]["ports"]}
    assert listener["port_value"] == ports["http"] and listener["address"] == "0.0.0.0"
    # The init container writes where the Envoy container reads.
    init = pod_spec(envoy)["initContainers"][0]
    cmd = pod_spec(envoy)["containers"][0]["command"]
    out_dir = init["args"][init["args"].index("--out") + 1]
    assert cmd[cmd.index("-c") + 1] == f"{out_dir}/envoy.yaml"


def _endpoints(cluster: dict[str, Any]) -> list[str]:
    """host:port of every endpoint a static cluster lists."""
    return [
        f"{e['endpoint']['address']['socket_address']['address']}:"
        f"{e['endpoint']['address']['socket_address']['port_value']}"
        for group in cluster["load_assignment"]["endpoints"]
        for e in group["lb_endpoints"]
    ]


def _bootstrap(values: dict[str, Any] | None = None) -> dict[str, Any]:
    """The bootstrap `router-ext envoy-config` renders from the chart's router config."""
    text = gen.envoy_bootstrap_redacted(gen.router_config_text(gen.render_chart(values)))
    doc: dict[str, Any] = yaml.safe_load(text)
    return doc


def _replica_names(objs: list[dict[str, Any]], ns: str = "router-ext") -> list[str]:
    """host:port of each router replica: <statefulset>-<i>.<headless service>.<ns>.svc...."""
    sts = one(objs, "StatefulSet", "-router")
    svc = one(objs, "Service", "-router")
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"]
    port = svc["spec"]["ports"][0]["port"]
    return [
        f"{sts['metadata']['name']}-{i}.{svc['metadata']['name']}.{ns}.svc.cluster.local:{port}"
        for i in range(sts["spec"]["replicas"])
    ]


@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_envoy_gets_one_access_logger_per_router_replica(replicas: int) -> None:
    """N replicas in the chart -> the ext_proc cluster lists all N by their stable names, and
    the connection manager's access log and the router filter's upstream log each hold one
    gRPC logger per replica, on a cluster that reaches that replica alone."""
    values = {"router": {"replicas": replicas}}
    names = _replica_names(render(values))
    assert len(names) == replicas
    doc = _bootstrap(values)
    clusters = {c["name"]: c for c in doc["static_resources"]["clusters"]}
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    filters = {f["name"]: f["typed_config"] for f in hcm["typed_config"]["http_filters"]}
    ext_proc = filters["envoy.filters.http.ext_proc"]["grpc_service"]["envoy_grpc"]
    assert sorted(_endpoints(clusters[ext_proc["cluster_name"]])) == sorted(names)
    logs = {
        "access_log": hcm["typed_config"].get("access_log", []),
        "upstream_log": filters["envoy.filters.http.router"].get("upstream_log", []),
    }
    if replicas == 1:
        # One replica: one logger, on the ext_proc cluster itself (the single-router layout).
        assert len([a for a in logs["access_log"] if a["name"].endswith("http_grpc")]) == 1
        return
    for where, loggers in logs.items():
        grpc_logs = [a for a in loggers if a["name"] == "envoy.access_loggers.http_grpc"]
        reached = []
        for a in grpc_logs:
            target = a["typed_config"]["common_config"]["grpc_service"]["envoy_grpc"]
            (host,) = _endpoints(clusters[target["cluster_name"]])
            reached.append(host)
        assert sorted(reached) == sorted(names), where


# --- router replicas -------------------------------------------------------------------------


def test_router_is_a_parallel_statefulset_of_two_behind_its_headless_service(
    default_objects: list[dict[str, Any]],
) -> None:
    sts = one(default_objects, "StatefulSet", "-router")
    assert not [
        o
        for o in _workloads(default_objects)
        if o["metadata"]["name"].endswith("-router") and o["kind"] != "StatefulSet"
    ]
    assert sts["spec"]["replicas"] == 2
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert sts["spec"]["updateStrategy"] == {"type": "RollingUpdate"}
    assert "volumeClaimTemplates" not in sts["spec"]  # nothing persisted
    svc = one(default_objects, "Service", "-router")
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"]
    assert svc["spec"]["clusterIP"] == "None"
    # Only ready routers are resolvable (values.yaml router.service.publishNotReadyAddresses).
    assert svc["spec"]["publishNotReadyAddresses"] is False
    # controller-revision-hash=<name>-<10 chars> must fit a 63-character label value.
    assert len(sts["metadata"]["name"]) <= 52


@pytest.mark.parametrize(
    ("values", "count"),
    [({}, 2), ({"router": {"replicas": 3}}, 3), ({"router": {"replicas": 1}}, 1)],
)
def test_router_config_lists_every_replica_by_its_stable_dns_name(
    values: dict[str, Any], count: int, tmp_path: Path
) -> None:
    objs = render(values)
    cfg = router_cfg(objs, tmp_path)
    want = [
        f"router-ext-router-{i}.router-ext-router.router-ext.svc.cluster.local:50051"
        for i in range(count)
    ]
    assert _replica_names(objs) == want
    assert cfg.envoy.router_addresses == want
    assert cfg.replica_addresses == want
    assert one(objs, "StatefulSet", "-router")["spec"]["replicas"] == count
    # One process per pod: a second worker would listen where no Service or logger points.
    assert cfg.router.workers == 1


def test_replica_names_follow_namespace_domain_and_name_overrides(tmp_path: Path) -> None:
    values = {"fullnameOverride": "x" * 60, "clusterDomain": "corp.example"}
    objs = render(values, namespace="inference")
    sts = one(objs, "StatefulSet", "-router")
    name = sts["metadata"]["name"]
    assert len(name) <= 52 and one(objs, "Service", "-router")["metadata"]["name"] == name
    cfg = router_cfg(objs, tmp_path)
    assert cfg.envoy.router_addresses == [
        f"{name}-{i}.{name}.inference.svc.corp.example:50051" for i in range(2)
    ]


def test_scaling_the_routers_rolls_envoy_but_not_the_running_routers() -> None:
    def checksums(values: dict[str, Any]) -> tuple[str, str]:
        objs = render(values)
        ann = [
            one(objs, kind, suffix)["spec"]["template"]["metadata"]["annotations"]
            for kind, suffix in (("Deployment", "-envoy"), ("StatefulSet", "-router"))
        ]
        return ann[0]["checksum/config"], ann[1]["checksum/config"]

    envoy2, router2 = checksums({})
    envoy3, router3 = checksums({"router": {"replicas": 3}})
    assert envoy2 != envoy3  # Envoy's bootstrap must list the third replica: new pods
    assert router2 == router3  # the routers never read the replica list
    # Any other config change still rolls both.
    envoy_s, router_s = checksums({"config": {"routing": {"default_strategy": "least-kv-cache"}}})
    assert envoy_s != envoy2 and router_s != router2


def test_router_replicas_out_of_range_or_not_headless_fail_rendering() -> None:
    import helm_python as helm

    for n in (0, 65):
        with pytest.raises(helm.HelmError, match=r"router\.replicas"):
            render({"router": {"replicas": n}})
    with pytest.raises(helm.HelmError, match=r"router\.service\.headless"):
        render({"router": {"service": {"headless": False}}})


# --- cross-references ------------------------------------------------------------------------


def _workloads(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The router StatefulSet and the Envoy Deployment."""
    return [o for o in objs if o["kind"] in ("Deployment", "StatefulSet")]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_selectors_ports_probes_and_volumes_resolve(variant: str) -> None:
    objs = render(VARIANTS[variant])
    deploys = _workloads(objs)
    for d in deploys:
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert selects(d["spec"]["selector"]["matchLabels"], labels)
        spec = pod_spec(d)
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in spec.get("initContainers", []) + spec["containers"]:
            names = {p["name"] for p in c.get("ports", [])}
            numbers = {p["containerPort"] for p in c.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe"):
                if probe not in c:
                    continue
                target = c[probe].get("grpc") or c[probe].get("tcpSocket")
                assert target["port"] in names | numbers, (d["metadata"]["name"], probe)
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, (c["name"], m["name"])
        for v in volumes.values():
            if "configMap" in v:
                assert any(
                    o["kind"] == "ConfigMap" and o["metadata"]["name"] == v["configMap"]["name"]
                    for o in objs
                )
            if "secret" in v:
                name = v["secret"]["secretName"]
                secrets = [o for o in objs if o["kind"] == "Secret"]
                if variant == "no-envoy-epp":
                    assert name == "my-token" and secrets == []
                else:
                    assert [s["metadata"]["name"] for s in secrets] == [name]
    for svc in (o for o in objs if o["kind"] == "Service"):
        matched = [
            d
            for d in deploys
            if selects(svc["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(matched) == 1, svc["metadata"]["name"]
        names = {p["name"] for c in pod_spec(matched[0])["containers"] for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in names, (svc["metadata"]["name"], port)
    for pdb in (o for o in objs if o["kind"] == "PodDisruptionBudget"):
        matched = [
            d
            for d in deploys
            if selects(
                pdb["spec"]["selector"]["matchLabels"], d["spec"]["template"]["metadata"]["labels"]
            )
        ]
        assert len(matched) == 1 and matched[0]["spec"]["replicas"] > pdb["spec"]["maxUnavailable"]
    for sm in (o for o in objs if o["kind"] == "ServiceMonitor"):
        svcs = [
            s
            for s in objs
            if s["kind"] == "Service"
            and selects(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
        ]
        assert len(svcs) == 1
        assert sm["spec"]["endpoints"][0]["port"] in {p["name"] for p in svcs[0]["spec"]["ports"]}


def test_router_defaults_replicas_drain_and_security(
    default_objects: list[dict[str, Any]], tmp_path: Path
) -> None:
    cfg = router_cfg(default_objects, tmp_path)
    d = one(default_objects, "StatefulSet", "-router")
    assert d["spec"]["replicas"] == 2
    spec = pod_spec(d)
    (c,) = spec["containers"]
    pre_stop = float(c["lifecycle"]["preStop"]["exec"]["command"][1])
    # The kubelet must not SIGKILL a router during preStop + its own drain.
    assert spec["terminationGracePeriodSeconds"] > pre_stop + cfg.router.drain_seconds
    # gRPC probes through grpc.health.v1 on the port the router's config binds.
    assert c["readinessProbe"]["grpc"]["port"] == cfg.router.grpc.port
    assert c["livenessProbe"]["grpc"]["port"] == cfg.router.grpc.port
    assert cfg.router.grpc.host == "0.0.0.0"
    # Admin and metrics stay on loopback by default: nothing outside the pod reaches them.
    assert cfg.router.admin.host == "127.0.0.1" and cfg.router.metrics.host == "127.0.0.1"
    assert cfg.envoy.eds == "grpc" and cfg.discovery.source == "kubernetes"
    # Non-root, read-only root; every path the router writes is an emptyDir mount.
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    writable = [p for p, m in mounts.items() if "emptyDir" in volumes[m["name"]]]
    assert str(cfg.base_dir / "run") in writable and "/tmp" in writable
    assert any(
        str(cfg.token_file).startswith(p + "/")
        for p, m in mounts.items()
        if "secret" in volumes[m["name"]]
    )
    conf_arg = c["args"][c["args"].index("--config") + 1]
    assert Path(conf_arg).parent.as_posix() in mounts


def test_network_policy_admits_only_envoy_to_the_grpc_port(
    default_objects: list[dict[str, Any]],
) -> None:
    np = one(default_objects, "NetworkPolicy")
    router = one(default_objects, "StatefulSet", "-router")["spec"]["template"]["metadata"][
        "labels"
    ]
    envoy = one(default_objects, "Deployment", "-envoy")["spec"]["template"]["metadata"]["labels"]
    sel = np["spec"]["podSelector"]["matchLabels"]
    assert selects(sel, router) and not selects(sel, envoy)
    assert np["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = np["spec"]["ingress"]
    assert rule["ports"] == [{"port": "grpc", "protocol": "TCP"}]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}  # same namespace only
    assert selects(peer["podSelector"]["matchLabels"], envoy)
    assert not selects(peer["podSelector"]["matchLabels"], router)


def test_network_policy_opens_metrics_only_to_listed_peers() -> None:
    objs = render(VARIANTS["everything-on"])
    np = one(objs, "NetworkPolicy")
    by_port = {r["ports"][0]["port"]: r["from"] for r in np["spec"]["ingress"]}
    assert set(by_port) == {"grpc", "metrics"}
    assert by_port["metrics"] == VARIANTS["everything-on"]["networkPolicy"]["metricsFrom"]


def test_token_secret_given_generated_or_existing() -> None:
    import base64

    given = one(render({"auth": {"token": "t" * 32}}), "Secret")
    assert base64.b64decode(given["data"]["token"]).decode() == "t" * 32
    generated = {base64.b64decode(one(render(), "Secret")["data"]["token"]) for _ in range(2)}
    assert all(len(t) == 48 for t in generated) and len(generated) == 2  # random per install
    assert not [o for o in render({"auth": {"existingSecret": "x"}}) if o["kind"] == "Secret"]


def test_grafana_dashboards_configmap_holds_every_dashboard(
    default_objects: list[dict[str, Any]],
) -> None:
    cm = one(default_objects, "ConfigMap", "-dashboards")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    files = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
    assert files and sorted(cm["data"]) == [f.name for f in files]
    for f in files:
        assert json.loads(cm["data"][f.name]) == json.loads(f.read_text())


def test_inference_pool_names_the_router_service_as_endpoint_picker() -> None:
    objs = render(VARIANTS["everything-on"])
    pool = one(objs, "InferencePool")
    svc = one(objs, "Service", "-router")
    ref = pool["spec"]["endpointPickerRef"]
    assert ref["name"] == svc["metadata"]["name"]
    assert ref["port"]["number"] in {p["port"] for p in svc["spec"]["ports"]}
    assert ref["failureMode"] == "FailOpen"


def test_bad_discovery_values_fail_rendering_with_the_value_named() -> None:
    import helm_python as helm

    with pytest.raises(helm.HelmError, match=r"discovery\.targetPort is required"):
        render({"discovery": {"kind": "pods", "selector": {"app": "x"}}})
    with pytest.raises(helm.HelmError, match=r"discovery\.kind"):
        render({"discovery": {"kind": "nodes"}})
    with pytest.raises(helm.HelmError, match=r"metrics\.expose"):
        render({"serviceMonitor": {"enabled": True}})


# --- RBAC against what the discovery code calls ----------------------------------------------

_DISCOVERY_VALUES = {
    "endpointslices": {"kind": "endpointslices", "service": "vllm"},
    "pods": {"kind": "pods", "selector": {"app": "vllm"}, "targetPort": 8000},
    "inferencepool": {"kind": "inferencepool", "inferencePool": "pool"},
}


def _seed(api: kube_fake.FakeKubeAPI, ns: str) -> None:
    api.put(
        "endpointslices",
        kube_fake.endpoint_slice(
            "vllm-1", "vllm", 8000, [kube_fake.slice_endpoint("10.0.0.1", "p1", "u1")], namespace=ns
        ),
    )
    api.put("pods", kube_fake.pod_object("p1", "10.0.0.1", {"app": "vllm"}, namespace=ns, uid="u1"))
    api.put(
        "inferencepools", kube_fake.inference_pool("pool", {"app": "vllm"}, [8000], namespace=ns)
    )


def _requests_made(
    kind_values: dict[str, Any], tmp_path: Path, ns: str
) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) of every request the real discovery code sends for the
    chart's discovery config, to the fake API server (it stands in for a kube-apiserver)."""
    objs = render({"discovery": kind_values}, namespace=ns)
    section = router_cfg(objs, tmp_path).discovery.kubernetes

    async def run() -> list[str]:
        api = kube_fake.FakeKubeAPI(bookmark_interval_s=0.2)
        url = await api.start()
        _seed(api, ns)
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "fake", "cluster": {"server": url}}],
                    "users": [{"name": "u", "user": {"token": "x"}}],
                    "contexts": [
                        {"name": "c", "context": {"cluster": "fake", "user": "u", "namespace": ns}}
                    ],
                    "current-context": "c",
                }
            )
        )
        # In a pod the namespace comes from the service account (the release namespace).
        disc = KubernetesDiscovery(
            section.model_copy(update={"kubeconfig": kubeconfig, "namespace": ns})
        )
        stop = asyncio.Event()
        task = asyncio.create_task(disc.run(stop))
        try:
            for _ in range(500):
                if disc.loaded and disc.pods and any("watch=" in r for r in api.requests):
                    break
                await asyncio.sleep(0.01)
            assert disc.loaded and disc.pods, disc.last_error
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
            await api.stop()
        return api.requests

    made = set()
    for req in asyncio.run(run()):
        url = urlsplit(req.split(" ", 1)[1])
        m = re.match(
            r"^/(?:api/v1|apis/(?P<group>[^/]+)/v1)/namespaces/(?P<ns>[^/]+)/(?P<res>[^/]+)$",
            url.path,
        )
        assert m, req
        assert m["ns"] == ns, req  # only the namespace the Role lives in
        watch = parse_qs(url.query).get("watch", [""])[0] in ("1", "true", "True")
        made.add((m["group"] or "", m["res"], "watch" if watch else "list"))
    return made


@pytest.mark.parametrize("kind", sorted(_DISCOVERY_VALUES))
def test_role_grants_exactly_what_discovery_requests(kind: str, tmp_path: Path) -> None:
    ns = "inference"
    made = _requests_made(_DISCOVERY_VALUES[kind], tmp_path, ns)
    objs = render({"discovery": _DISCOVERY_VALUES[kind]}, namespace=ns)
    role = one(objs, "Role")
    granted = {
        (g, r, v)
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    assert made == granted, f"discovery requested {sorted(made)}, Role grants {sorted(granted)}"
    assert role["metadata"]["namespace"] == ns
    binding = one(objs, "RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    sa = one(objs, "ServiceAccount")
    router = one(objs, "StatefulSet", "-router")
    assert pod_spec(router)["serviceAccountName"] == sa["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": ns}
    ]
    assert not [o for o in objs if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]


def test_role_moves_to_the_watched_namespace() -> None:
    objs = render({"discovery": {"namespace": "models"}})
    assert one(objs, "Role")["metadata"]["namespace"] == "models"
    assert one(objs, "RoleBinding")["subjects"][0]["namespace"] == "router-ext"


# --- probes against the router's real health services ----------------------------------------


async def _health(port: int, service: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            resp = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2
            )
        except grpc.aio.AioRpcError as e:
            return -int(e.code().value[0])  # NOT_FOUND: the router does not know the service
        return int(resp.status)


async def test_probes_name_health_services_the_router_serves(
    default_objects: list[dict[str, Any]], tmp_path: Path
) -> None:
    """With no pod discovered yet, the liveness service answers SERVING (an empty fleet must not
    restart routers) and the readiness service NOT_SERVING (not NOT_FOUND)."""
    c = pod_spec(one(default_objects, "StatefulSet", "-router"))["containers"][0]
    ready_svc = c["readinessProbe"]["grpc"]["service"]
    live_svc = c["livenessProbe"]["grpc"]["service"]
    cfg = RouterConfig.model_validate(
        {
            "base_dir": str(tmp_path),
            "router": {"grpc": {"port": free_port()}, "admin": {"port": 0}, "metrics": {"port": 0}},
            "discovery": {"pods_file": str(tmp_path / "none.yaml")},
        }
    )
    app = RouterApp(cfg, write_eds=False)
    await app.start()
    try:
        port = app.grpc_port
        assert await _health(port, live_svc) == health_pb2.HealthCheckResponse.SERVING
        assert await _health(port, ready_svc) == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await app.stop()
