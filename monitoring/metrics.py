"""Prometheus metrics. Most series are produced at scrape time from the store, the GPU readings
and the cluster config (never stale, and a finished job's series disappear with it, so label
cardinality stays bounded: job ids appear only for jobs that hold GPUs). Counters and histograms
of lifecycle events (wait time, completion time, preemptions, retries) are fed by a service
listener (`JobEventMetrics.moved`).

Naming follows Prometheus conventions: base units (seconds, bytes, USD), `_total` counters,
`_ratio` for 0..1, and no label called `job` or `instance` (Prometheus renames those on scrape);
a job's id is `job_id`. GPU series use dcgm-exporter's names (monitoring.dcgm); cost series use
OpenCost's `node_gpu_hourly_cost` shape plus Shoal's own spend counters (monitoring.cost).
"""
from __future__ import annotations

import logging
import re
import time
from collections import defaultdict
from typing import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from monitoring.exposition import counter, gauge, label_string
from prometheus_client.registry import Collector

from monitoring.dcgm import (ALLOCATION_FAMILIES, IDLE_UTILIZATION_PCT, JOB_FAMILIES, NODE_FAMILIES,  # noqa: F401
                             Holders, NodeHolders,
                             NodeText, holders_by_node, node_families)
from monitoring.gpu import GpuReading
from scheduler import placement as pl
from scheduler.lifecycle import JobState

log = logging.getLogger("shoal.metrics")

ANY_FLAVOR = "any"  # flavor label of flavor-agnostic quotas

Readings = Mapping[str, tuple[str, list[GpuReading]]]  # node_id -> (hostname, readings)
# node_id, hostname, that node's holders -> the node's rendered text (family -> lines), e.g. a node
# agent's cached text; None: the collector renders (and caches) it from the readings itself.
NodeTextSource = Callable[[str, str, NodeHolders], "dict[str, bytes] | None"]


def reason_category(reason: str | None) -> str:
    """A bounded label for a free-text pending reason: its leading 'words:' without "waiting for"
    (e.g. 'quota', 'resources', 'reserved', 'infeasible', 'over_budget'), else 'other'. The full
    reason is in `shoal queue` and the job's events."""
    if not reason:
        return "none"
    m = re.match(r"^(?:waiting for )?([a-z][a-z_ -]{0,23}):", reason)
    return m.group(1).replace(" ", "_") if m else "other"


def _holders(running: Iterable) -> dict[tuple[str, int], list[tuple[int, str]]]:
    out: dict[tuple[str, int], list[tuple[int, str]]] = defaultdict(list)
    for job in running:
        for node_id, idxs in pl.parts(job.placement):  # every node of a multi-node gang
            for idx in idxs:
                out[(node_id, idx)].append((job.id, job.team))
    return out


