"""Every panel query of every shipped Grafana dashboard, with its template variables resolved the
way Grafana would (All -> '.*', else the first value Prometheus has), returns data from a real
Prometheus that scraped a fake-GPU cluster with jobs. (No Grafana server can be installed here;
this is the test of what Grafana would show.)"""
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((REPO / "deploy/grafana/dashboards").glob("*.json"))
GRAFANA_MACROS = {"$__rate_interval": "5m", "$__interval": "15s", "$__range": "1h"}  # a 6 h dashboard


def _substitute(expr: str, values: dict[str, str]) -> str:
    for k, v in GRAFANA_MACROS.items():
        expr = expr.replace(k, v)
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace(f"${{{name}}}", values[name]).replace(f"${name}", values[name])
    return expr


def resolve_variables(dashboard: dict, prom) -> dict[str, str]:
    values: dict[str, str] = {}
    for var in dashboard["templating"]["list"]:
        if var["type"] == "datasource":
            continue
        if var.get("includeAll"):
            values[var["name"]] = var["allValue"]
            continue
        m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", var["query"]["query"])
        assert m, f"variable {var['name']}: unsupported query {var['query']['query']}"
        # values seen in the last seconds, as Grafana lists them for a time range ending now
        series = prom.series(_substitute(m.group(1), values), last_s=3)
        found = sorted({s[m.group(2)] for s in series if m.group(2) in s})
        assert found, f"variable {var['name']}: no values for {var['query']['query']}"
        values[var["name"]] = found[0]
    return values


def _panels():
    for path in DASHBOARDS:
        d = json.loads(path.read_text())
        for p in d["panels"]:
            for t in p["targets"]:
                yield pytest.param(path.name, p["title"], t["expr"], id=f"{path.stem}:{p['title']}:{t['refId']}")


def test_dashboards_are_built_from_the_script_and_well_formed(tmp_path):
    assert {p.name for p in DASHBOARDS} == {"shoal-cluster.json", "shoal-teams.json", "shoal-job.json",
                                            "shoal-gpu-health.json"}
    before = {p.name: p.read_text() for p in DASHBOARDS}
    subprocess.run([sys.executable, str(REPO / "deploy/grafana/build_dashboards.py")], check=True,
                   capture_output=True)
    after = {p.name: p.read_text() for p in DASHBOARDS}
    assert before == after, "dashboards are stale: run python deploy/grafana/build_dashboards.py"
    for path in DASHBOARDS:
        d = json.loads(path.read_text())
        names = [v["name"] for v in d["templating"]["list"]]
        assert {"datasource", "cluster"} <= set(names), path.name
        assert len({p["id"] for p in d["panels"]}) == len(d["panels"])
        for p in d["panels"]:
            assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]
            assert p["datasource"]["uid"] == "${datasource}"
            for t in p["targets"]:  # every query is scoped to the selected cluster
                assert "$cluster" in t["expr"], (path.name, p["title"])


@pytest.mark.parametrize("dashboard,title,expr", list(_panels()))
def test_every_panel_query_returns_data(prometheus, dashboard, title, expr):
    d = json.loads((REPO / "deploy/grafana/dashboards" / dashboard).read_text())
    q = _substitute(expr, resolve_variables(d, prometheus))
    assert "$" not in q, q
    result = prometheus.query(q)
    assert result, f"{dashboard} / {title}: no series for {q}"
    values = [float(s["value"][1]) for s in result]
    assert any(math.isfinite(v) for v in values), f"{dashboard} / {title}: only NaN/Inf for {q}: {values}"
