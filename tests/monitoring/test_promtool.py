"""promtool (shipped with Debian's prometheus): our exposition lints clean bar the dcgm-exporter
label names kept for compatibility; alert rules pass their unit tests; the shipped Prometheus
config is valid; and the real Prometheus loaded the rules and scraped every exporter."""
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
PROM = REPO / "deploy/prometheus"
# dcgm-exporter's label names (camelCase / upper case) are kept so DCGM dashboards work unchanged.
DCGM_LABEL_LINT = "label names should be written in 'snake_case' not 'camelCase'"
# OpenCost's metric name, kept so OpenCost queries work.
OPENCOST_LINT = 'node_gpu_count non-histogram and non-summary metrics should not have "_count" suffix'


def documented(p: str) -> bool:
    return (p.startswith("DCGM_FI_DEV_") and DCGM_LABEL_LINT in p) or p == OPENCOST_LINT


def promtool() -> str:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool is not on PATH: `make test` installs Debian's prometheus package")
    return exe


def lint(text: str) -> list[str]:
    r = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True, text=True)
    return [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]


def test_exposition_lints_clean_except_documented_dcgm_label_names(cluster):
    text = httpx.get(f"http://127.0.0.1:{cluster.port}/metrics").text
    problems = lint(text)
    unexpected = [p for p in problems if not documented(p)]
    assert unexpected == [], "\n".join(unexpected)
    assert any(p.startswith("DCGM_FI_DEV_GPU_UTIL") for p in problems)  # the lint ran and saw them
    agent = httpx.get(f"http://127.0.0.1:{cluster.agent_b_port}/metrics").text
    assert [p for p in lint(agent) if not documented(p)] == []


def test_lint_catches_a_bad_metric():  # guards the test above against a promtool that says nothing
    assert any("counter metrics should have \"_total\" suffix" in p
               for p in lint("# HELP shoal_bad a\n# TYPE shoal_bad counter\nshoal_bad 1\n"))


def test_alert_rules_unit_tests():
    r = subprocess.run([promtool(), "test", "rules", "alerts_test.yml"], cwd=PROM, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    import yaml

    rules = {x["alert"] for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for x in g["rules"]}
    tested = {t["alertname"] for case in yaml.safe_load((PROM / "alerts_test.yml").read_text())["tests"]
              for t in case.get("alert_rule_test", [])}
    assert rules == tested, f"alerts without a unit test: {rules - tested}"
    assert {"ShoalGpuAllocatedIdle", "ShoalTeamOverBudget", "ShoalNodeXidErrors", "ShoalJobPendingTooLong",
            "ShoalSchedulerDown"} <= rules


def test_shipped_prometheus_config_is_valid():
    r = subprocess.run([promtool(), "check", "config", "prometheus.yml"], cwd=PROM, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_real_prometheus_loaded_rules_and_sees_live_alert_inputs(prometheus, cluster):
    groups = prometheus.http.get("/api/v1/rules").json()["data"]["groups"]
    assert {r["name"] for g in groups for r in g["rules"]} >= {"ShoalTeamOverBudget", "ShoalNodeXidErrors"}
    # beta's budget is a hundredth of a cent: it is over budget, alpha is not
    left = {s["metric"]["team"]: float(s["value"][1]) for s in prometheus.query("shoal_team_budget_remaining_usd")}
    assert left["beta"] < 0 < left["alpha"]
    # the XID injected on node-a GPU 3 is visible to the XID alert's expression
    assert prometheus.query('DCGM_FI_DEV_XID_ERRORS{Hostname="node-a", gpu="3"} == 79')
    assert prometheus.query("shoal_gpu_healthy == 0")[0]["metric"]["gpu"] == "3"
