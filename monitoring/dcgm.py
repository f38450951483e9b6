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

from collections import defaultdict
from typing import Iterable, Mapping

from monitoring.exposition import TextFamily, esc, fmt

from monitoring.gpu import GpuReading

# label names of the DCGM series, in the order rendered (GPU_I_* only on MIG instances, job_id/team only
# where Shoal jobs hold the GPU)
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

Holders = Mapping[tuple[str, int], list[tuple[int, str]]]  # (node_id, gpu index) -> [(job_id, team)]
# One node's holders: ((gpu index, ((job_id, team), ...) sorted), ...) sorted; hashable, compared
# to decide whether a node's cached text is still right.
NodeHolders = tuple[tuple[int, tuple[tuple[int, str], ...]], ...]

IDLE_UTILIZATION_PCT = 5.0  # an allocated GPU below this utilization counts as idle

_XID = ("shoal_gpu_xid_errors", "XID events seen on the GPU since its reader started", "counter")
_HEALTHY = ("shoal_gpu_healthy", "1 if the GPU is healthy (no critical XID, no uncorrected ECC error, "
            "no failed row remap), else 0", "gauge")
_FOREIGN = ("shoal_gpu_foreign_memory_bytes", "GPU memory held by processes Shoal does not own (known only "
            "where NVML reports per-process memory)", "gauge")
# Per-GPU families (the DCGM ones, then Shoal's per-GPU health), and per-node allocation families:
# (name, help, type). Every node's text has a chunk (maybe empty) for each.
GPU_FAMILIES = [(name, help_, "gauge") for name, help_, _ in _FIELDS] + [_XID, _HEALTHY, _FOREIGN]
ALLOCATION_FAMILIES = [
    ("shoal_gpus", "GPUs by state: free, allocated (held by Shoal jobs), unhealthy", "gauge"),
    ("shoal_gpus_shared", "Allocated GPUs held by two or more jobs", "gauge"),
    ("shoal_gpus_allocated_idle", f"Allocated GPUs below {IDLE_UTILIZATION_PCT:g} % utilization", "gauge"),
]
# Per-job GPU attribution: a job's GPUs are on one node, so its node renders these too.
JOB_FAMILIES = [
    ("shoal_job_gpu_memory_used_bytes", "GPU memory the job uses, all its GPUs", "gauge"),
    ("shoal_job_gpu_utilization_ratio", "Mean utilization (0..1) of the job's GPUs (its own SM share where known)",
     "gauge"),
]
NODE_FAMILIES = GPU_FAMILIES + ALLOCATION_FAMILIES + JOB_FAMILIES


def holder_labels(holders: Holders, node_id: str, index: int) -> tuple[str, str]:
    return _joined(sorted(holders.get((node_id, index), ())))


def _joined(held) -> tuple[str, str]:
    if not held:
        return "", ""
    return ",".join(str(j) for j, _ in held), ",".join(sorted({t for _, t in held}))


def node_holders(holders: Holders, node_id: str, indices: Iterable[int]) -> NodeHolders:
    """`holders` restricted to one node, in the hashable form `render_node` and NodeText take."""
    return tuple((i, tuple(sorted(holders[(node_id, i)]))) for i in sorted(indices) if holders.get((node_id, i)))


def holders_by_node(holders: Holders) -> dict[str, NodeHolders]:
    """`node_holders` of every node that has holders, in one pass."""
    out: dict[str, list] = defaultdict(list)
    for (nid, i), held in holders.items():
        if held:
            out[nid].append((i, tuple(sorted(held))))
    return {nid: tuple(sorted(v)) for nid, v in out.items()}


