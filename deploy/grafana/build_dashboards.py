"""Writes Shoal's Grafana dashboards (deploy/grafana/dashboards/*.json) from the definitions below.

    python deploy/grafana/build_dashboards.py

The JSON files are committed (Grafana provisions them from disk); tests/monitoring checks they are
up to date with this script and evaluates every panel query against a real Prometheus.
Template variables: datasource, cluster (the `cluster` target label set in the scrape config),
node, team, and job_id on the job dashboard. Panel queries use `$__rate_interval`/`$__range`.
"""
from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
C = 'cluster=~"$cluster"'


def _var(name: str, query: str, *, all_: bool = True, label: str | None = None) -> dict:
    return {
        "name": name, "label": label or name, "type": "query", "datasource": DS,
        "query": {"query": query, "refId": f"var-{name}"}, "definition": query,
        "refresh": 2, "sort": 1, "includeAll": all_, "multi": all_, **({"allValue": ".*"} if all_ else {}),
        "current": {},
    }


DATASOURCE_VAR = {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
                  "current": {}, "hide": 0}
CLUSTER_VAR = _var("cluster", 'label_values(up{job="shoal"}, cluster)')
NODE_VAR = _var("node", f"label_values(DCGM_FI_DEV_GPU_UTIL{{{C}}}, Hostname)")
TEAM_VAR = _var("team", f"label_values(shoal_team_quota_nominal_gpus{{{C}}}, team)")
JOB_VAR = _var("job_id", f'label_values(shoal_job_gpus{{{C}, team=~"$team"}}, job_id)', all_=False, label="Job")


def panel(title: str, *targets: tuple[str, str], kind: str = "timeseries", unit: str = "short",
          w: int = 12, h: int = 8, description: str = "") -> dict:
    p = {
        "type": kind, "title": title, "description": description, "datasource": DS,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "gridPos": {"w": w, "h": h},
        "targets": [{"datasource": DS, "expr": expr, "legendFormat": legend, "refId": chr(65 + i)}
                    for i, (expr, legend) in enumerate(targets)],
    }
    if kind == "heatmap":
        p["options"] = {"calculate": False, "yAxis": {"unit": "percent"}}
        for t in p["targets"]:
            t["format"] = "time_series"
    return p


def dashboard(uid: str, title: str, variables: list[dict], panels: list[dict], description: str) -> dict:
    x = y = 0
    for i, p in enumerate(panels, start=1):  # lay panels out left to right, top to bottom
        w, h = p["gridPos"]["w"], p["gridPos"]["h"]
        if x + w > 24:
            x, y = 0, y + h
        p["id"], p["gridPos"] = i, {"x": x, "y": y, "w": w, "h": h}
        x += w
    return {
        "uid": uid, "title": title, "description": description, "tags": ["shoal"], "editable": True,
        "schemaVersion": 39, "version": 1, "refresh": "30s", "timezone": "browser",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [DATASOURCE_VAR, *variables]},
        "annotations": {"list": []}, "panels": panels,
    }


N = f'{C}, Hostname=~"$node"'
NN = f'{C}, node=~"$node"'
T = f'{C}, team=~"$team"'
J = f'{C}, job_id="$job_id"'

