"""Prometheus metrics, produced at scrape time from the store and the GPU readers (never stale).

GPU series use dcgm-exporter's names, units and labels (gpu, UUID, device, modelName, Hostname)
so existing DCGM dashboards work; where a Shoal job holds the GPU, `job_id` and `team` labels are
added (dcgm-exporter adds pod/namespace the same way). No label is called `job` or `instance`:
Prometheus would rename them on scrape. Cardinality: job ids appear only for running jobs.
"""
from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from monitoring.gpu import GpuReading
from scheduler.lifecycle import JobState


class ShoalCollector(Collector):
    def __init__(self, *, job_counts: Callable[[], dict[tuple[str, str], int]],
                 gpu_readings: Callable[[], dict[str, tuple[str, list[GpuReading]]]],
                 running_jobs: Callable[[], Iterable]):
        self._job_counts = job_counts
        self._gpu_readings = gpu_readings  # node_id -> (hostname, readings)
        self._running_jobs = running_jobs  # JobRecords holding GPUs

    def collect(self):
        running = list(self._running_jobs())  # one store read per scrape
        yield from self._jobs(running)
        yield from self._gpus(running)

    def _jobs(self, running: list):
        jobs = GaugeMetricFamily("shoal_jobs", "Jobs by state and team", labels=["state", "team"])
        counts = self._job_counts()
        teams = sorted({team for _, team in counts})
        for state in JobState:  # every state present, zeros included, so rates and sums are stable
            for team in teams:
                jobs.add_metric([state.value, team], counts.get((state.value, team), 0))
        yield jobs
        loss = GaugeMetricFamily("shoal_job_train_loss", "Latest training loss", labels=["job_id", "team"])
        tps = GaugeMetricFamily("shoal_job_tokens_per_second", "Training throughput, tokens/s",
                                labels=["job_id", "team"])
        step = GaugeMetricFamily("shoal_job_step", "Optimizer steps done", labels=["job_id", "team"])
        for job in running:
            p = job.progress or {}
            labels = [str(job.id), job.team]
            if "loss" in p:
                loss.add_metric(labels, float(p["loss"]))
            if "tokens_per_s" in p:
                tps.add_metric(labels, float(p["tokens_per_s"]))
            if "step" in p:
                step.add_metric(labels, float(p["step"]))
        yield from (loss, tps, step)

    def _gpus(self, running: list):
        labels = ["gpu", "UUID", "device", "modelName", "Hostname", "job_id", "team"]
        used = GaugeMetricFamily("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", labels=labels)
        free = GaugeMetricFamily("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).", labels=labels)
        util = GaugeMetricFamily("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", labels=labels)
        xid = GaugeMetricFamily("DCGM_FI_DEV_XID_ERRORS", "Value of the last XID error encountered.",
                                labels=labels)
        holders: dict[tuple[str, int], tuple[str, str]] = {}
        for job in running:
            if job.placement:
                for idx in job.placement["gpu_indices"]:
                    holders[(job.placement["node_id"], idx)] = (str(job.id), job.team)
        for node_id, (host, readings) in self._gpu_readings().items():
            for r in readings:
                jid, team = holders.get((node_id, r.index), ("", ""))
                lv = [str(r.index), r.uuid, f"nvidia{r.index}", r.model, host, jid, team]
                used.add_metric(lv, r.memory_used_mib)
                free.add_metric(lv, r.memory_free_mib)
                util.add_metric(lv, r.utilization_pct)
                xid.add_metric(lv, r.xid_errors)
        yield from (used, free, util, xid)


def build_registry(collector: ShoalCollector) -> tuple[CollectorRegistry, Histogram]:
    """A registry with Shoal's collector and the scheduler's own instrumentation."""
    registry = CollectorRegistry()
    registry.register(collector)
    cycle = Histogram("shoal_scheduler_cycle_duration_seconds", "Duration of one scheduling cycle",
                      registry=registry, buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
    return registry, cycle