def render_node(host: str, readings: list[GpuReading], held: NodeHolders) -> dict[str, bytes]:
    """One node's sample lines, family name -> UTF-8 text (no HELP/TYPE lines): the DCGM series (with
    job_id/team where Shoal jobs hold the GPU), Shoal's per-GPU health series and the node's
    allocation counts (`shoal_gpus{node,flavor,state}`, shared, allocated-idle). A node agent
    renders this once per poll; a scrape only concatenates the nodes' chunks. Also the per-job
    attribution of the jobs holding its GPUs (JOB_FAMILIES): memory they use (their own processes
    where the reader tags them with job ids, else an equal share of the GPU's used memory) and
    their GPUs' mean utilization (their own SM share where known)."""
    by_index = dict(held)
    lines: dict[str, list[str]] = {name: [] for name, _, _ in NODE_FAMILIES}
    fields = [(name, attr, lines[name]) for name, _, attr in _FIELDS]
    xids, healthy, foreign_l = lines[_XID[0]], lines[_HEALTHY[0]], lines[_FOREIGN[0]]
    job_used: dict[tuple[int, str], float] = defaultdict(float)  # MiB
    job_utils: dict[tuple[int, str], list[float]] = defaultdict(list)  # percent, one per GPU
    counts: dict[tuple[str, str], int] = defaultdict(int)
    n_shared: dict[str, int] = defaultdict(int)
    n_idle: dict[str, int] = defaultdict(int)
    h = esc(host)
    for r in readings:
        hold = by_index.get(r.index, ())
        jid, team = _joined(hold)
        model, uuid, idx = esc(r.model), esc(r.uuid), str(r.index)
        # label order: dcgm-exporter's (Prometheus does not care about order)
        ls = (f'gpu="{idx}",UUID="{uuid}",device="nvidia{idx}",modelName="{model}",Hostname="{h}"'
              + (f',job_id="{esc(jid)}",team="{esc(team)}"' if hold else ""))
        for name, attr, out in fields:
            v = getattr(r, attr)
            if v is not None:
                out.append(f"{name}{{{ls}}} {fmt(v)}\n")
        for m in r.mig_devices:  # MIG instances: memory per instance, as dcgm-exporter does
            mls = (f'gpu="{idx}",UUID="{esc(m.uuid)}",device="nvidia{idx}",modelName="{model}",Hostname="{h}",'
                   f'GPU_I_PROFILE="{esc(m.profile)}",GPU_I_ID="{m.gpu_instance_id}"')
            lines["DCGM_FI_DEV_FB_USED"].append(f"DCGM_FI_DEV_FB_USED{{{mls}}} {fmt(m.memory_used_mib)}\n")
            lines["DCGM_FI_DEV_FB_FREE"].append(
                f"DCGM_FI_DEV_FB_FREE{{{mls}}} {fmt(max(m.memory_total_mib - m.memory_used_mib, 0))}\n")
        short = f'node="{h}",gpu="{idx}",uuid="{uuid}",model="{model}"'
        xids.append(f"shoal_gpu_xid_errors_total{{{short}}} {fmt(r.xid_errors)}\n")
        healthy.append(f"shoal_gpu_healthy{{{short}}} {'1.0' if r.healthy else '0.0'}\n")
        if any(p.job_id is not None for p in r.processes) or not hold:
            foreign = sum(p.used_memory_mib or 0 for p in r.processes if p.job_id is None)
            foreign_l.append(f'shoal_gpu_foreign_memory_bytes{{node="{h}",gpu="{idx}",model="{model}"}} '
                             f"{fmt(foreign * 2**20)}\n")
        for holder in hold:  # attribution: the job's own processes where the reader tags them, else
            own = [p for p in r.processes if p.job_id == holder[0]]  # an equal share of the GPU
            if own:
                job_used[holder] += sum(p.used_memory_mib or 0 for p in own)
                sm = [p.sm_util_pct for p in own if p.sm_util_pct is not None]
                job_utils[holder].append(max(sm) if sm else r.utilization_pct)
            else:
                job_used[holder] += r.memory_used_mib / len(hold)
                job_utils[holder].append(r.utilization_pct)
        state = "unhealthy" if not r.healthy else ("allocated" if hold else "free")
        counts[(r.model, state)] += 1
        n_shared[r.model] += len(hold) >= 2
        n_idle[r.model] += bool(hold) and r.utilization_pct < IDLE_UTILIZATION_PCT
    for f in sorted({r.model for r in readings}):
        nf = f'node="{h}",flavor="{esc(f)}"'
        for state in ("free", "allocated", "unhealthy"):
            lines["shoal_gpus"].append(f'shoal_gpus{{{nf},state="{state}"}} {fmt(counts.get((f, state), 0))}\n')
        lines["shoal_gpus_shared"].append(f"shoal_gpus_shared{{{nf}}} {fmt(n_shared[f])}\n")
        lines["shoal_gpus_allocated_idle"].append(f"shoal_gpus_allocated_idle{{{nf}}} {fmt(n_idle[f])}\n")
    for (jid, team), used in sorted(job_used.items()):
        jl = f'job_id="{jid}",team="{esc(team)}"'
        lines["shoal_job_gpu_memory_used_bytes"].append(f"shoal_job_gpu_memory_used_bytes{{{jl}}} {fmt(used * 2**20)}\n")
        utils = job_utils[(jid, team)]
        lines["shoal_job_gpu_utilization_ratio"].append(
            f"shoal_job_gpu_utilization_ratio{{{jl}}} {fmt(sum(utils) / len(utils) / 100.0)}\n")
    return {name: "".join(ls).encode() for name, ls in lines.items()}


class NodeText:
    """One node's cached `render_node` text: re-rendered only when the readings (by identity: a
    node agent keeps the same list until its next poll) or the host or holders change."""

    def __init__(self):
        self._readings: list[GpuReading] | None = None
        self._key: tuple[str, NodeHolders] | None = None
        self.chunks: dict[str, bytes] = {}
        self.key: tuple[str, NodeHolders] | None = None  # (host, holders) the chunks were rendered with

    def get(self, host: str, readings: list[GpuReading], held: NodeHolders) -> dict[str, bytes]:
        if readings is not self._readings or (host, held) != self.key:
            self.chunks = render_node(host, readings, held)
            self._readings, self.key = readings, (host, held)
        return self.chunks


def node_families(texts: Iterable[dict[str, bytes]], families=NODE_FAMILIES) -> list[TextFamily]:
    """The families of `families`, each with every node's chunk."""
    texts = list(texts)
    return [TextFamily(name, help_, typ, [t.get(name, b"") for t in texts]) for name, help_, typ in families]


def gpu_families(readings: Mapping[str, tuple[str, list[GpuReading]]], holders: Holders) -> Iterable:
    """DCGM_FI_DEV_* families plus Shoal's per-GPU XID counter and health gauge (no allocation
    families). `readings`: node_id -> (hostname, that node's readings)."""
    texts = [render_node(host, rs, node_holders(holders, nid, [r.index for r in rs]))
             for nid, (host, rs) in readings.items()]
    return node_families(texts, GPU_FAMILIES)