DASHBOARDS = {
    "shoal-cluster.json": dashboard("shoal-cluster", "Shoal / Cluster overview", [CLUSTER_VAR, NODE_VAR], [
        panel("GPUs by state", (f"sum by (state) (shoal_gpus{{{NN}}})", "{{state}}"), kind="stat", w=8),
        panel("Allocated GPUs below 5 % utilization", (f"sum(shoal_gpus_allocated_idle{{{NN}}})", "idle"),
              kind="stat", w=8),
        panel("Shared GPUs", (f"sum(shoal_gpus_shared{{{NN}}})", "shared"), kind="stat", w=8),
        panel("GPU utilization", (f"DCGM_FI_DEV_GPU_UTIL{{{N}}}", "{{Hostname}} gpu {{gpu}}"), kind="heatmap",
              unit="percent", w=24),
        panel("Queue length by team", (f"sum by (team) (shoal_queue_jobs{{{C}}})", "{{team}}")),
        panel("Pending jobs by reason", (f"sum by (reason) (shoal_queue_pending_jobs{{{C}}})", "{{reason}}")),
        panel("Jobs by state", (f"sum by (state) (shoal_jobs{{{C}}})", "{{state}}")),
        panel("GPU memory used", (f"sum by (Hostname) (DCGM_FI_DEV_FB_USED{{{N}}}) * 2^20", "{{Hostname}}"),
              unit="bytes"),
        panel("Queue wait (p50, p90)",
              (f"histogram_quantile(0.5, sum by (le) (rate(shoal_job_wait_seconds_bucket{{{C}}}[$__rate_interval])))",
               "p50"),
              (f"histogram_quantile(0.9, sum by (le) (rate(shoal_job_wait_seconds_bucket{{{C}}}[$__rate_interval])))",
               "p90"), unit="s"),
        panel("Job completion time (p50, p90)",
              (f"histogram_quantile(0.5, sum by (le) (rate(shoal_job_completion_seconds_bucket{{{C}}}[$__rate_interval])))",
               "p50"),
              (f"histogram_quantile(0.9, sum by (le) (rate(shoal_job_completion_seconds_bucket{{{C}}}[$__rate_interval])))",
               "p90"), unit="s"),
        panel("Preemptions and retries",
              (f"sum by (team) (increase(shoal_job_preemptions_total{{{C}}}[$__range]))", "preempted {{team}}"),
              (f"sum by (team) (increase(shoal_job_retries_total{{{C}}}[$__range]))", "retried {{team}}")),
        panel("Scheduler cycle (p99)",
              (f"histogram_quantile(0.99, sum by (le) (rate(shoal_scheduler_cycle_duration_seconds_bucket{{{C}}}"
               "[$__rate_interval])))", "p99"), unit="s"),
    ], "GPUs by state, utilization, queue and scheduler health"),

    "shoal-teams.json": dashboard("shoal-teams", "Shoal / Teams", [CLUSTER_VAR, TEAM_VAR], [
        panel("Quota vs usage (GPUs)", (f"shoal_team_quota_nominal_gpus{{{T}}}", "{{team}} nominal ({{flavor}})"),
              (f"shoal_team_gpus_used{{{T}}}", "{{team}} used ({{flavor}})")),
        panel("Borrowed and lent GPUs", (f"shoal_team_gpus_borrowed{{{T}}}", "{{team}} borrowed"),
              (f"shoal_team_gpus_lent{{{T}}}", "{{team}} lent")),
        panel("Spend rate (USD/h)", (f"sum by (team) (rate(shoal_team_gpu_cost_usd_total{{{T}}}[$__rate_interval])) "
                                     "* 3600", "{{team}}"), unit="currencyUSD"),
        panel("Spend in the time range", (f"sum by (team) (increase(shoal_team_gpu_cost_usd_total{{{T}}}[$__range]))",
                                          "{{team}}"), kind="bargauge", unit="currencyUSD"),
        panel("Budget burn (spent / budget this period)",
              (f"shoal_team_spend_usd{{{T}}} / shoal_team_budget_usd{{{T}}}", "{{team}} ({{period}})"),
              kind="gauge", unit="percentunit"),
        panel("Budget remaining", (f"shoal_team_budget_remaining_usd{{{T}}}", "{{team}}"), unit="currencyUSD"),
        panel("GPU-hours in the time range",
              (f"sum by (team) (increase(shoal_team_gpu_seconds_total{{{T}}}[$__range])) / 3600", "{{team}}"),
              kind="bargauge"),
        panel("Jobs by state", (f"sum by (team, state) (shoal_jobs{{{T}}})", "{{team}} {{state}}")),
        panel("GPU price (USD per GPU-hour)", (f"node_gpu_hourly_cost{{{C}}}", "{{node}} {{instance_type}}"),
              kind="table", unit="currencyUSD"),
        panel("Queue wait by team (p90)",
              (f"histogram_quantile(0.9, sum by (le, team) (rate(shoal_job_wait_seconds_bucket{{{T}}}"
               "[$__rate_interval])))", "{{team}}"), unit="s"),
    ], "Quota against usage, borrowing, spend and budget burn per team"),

    "shoal-job.json": dashboard("shoal-job", "Shoal / Job detail", [CLUSTER_VAR, TEAM_VAR, JOB_VAR], [
        panel("Loss", (f"shoal_job_train_loss{{{J}}}", "train"), (f"shoal_job_eval_loss{{{J}}}", "eval")),
        panel("Throughput (tokens/s)", (f"shoal_job_tokens_per_second{{{J}}}", "tokens/s")),
        panel("Progress", (f"shoal_job_step{{{J}}} / shoal_job_steps{{{J}}}", "done"), kind="gauge",
              unit="percentunit", w=6),
        panel("MFU", (f"shoal_job_mfu_ratio{{{J}}}", "MFU"), kind="stat", unit="percentunit", w=6),
        panel("Cost so far", (f"shoal_job_cost_usd{{{J}}}", "USD"), kind="stat", unit="currencyUSD", w=6),
        panel("GPUs", (f"shoal_job_gpus{{{J}}}", "{{node}} {{flavor}}"), kind="stat", w=6),
        panel("GPU memory: used vs reserved", (f"shoal_job_gpu_memory_used_bytes{{{J}}}", "used"),
              (f"shoal_job_gpu_memory_reserved_bytes{{{J}}}", "reserved"), unit="bytes"),
        panel("GPU utilization", (f"shoal_job_gpu_utilization_ratio{{{J}}}", "job"), unit="percentunit"),
        panel("Its GPUs (DCGM)", (f'DCGM_FI_DEV_GPU_UTIL{{{C}, job_id=~"(.*,)?$job_id(,.*)?"}}',
                                  "{{Hostname}} gpu {{gpu}}"), unit="percent", w=24),
    ], "Loss, throughput, GPU memory and cost of one job"),

    "shoal-gpu-health.json": dashboard("shoal-gpu-health", "Shoal / GPU health", [CLUSTER_VAR, NODE_VAR], [
        panel("Unhealthy GPUs", (f"sum by (node) (1 - shoal_gpu_healthy{{{NN}}})", "{{node}}"), kind="stat", w=8),
        panel("XID events in the time range",
              (f"sum by (node) (increase(shoal_gpu_xid_errors_total{{{NN}}}[$__range]))", "{{node}}"),
              kind="stat", w=8),
        panel("Node agents up", (f"shoal_agent_reader_up{{{C}}}", "{{instance}}"), kind="stat", w=8),
        panel("Last XID code", (f"DCGM_FI_DEV_XID_ERRORS{{{N}}}", "{{Hostname}} gpu {{gpu}}"), kind="table"),
        panel("ECC errors (volatile)", (f"DCGM_FI_DEV_ECC_DBE_VOL_TOTAL{{{N}}}", "{{Hostname}} gpu {{gpu}} DBE"),
              (f"DCGM_FI_DEV_ECC_SBE_VOL_TOTAL{{{N}}}", "{{Hostname}} gpu {{gpu}} SBE")),
        panel("Remapped rows", (f"DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS{{{N}}}", "{{Hostname}} gpu {{gpu}} uncorr."),
              (f"DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS{{{N}}}", "{{Hostname}} gpu {{gpu}} corr.")),
        panel("Temperature", (f"DCGM_FI_DEV_GPU_TEMP{{{N}}}", "{{Hostname}} gpu {{gpu}}"), unit="celsius"),
        panel("Power", (f"DCGM_FI_DEV_POWER_USAGE{{{N}}}", "{{Hostname}} gpu {{gpu}}"), unit="watt"),
        panel("Average power from energy",
              (f"sum by (Hostname) (rate(DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{{{N}}}[$__rate_interval])) / 1000",
               "{{Hostname}}"), unit="watt"),
        panel("SM clock", (f"DCGM_FI_DEV_SM_CLOCK{{{N}}}", "{{Hostname}} gpu {{gpu}}"), unit="rotmhz"),
        panel("Memory held by foreign processes", (f"shoal_gpu_foreign_memory_bytes{{{NN}}}", "{{node}} gpu {{gpu}}"),
              unit="bytes"),
        panel("Framebuffer free", (f"DCGM_FI_DEV_FB_FREE{{{N}}} * 2^20", "{{Hostname}} gpu {{gpu}}"), unit="bytes"),
    ], "XID, ECC, temperature and power per GPU"),
}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, d in DASHBOARDS.items():
        (OUT / name).write_text(json.dumps(d, indent=2) + "\n")
        print(f"wrote {OUT / name} ({len(d['panels'])} panels)")


if __name__ == "__main__":
    main()