class ShoalCollector(Collector):
    """Scrape-time series. Only `job_counts`, `gpu_readings` and `running_jobs` are required;
    the optional sources add queue, quota and attribution series (`for_service` wires them all)."""

    def __init__(self, *, job_counts: Callable[[], dict[tuple[str, str], int]],
                 gpu_readings: Callable[[], Readings], running_jobs: Callable[[], Iterable],
                 queued_jobs: Callable[[], Iterable] | None = None, config=None,
                 now: Callable[[], float] = time.time, gpu_series: bool = True,
                 node_text: NodeTextSource | None = None):
        self._job_counts = job_counts
        self._gpu_readings = gpu_readings
        self._running_jobs = running_jobs  # JobRecords holding GPUs
        self._queued_jobs = queued_jobs
        self._config = config
        self._now = now
        # Per-GPU DCGM series from the scheduler (with job labels). A large cluster may leave
        # them to the node agents (15 series per GPU: 120k for 1,000 8-GPU nodes).
        self._gpu_series = gpu_series
        # Per-node GPU and allocation series are rendered once per node and cached (NodeText):
        # from the node agent where it renders them after each poll (`node_text`), else here.
        self._node_text = node_text
        self._texts: dict[str, NodeText] = {}
        self._job_labels: dict[tuple[int, str], str] = {}

    @classmethod
    def for_service(cls, service, gpu_series: bool = True) -> ShoalCollector:
        from scheduler.lifecycle import JobState as S

        inv = service.inventory

        def readings() -> Readings:
            names = inv.node_names()
            return {nid: (names.get(nid, nid), rs) for nid, rs in inv.read().items()}

        def node_text(node_id: str, host: str, held: NodeHolders):
            exposition = getattr(inv.readers.get(node_id), "exposition", None)  # NodeAgent and its proxies
            return exposition(host, held) if exposition is not None else None

        return cls(node_text=node_text, job_counts=service.store.count_by_state_team, gpu_readings=readings,
                   running_jobs=service.store.active_jobs,
                   queued_jobs=lambda: service.store.jobs(states=[S.QUEUED]),
                   config=service.config, now=service.clock.now, gpu_series=gpu_series)

    def describe(self):
        return []  # no store reads at registration time

    def collect(self):
        running = list(self._running_jobs())  # one store read per scrape
        # job_id/team label strings, built once per job and kept while it holds GPUs
        old = self._job_labels
        self._job_labels = {(j.id, j.team): old.get((j.id, j.team)) or label_string(["job_id", "team"],
                                                                                    [str(j.id), j.team])
                            for j in running}
        readings = self._gpu_readings()
        holders = _holders(running)
        yield from self._jobs(running)
        yield from node_families(self._node_texts(readings, holders),
                                 NODE_FAMILIES if self._gpu_series else ALLOCATION_FAMILIES + JOB_FAMILIES)
        yield from self._attribution(running, readings, holders)
        if self._queued_jobs is not None:
            yield from self._queue(list(self._queued_jobs()))
        if self._config is not None:
            yield from self._quota(running)

    def _node_texts(self, readings: Readings, holders: Holders) -> list[dict[str, bytes]]:
        out = []
        by_node = holders_by_node(holders)
        for nid, (host, rs) in readings.items():
            held = by_node.get(nid, ())
            chunks = self._node_text(nid, host, held) if self._node_text is not None else None
            if chunks is None:
                cache = self._texts.get(nid)
                if cache is None:
                    cache = self._texts[nid] = NodeText()
                chunks = cache.get(host, rs, held)
            out.append(chunks)
        for gone in set(self._texts) - set(readings):  # a removed node's text goes with it
            del self._texts[gone]
        return out

    # -- jobs ---------------------------------------------------------------------------------
    def _jobs(self, running: list):
        jobs = gauge("shoal_jobs", "Jobs by state and team", ["state", "team"])
        counts = self._job_counts()
        teams = sorted({team for _, team in counts})
        for state in JobState:  # every state present, zeros included, so rates and sums are stable
            for team in teams:
                jobs.add_metric([state.value, team], counts.get((state.value, team), 0))
        yield jobs
        lab = ["job_id", "team"]
        fams = {
            "loss": gauge("shoal_job_train_loss", "Latest training loss", lab),
            "eval_loss": gauge("shoal_job_eval_loss", "Latest evaluation loss", lab),
            "tokens_per_s": gauge("shoal_job_tokens_per_second", "Training throughput, tokens/s",
                                              labels=lab),
            "step": gauge("shoal_job_step", "Optimizer steps done", lab),
            "total_steps": gauge("shoal_job_steps", "Optimizer steps planned", lab),
            "mfu": gauge("shoal_job_mfu_ratio", "Model FLOPs utilization (0..1) as the trainer "
                                     "reports it", lab),
            "lr": gauge("shoal_job_learning_rate", "Learning rate of the latest step", lab),
            "step_time_s": gauge("shoal_job_step_seconds", "Wall time of the latest optimizer step", lab),
            "gpu_mem_peak_mib": gauge("shoal_job_gpu_memory_peak_bytes", "Peak GPU memory torch allocated "
                                      "on the trainer's rank 0 (CUDA only)", lab),
            "padding_waste": gauge("shoal_job_padding_waste_ratio", "Share of batch positions that are "
                                   "padding (0..1)", lab),
        }
        scale = {"gpu_mem_peak_mib": 2**20}  # the trainer reports MiB; Prometheus wants bytes
        items = list(fams.items())
        for job in running:
            p = job.progress
            if not p:
                continue
            ls = self._job_labels[(job.id, job.team)]
            for key, fam in items:
                v = p.get(key)
                if isinstance(v, (int, float)):
                    fam.add_rendered(ls, v * scale.get(key, 1))
        yield from fams.values()

    def _queue(self, queued: list):
        now = self._now()
        length = gauge("shoal_queue_jobs", "Jobs waiting in the queue", ["team"])
        pending = gauge("shoal_queue_pending_jobs", "Queued jobs by pending-reason category "
                                    "('none': not looked at yet)", ["team", "reason"])
        oldest = gauge("shoal_queue_oldest_wait_seconds", "How long the longest-waiting queued job "
                                   "of the team has waited (since it last entered the queue)", ["team"])
        by_team: dict[str, int] = defaultdict(int)
        by_reason: dict[tuple[str, str], int] = defaultdict(int)
        wait: dict[str, float] = {}
        for j in queued:
            by_team[j.team] += 1
            by_reason[(j.team, reason_category(j.pending_reason))] += 1
            wait[j.team] = max(wait.get(j.team, 0.0), now - j.updated_at)
        for team in sorted(set(by_team) | set(self._config.teams if self._config else ())):
            length.add_metric([team], by_team.get(team, 0))
            oldest.add_metric([team], wait.get(team, 0.0))
        for (team, reason), n in sorted(by_reason.items()):
            pending.add_metric([team, reason], n)
        yield from (length, pending, oldest)

    def _attribution(self, running: list, readings: Readings, holders: Holders):
        """Per job: GPUs and GPU memory Shoal reserved for it. The memory it uses and its GPUs'
        utilization come with its node's text (monitoring.dcgm.render_node)."""
        lab = ["job_id", "team"]
        res = gauge("shoal_job_gpu_memory_reserved_bytes", "GPU memory Shoal reserved for the job, "
                    "all its GPUs", lab)
        gpus = gauge("shoal_job_gpus", "GPUs the job holds", lab + ["node", "flavor"])
        for job in running:
            if not job.placement:
                continue
            named = pl.named_parts(job.placement)  # a gang: one shoal_job_gpus series per node
            res.add_rendered(self._job_labels[(job.id, job.team)],
                             job.memory_per_gpu_mib * sum(len(ix) for _, _, ix in named) * 2**20)
            for _, node, idxs in named:
                gpus.add_metric([str(job.id), job.team, node, job.placement.get("gpu_model") or ""], len(idxs))
        yield from (res, gpus)

    # -- quota --------------------------------------------------------------------------------
    def _quota(self, running: list):
        """Nominal / used / borrowed / lent GPUs per team and flavor ('any' for flavor-agnostic
        quotas). Borrowed = used above nominal. Lent: within a cohort, the GPUs its members
        borrow are attributed to the members with idle nominal GPUs, in proportion to their idle
        GPUs (capped by each one's idle GPUs and lending_limit)."""
        teams = self._config.teams
        lab = ["team", "flavor"]
        nominal = gauge("shoal_team_quota_nominal_gpus", "Nominal (guaranteed) GPUs", lab)
        used = gauge("shoal_team_gpus_used", "GPUs held by the team's jobs", lab)
        borrowed = gauge("shoal_team_gpus_borrowed", "GPUs used above nominal (borrowed)", lab)
        lent = gauge("shoal_team_gpus_lent", "Idle nominal GPUs used by other teams of the cohort",
                                 labels=lab)
        use: dict[tuple[str, str], int] = defaultdict(int)
        for job in running:
            if not job.placement or job.team not in teams:
                continue
            t = teams[job.team]
            flavor = (job.placement.get("gpu_model") or "") if t.gpus_by_model else ANY_FLAVOR
            use[(job.team, flavor)] += pl.gpu_count(job.placement)
        nom: dict[tuple[str, str], int] = {}
        for name, t in teams.items():
            for flavor, n in (t.gpus_by_model.items() if t.gpus_by_model else [(ANY_FLAVOR, t.gpus)]):
                nom[(name, flavor)] = n
        keys = sorted(set(nom) | set(use))
        bor = {k: max(0, use.get(k, 0) - nom.get(k, 0)) for k in keys}
        lend = {k: 0.0 for k in keys}
        cohorts: dict[tuple[str | None, str], list[tuple[str, str]]] = defaultdict(list)
        for k in keys:
            cohorts[(teams[k[0]].cohort if k[0] in teams else None, k[1])].append(k)
        for (cohort, _), members in cohorts.items():
            if cohort is None:
                continue
            demand = sum(bor[k] for k in members)
            idle = {k: max(0, nom.get(k, 0) - use.get(k, 0)) for k in members}
            for k in members:
                limit = teams[k[0]].lending_limit
                idle[k] = min(idle[k], limit) if limit is not None else idle[k]
            supply = sum(idle.values())
            for k in members:
                if supply and demand:
                    lend[k] = min(idle[k], demand * idle[k] / supply)
        for k in keys:
            nominal.add_metric(list(k), nom.get(k, 0))
            used.add_metric(list(k), use.get(k, 0))
            borrowed.add_metric(list(k), bor[k])
            lent.add_metric(list(k), lend[k])
        yield from (nominal, used, borrowed, lent)


