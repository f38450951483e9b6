"""deploy/ files that cannot run here (Grafana, docker compose, KubeRay) are at least
well-formed and agree with each other; Prometheus files are checked by promtool elsewhere."""
import json
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _yaml_docs(path: Path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def test_every_yaml_and_json_file_parses():
    files = list(DEPLOY.rglob("*.yml")) + list(DEPLOY.rglob("*.yaml")) + list(DEPLOY.rglob("*.json"))
    assert len(files) >= 12
    for f in files:
        if f.suffix == ".json":
            json.loads(f.read_text())
        else:
            assert _yaml_docs(f), f


def test_grafana_provisioning_points_at_the_dashboards():
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus"
    prov = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/shoal.yml").read_text())
    path = prov["providers"][0]["options"]["path"]
    compose = yaml.safe_load((DEPLOY / "compose/docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"../grafana/dashboards:{path}:ro" in mounts
    assert "../grafana/provisioning:/etc/grafana/provisioning:ro" in mounts
    for f in (DEPLOY / "grafana/dashboards").glob("*.json"):
        d = json.loads(f.read_text())
        assert d["uid"] and d["panels"] and d["schemaVersion"] >= 36


def test_compose_wires_prometheus_to_shoal_and_alerts():
    compose = yaml.safe_load((DEPLOY / "compose/docker-compose.yml").read_text())
    assert set(compose["services"]) == {"shoal", "prometheus", "grafana"}
    prom = yaml.safe_load((DEPLOY / "compose/prometheus.yml").read_text())
    assert prom["scrape_configs"][0]["static_configs"][0]["targets"] == ["shoal:8470"]
    assert "../prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in compose["services"]["prometheus"]["volumes"]
    assert prom["rule_files"] == ["/etc/prometheus/alerts.yml"]


def test_kuberay_manifest_runs_a_node_agent_on_every_gpu_worker():
    docs = _yaml_docs(DEPLOY / "kuberay/raycluster.yaml")
    rc = next(d for d in docs if d["kind"] == "RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    for group in rc["spec"]["workerGroupSpecs"]:
        containers = group["template"]["spec"]["containers"]
        agent = next(c for c in containers if c["name"] == "shoal-node-agent")
        assert agent["command"][:3] == ["python", "-m", "monitoring.agent"]
        port = int(agent["command"][agent["command"].index("--port") + 1])
        assert group["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    cfg = next(d for d in docs if d["kind"] == "ConfigMap")
    from scheduler.spec import ClusterConfig

    ClusterConfig.model_validate(yaml.safe_load(cfg["data"]["cluster.yaml"]))  # a valid cluster config
