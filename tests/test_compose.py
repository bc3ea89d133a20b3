"""docker-compose.yml and deploy/compose/: everything checkable without Docker.

Docker cannot run here, so this checks what breaks a `docker compose up` silently: a file a
mount names is missing, a port or hostname disagrees between the compose file, the router
config, the rendered Envoy config and Prometheus, or the committed Envoy config is stale or
invalid for the Envoy version the compose file runs.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from router_ext.config import RouterConfig, load_config
from router_ext.envoy_adapter.envoy_config import (
    eds_path,
    envoy_dir,
    render_bootstrap_yaml,
    validate,
    write_eds_file,
)
from router_ext.fleet.snapshot import Pod
from router_ext.harness.envoy_proc import envoy_binary

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DEPLOY = ROOT / "deploy" / "compose"
ENVOY_IMAGE = "envoyproxy/envoy:v1.40.0"


def _compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return doc


def _cfg() -> RouterConfig:
    return load_config(DEPLOY / "router-ext.yaml")


def _mounts(svc: dict[str, Any]) -> dict[str, str]:
    """container path -> source (host path or volume name) for short-syntax volumes."""
    out = {}
    for v in svc.get("volumes", []):
        parts = v.split(":")
        out[parts[1]] = parts[0]
    return out


def _arg(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def _published(svc: dict[str, Any]) -> dict[int, str]:
    """container port -> host binding ip."""
    out = {}
    for p in svc.get("ports", []):
        ip, host_port, container_port = p.split(":")
        assert host_port == container_port
        out[int(container_port)] = ip
    return out


def test_compose_parses_and_every_referenced_file_exists() -> None:
    doc = _compose()
    services = doc["services"]
    assert set(services) == {"sim", "router", "envoy", "prometheus", "grafana"}
    assert (ROOT / "Dockerfile").is_file()
    named = set(doc["volumes"])
    for name, svc in services.items():
        if "build" in svc:
            assert (ROOT / svc["build"] / "Dockerfile").is_file(), name
        for target, source in _mounts(svc).items():
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: {source} -> {target} missing"
            else:
                assert source in named, f"{name}: undeclared volume {source}"
        for ip in _published(svc).values():
            assert ip == "127.0.0.1", f"{name}: published beyond loopback"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile.startswith("# ") and "FROM python:3.11-slim" in dockerfile
    assert "pip install ." in dockerfile


def test_envoy_image_is_the_tested_envoy_version() -> None:
    assert _compose()["services"]["envoy"]["image"] == ENVOY_IMAGE
    out = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True, timeout=30)
    assert "/1.40." in out.stdout, out.stdout


def test_committed_envoy_config_is_a_fresh_render() -> None:
    committed = (DEPLOY / "envoy.yaml").read_text()
    assert committed == render_bootstrap_yaml(_cfg()), (
        "regenerate: router-ext envoy-config -c deploy/compose/router-ext.yaml --stdout "
        "> deploy/compose/envoy.yaml"
    )


def test_ports_hostnames_and_paths_agree() -> None:
    doc = _compose()
    s = doc["services"]
    cfg = _cfg()
    envoy = yaml.safe_load((DEPLOY / "envoy.yaml").read_text())

    # Envoy reaches the router by its compose service name on the router's gRPC port.
    router_cluster = next(
        c for c in envoy["static_resources"]["clusters"] if c["name"] == "router_ext"
    )
    ep = router_cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    sock = ep["address"]["socket_address"]
    assert (sock["address"], sock["port_value"]) == ("router", cfg.router.grpc.port)
    assert "router" in s and cfg.router.grpc.host == "0.0.0.0"

    # Listener and admin: what the compose file publishes.
    listener = envoy["static_resources"]["listeners"][0]["address"]["socket_address"]
    admin = envoy["admin"]["address"]["socket_address"]
    assert listener["port_value"] == cfg.envoy.listener.port
    assert set(_published(s["envoy"])) == {listener["port_value"], admin["port_value"]}

    # Envoy's bootstrap and the EDS file: rendered/written by the router into one volume
    # mounted at the same directory in both containers; Envoy starts from that bootstrap.
    eds = eds_path(cfg)
    assert str(eds) in (DEPLOY / "envoy.yaml").read_text()
    out_dir = str(envoy_dir(cfg))
    assert eds.parent.parent == envoy_dir(cfg)
    router_m, envoy_m = _mounts(s["router"]), _mounts(s["envoy"])
    assert router_m[out_dir] == envoy_m[out_dir] == "envoy"
    assert s["envoy"]["command"][s["envoy"]["command"].index("-c") + 1] == out_dir + "/envoy.yaml"

    # The router container renders Envoy's config from its own config file, then serves it.
    assert s["router"]["entrypoint"] == ["sh", "-c"]
    script = s["router"]["command"][0].split()
    render, serve = script[: script.index("&&")], script[script.index("&&") + 1 :]
    assert render[:2] == ["router-ext", "envoy-config"] and _arg(render, "--out") == out_dir
    assert serve[:3] == ["exec", "router-ext", "serve"]
    conf_path = _arg(render, "--config")
    assert _arg(serve, "--config") == conf_path
    assert router_m[conf_path] == "./deploy/compose/router-ext.yaml"
    assert Path(conf_path).parent == cfg.base_dir

    # The token: in the router's own "secrets" volume (kept across re-creates), never in a
    # file the repository holds, and Envoy reads it only through the rendered bootstrap,
    # which is 0600, so Envoy runs as the router's user.
    assert cfg.router.auth.mode == "token"
    assert router_m[str(cfg.token_file.parent)] == "secrets"
    assert "secrets" not in envoy_m.values()
    assert "REDACTED:" in (DEPLOY / "envoy.yaml").read_text()
    assert s["envoy"]["user"] == "10001:10001"
    assert "--uid 10001" in (ROOT / "Dockerfile").read_text()

    # Discovery: the simulator writes the pods file the router reads, via the shared volume.
    sim_cmd = s["sim"]["command"]
    pods_file = Path(_arg(sim_cmd, "--pods-file"))
    assert pods_file == cfg.pods_file
    assert _mounts(s["sim"])[str(pods_file.parent)] == router_m[str(pods_file.parent)] == "pods"

    # The simulator binds its fixed compose IP (EDS endpoints must be IPs).
    sim_ip = _arg(sim_cmd, "--host")
    assert s["sim"]["networks"]["fleet"]["ipv4_address"] == sim_ip
    subnet = doc["networks"]["fleet"]["ipam"]["config"][0]["subnet"]
    assert sim_ip.rsplit(".", 1)[0] == subnet.rsplit(".", 1)[0]
    n_pods, base = int(_arg(sim_cmd, "--pods")), int(_arg(sim_cmd, "--base-port"))

    # Prometheus scrapes the router's metrics port, Envoy's admin, and every pod with a
    # `pod` label named as the simulator names them (the dashboards' $pod variable).
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert jobs["router-ext"]["static_configs"][0]["targets"] == [
        f"router:{cfg.router.metrics.port}"
    ]
    assert cfg.router.metrics.host == "0.0.0.0"
    assert jobs["envoy"]["metrics_path"] == "/stats/prometheus"
    assert jobs["envoy"]["static_configs"][0]["targets"] == [f"envoy:{admin['port_value']}"]
    pods = {sc["labels"]["pod"]: sc["targets"][0] for sc in jobs["vllm"]["static_configs"]}
    assert pods == {f"pod-{i}": f"{sim_ip}:{base + i}" for i in range(n_pods)}
    assert _mounts(s["prometheus"])["/etc/prometheus/prometheus.yml"] == (
        "./deploy/compose/prometheus.yml"
    )


def test_grafana_provisioning_is_mounted_where_it_points() -> None:
    s = _compose()["services"]["grafana"]
    m = _mounts(s)
    assert m["/etc/grafana/provisioning"] == "./grafana/provisioning"
    provider = yaml.safe_load(
        (ROOT / "grafana/provisioning/dashboards/router-ext.yaml").read_text()
    )["providers"][0]
    assert m[provider["options"]["path"]] == "./grafana/dashboards"
    ds = yaml.safe_load((ROOT / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    url = ds["datasources"][0]["url"]
    assert re.fullmatch(r"http://prometheus:9090", url)
    assert "prometheus" in _compose()["services"]
    home = s["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (ROOT / "grafana/dashboards" / Path(home).name).is_file()


def test_compose_envoy_config_passes_envoy_validate(tmp_path: Path) -> None:
    """`envoy --mode validate` on the committed file; only the EDS path is pointed at a tmp
    copy, because validation opens it and /etc/router-ext does not exist on this machine."""
    cfg = _cfg()
    eds = eds_path(cfg)
    local_eds = tmp_path / "eds" / "pods.yaml"
    write_eds_file(cfg, [Pod("172.28.0.10", 8001, name="pod-0")], local_eds)
    text = (DEPLOY / "envoy.yaml").read_text()
    adapted = text.replace(str(eds), str(local_eds)).replace(str(eds.parent), str(local_eds.parent))
    assert adapted != text
    path = tmp_path / "envoy.yaml"
    path.write_text(adapted)
    validate(path)