# ---------------------------------------------------------------------------------------------

_WAIT_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)
_JCT_BUCKETS = (10, 30, 60, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400, 259200)


class JobEventMetrics:
    """A service listener (`placed`/`released`/`moved`) that counts lifecycle events."""

    def __init__(self, registry: CollectorRegistry):
        self.wait = Histogram("shoal_job_wait_seconds", "Time a job waited in the queue before each admission",
                              ["team"], registry=registry, buckets=_WAIT_BUCKETS)
        self.jct = Histogram("shoal_job_completion_seconds", "Submission to end (job completion time)",
                             ["team", "state"], registry=registry, buckets=_JCT_BUCKETS)
        self.preemptions = Counter("shoal_job_preemptions_total", "Running jobs asked to checkpoint and stop",
                                   ["team"], registry=registry)
        self.retries = Counter("shoal_job_retries_total", "Failed attempts put back in the queue", ["team"],
                               registry=registry)
        self.transitions = Counter("shoal_job_transitions_total", "Job state changes",
                                   ["from_state", "to_state", "team"], registry=registry)

    def init_teams(self, teams: Iterable[str]) -> None:
        """Zero series for every known team, so rates and alerts see them before the first event."""
        for t in teams:
            self.preemptions.labels(t)
            self.retries.labels(t)

    def placed(self, job) -> None:
        pass

    def released(self, job) -> None:
        pass

    def moved(self, old, new, reason: str) -> None:
        try:
            self._count(old, new)
        except Exception:  # noqa: BLE001 - metrics must never break a state change
            log.exception("job metrics: cannot count %s -> %s of job %s", old.state, new.state, new.id)

    def _count(self, old, new) -> None:
        src, dst, team = old.state, new.state, new.team
        self.transitions.labels(src.value, dst.value, team).inc()
        if src is JobState.QUEUED and dst is JobState.ADMITTED:
            self.wait.labels(team).observe(max(0.0, new.updated_at - old.updated_at))
        if dst.terminal:
            end = new.finished_at if new.finished_at is not None else new.updated_at
            self.jct.labels(team, dst.value).observe(max(0.0, end - new.submitted_at))
        if dst is JobState.PREEMPTING:
            self.preemptions.labels(team).inc()
        if dst is JobState.QUEUED and new.retries > old.retries:
            self.retries.labels(team).inc()


