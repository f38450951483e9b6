"""GPU series in dcgm-exporter's shape: the same metric names, units and labels as NVIDIA's
dcgm-exporter with its default counters (etc/default-counters.csv), so dashboards built for it
work on Shoal unchanged.

Labels: gpu (index), UUID, device ("nvidia<index>"), modelName, Hostname, GPU_I_PROFILE and GPU_I_ID
(MIG instance; empty = the whole GPU, i.e. absent in Prometheus), and where Shoal jobs hold the GPU
`job_id` and `team` (dcgm-exporter adds pod/namespace the same way). A GPU shared by several jobs
carries one series whose job_id/team are the comma-joined ids/teams (sorted), so sums over GPUs
never double-count; per-job numbers are in `shoal_job_gpu_*` (monitoring.metrics).

Differences from dcgm-exporter, on purpose: its counter fields (TOTAL_ENERGY_CONSUMPTION, the ECC
totals) are exposed as gauges here (prometheus-client would append `_total` to a counter's name,
breaking name compatibility; PromQL's rate()/increase() work on either). `promtool check metrics`
flags the camelCase label names (modelName, UUID, Hostname, GPU_I_*) — these are dcgm-exporter's
and are kept for compatibility (tests/monitoring/test_promtool.py allows exactly those).
"""
from __future__ import annotations

from typing import Iterable, Mapping

from monitoring.exposition import counter, gauge, label_string

from monitoring.gpu import GpuReading

DCGM_LABELS = ["gpu", "UUID", "device", "modelName", "Hostname", "GPU_I_PROFILE", "GPU_I_ID", "job_id", "team"]

# name, help (dcgm-exporter's wording and unit), reading attribute
_FIELDS = [
    ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", "utilization_pct"),
    ("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", "memory_used_mib"),
    ("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).", "memory_free_mib"),
    ("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", "power_w"),
    ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "Total energy consumption since boot (in mJ).", "energy_mj"),
    ("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", "temperature_c"),
    ("DCGM_FI_DEV_MEMORY_TEMP", "Memory temperature (in C).", "memory_temperature_c"),
    ("DCGM_FI_DEV_SM_CLOCK", "SM clock frequency (in MHz).", "sm_clock_mhz"),
    ("DCGM_FI_DEV_MEM_CLOCK", "Memory clock frequency (in MHz).", "mem_clock_mhz"),
    ("DCGM_FI_DEV_XID_ERRORS", "Value of the last XID error encountered.", "last_xid"),
    ("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", "Total number of single-bit volatile ECC errors.", "ecc_sbe_volatile"),
    ("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "Total number of double-bit volatile ECC errors.", "ecc_dbe_volatile"),
    ("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", "Number of remapped rows for correctable errors.",
     "remapped_rows_correctable"),
    ("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "Number of remapped rows for uncorrectable errors.",
     "remapped_rows_uncorrectable"),
    ("DCGM_FI_DEV_ROW_REMAP_FAILURE", "Whether remapping of rows has failed.", "row_remap_failure"),
]

_label_cache: dict[tuple[str, ...], str] = {}  # label values -> rendered label string

Holders = Mapping[tuple[str, int], list[tuple[int, str]]]  # (node_id, gpu index) -> [(job_id, team)]


def holder_labels(holders: Holders, node_id: str, index: int) -> tuple[str, str]:
    held = sorted(holders.get((node_id, index), ()))
    if not held:
        return "", ""
    return ",".join(str(j) for j, _ in held), ",".join(sorted({t for _, t in held}))


def gpu_families(readings: Mapping[str, tuple[str, list[GpuReading]]], holders: Holders) -> Iterable:
    """DCGM_FI_DEV_* families plus Shoal's per-GPU XID counter and health gauge.
    `readings`: node_id -> (hostname, that node's readings)."""
    fams = {name: gauge(name, help_, DCGM_LABELS) for name, help_, _ in _FIELDS}
    xids = counter("shoal_gpu_xid_errors", "XID events seen on the GPU since its reader started",
                               labels=["node", "gpu", "uuid", "model"])
    healthy = gauge("shoal_gpu_healthy", "1 if the GPU is healthy (no critical XID, no uncorrected "
                                "ECC error, no failed row remap), else 0", ["node", "gpu", "uuid", "model"])
    procs = gauge("shoal_gpu_foreign_memory_bytes", "GPU memory held by processes Shoal does not "
                              "own (known only where NVML reports per-process memory)",
                              labels=["node", "gpu", "model"])
    for node_id, (host, node_readings) in readings.items():
        for r in node_readings:
            jid, team = holder_labels(holders, node_id, r.index)
            lv = [str(r.index), r.uuid, f"nvidia{r.index}", r.model, host, "", "", jid, team]
            ls = _label_cache.get(tuple(lv))  # once per GPU, shared by its fields
            if ls is None:
                if len(_label_cache) > 100_000:  # bounded: GPUs x holder combinations seen lately
                    _label_cache.clear()
                ls = _label_cache[tuple(lv)] = label_string(DCGM_LABELS, lv)
            for name, _, attr in _FIELDS:
                v = getattr(r, attr)
                if v is not None:
                    fams[name].add_rendered(ls, lv, v)
            for m in r.mig_devices:  # MIG instances: memory per instance, as dcgm-exporter does
                mlv = [str(r.index), m.uuid, f"nvidia{r.index}", r.model, host, m.profile,
                       str(m.gpu_instance_id), "", ""]
                fams["DCGM_FI_DEV_FB_USED"].add_metric(mlv, m.memory_used_mib)
                fams["DCGM_FI_DEV_FB_FREE"].add_metric(mlv, max(m.memory_total_mib - m.memory_used_mib, 0))
            short = [host, str(r.index), r.uuid, r.model]
            xids.add_metric(short, r.xid_errors)
            healthy.add_metric(short, 1.0 if r.healthy else 0.0)
            foreign = sum(p.used_memory_mib or 0 for p in r.processes if p.job_id is None)
            if any(p.job_id is not None for p in r.processes) or not holders.get((node_id, r.index)):
                procs.add_metric([host, str(r.index), r.model], foreign * 2**20)
    yield from fams.values()
    yield from (xids, healthy, procs)