class CycleMetrics:
    """`observe(seconds)` is the service's on_cycle hook: cycle duration and last-cycle time."""

    def __init__(self, registry: CollectorRegistry, wall: Callable[[], float] = time.time):
        self._wall = wall
        self.duration = Histogram("shoal_scheduler_cycle_duration_seconds", "Duration of one scheduling cycle",
                                  registry=registry,
                                  buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.last = Gauge("shoal_scheduler_last_cycle_timestamp_seconds", "Unix time the last cycle ended",
                          registry=registry)

    def observe(self, seconds: float) -> None:
        self.duration.observe(seconds)
        self.last.set(self._wall())


class ShoalMetrics:
    """Everything the scheduler exports, in one registry: create it first (its `events`
    listener and `cycle.observe` go into the Service), then `attach(service)`."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.events = JobEventMetrics(self.registry)
        self.cycle = CycleMetrics(self.registry)

    def attach(self, service, *, extra: Iterable[Collector] = ()) -> ShoalMetrics:
        from monitoring.cost import CostCollector

        self.events.init_teams(service.config.teams)
        self.registry.register(ShoalCollector.for_service(service))
        self.registry.register(CostCollector.for_service(service))
        for c in extra:
            self.registry.register(c)
        return self


def build_registry(collector: ShoalCollector) -> tuple[CollectorRegistry, CycleMetrics]:
    """A registry with `collector` and the scheduler's cycle instrumentation (kept for callers
    that assemble their own collector; `ShoalMetrics` wires everything)."""
    registry = CollectorRegistry()
    registry.register(collector)
    return registry, CycleMetrics(registry)
