"""Cost series, from the usage ledger (scheduler.accounting) and the cluster config's prices.

- `node_gpu_hourly_cost{node, instance_type}`: USD per GPU-hour on the node, OpenCost's metric
  (instance_type = the GPU flavor; OpenCost's `instance` label is left out because Prometheus
  reserves it), and `node_gpu_count{node, instance_type}` like OpenCost's (promtool flags its
  `_count` suffix; the name is OpenCost's and kept).
- `shoal_team_gpu_cost_usd_total{team, flavor}` / `shoal_team_gpu_seconds_total{team, flavor}`:
  lifetime spend and charged GPU-seconds per team (a running attempt counts up to now), so
  `increase(shoal_team_gpu_cost_usd_total[30d])` is the spend over any window. Charging rule
  (scheduler.accounting): exclusive jobs pay gpus × price from admission to the attempt's end;
  shareable jobs pay gpus × (reserved MiB / GPU MiB) × price; the unreserved rest of a shared GPU
  is idle cost charged to no team.
- `shoal_gpu_capacity_cost_usd_total{node, flavor}`: what the node's GPUs cost whether used or
  not (integrated between scrapes). Idle cost over a window =
  increase(capacity) - increase(team cost) for the node's flavor.
- `shoal_team_budget_usd{team, period}`, `shoal_team_spend_usd{team, period}` (this budget
  period so far, the number the policy uses) and `shoal_team_budget_remaining_usd{team, period}`
  (negative = over budget).
"""
from __future__ import annotations

import threading
from collections import defaultdict
from typing import Callable, Mapping

from monitoring.exposition import counter, gauge
from prometheus_client.registry import Collector

from scheduler.accounting import UsageRecord, cost_usd, gpu_seconds

_OVERLAP_S = 300.0  # re-read ledger rows that ended this long before the last scrape (clock ties)


class CostCollector(Collector):
    def __init__(self, *, usage: Callable[..., list[UsageRecord]], prices: Mapping[str, float],
                 node_gpus: Callable[[], Mapping[str, tuple[str, int]]], now: Callable[[], float],
                 budgets: Mapping[str, float | None] | None = None, period: str = "month",
                 spend: Callable[[], Mapping[str, float]] | None = None):
        self._usage = usage  # Store.usage(since=...)
        self._prices = prices  # flavor -> USD per GPU-hour
        self._node_gpus = node_gpus  # node name -> (flavor, GPUs present)
        self._now = now
        self._budgets = budgets or {}
        self._period = period
        self._spend = spend
        # closed ledger rows are added once: (job_id, attempt) -> ended_at, and their totals
        self._seen: dict[tuple[int, int], float] = {}
        self._closed_cost: dict[tuple[str, str], float] = defaultdict(float)
        self._closed_gpu_s: dict[tuple[str, str], float] = defaultdict(float)
        self._last: float | None = None
        self._job_closed: dict[tuple[int, str], list[float]] = {}  # (job, team) -> [cost, last seen open]
        self._capacity: dict[tuple[str, str], float] = defaultdict(float)
        self._last_nodes: Mapping[str, tuple[str, int]] = {}
        self._lock = threading.Lock()

    @classmethod
    def for_service(cls, service) -> CostCollector:
        cfg = service.config
        inv = service.inventory

        def node_gpus() -> dict[str, tuple[str, int]]:
            out = {}
            names = inv.node_names()
            for nid, rs in inv.read().items():
                if rs:
                    out[names.get(nid, nid)] = (rs[0].model, len(rs))
            return out

        return cls(usage=service.store.usage, prices={k: m.price_per_hour for k, m in cfg.gpu_models.items()},
                   node_gpus=node_gpus, now=service.clock.now,
                   budgets={k: t.budget_usd for k, t in cfg.teams.items()}, period=cfg.scheduler.budget_period,
                   spend=lambda: service.views.team_usage()[1])

    def describe(self):
        return []

    def _totals(self, now: float) -> tuple[dict, dict]:
        """Lifetime (cost, GPU-s) per (team, flavor): closed rows once, open rows up to now."""
        since = None if self._last is None else self._last - _OVERLAP_S
        self._open_jobs: dict[tuple[int, str], float] = {}
        cost = defaultdict(float, self._closed_cost)
        gpu_s = defaultdict(float, self._closed_gpu_s)
        for rec in self._usage(since=since):
            key = (rec.team, rec.gpu_model or "")
            c, g = cost_usd(rec, 0.0, now), gpu_seconds(rec, 0.0, now)
            if rec.ended_at is None:
                cost[key] += c
                gpu_s[key] += g
                self._open_jobs[(rec.job_id, rec.team)] = self._open_jobs.get((rec.job_id, rec.team), 0.0) + c
            elif (rec.job_id, rec.attempt) not in self._seen:
                self._seen[(rec.job_id, rec.attempt)] = rec.ended_at
                self._job_closed.setdefault((rec.job_id, rec.team), [0.0, now])[0] += c
                self._closed_cost[key] += c
                self._closed_gpu_s[key] += g
                cost[key] += c
                gpu_s[key] += g
        for k, v in self._job_closed.items():
            if k in self._open_jobs:
                v[1] = now
        # a job that has held no GPU for a day drops out (bounded memory; it is queued or done)
        self._job_closed = {k: v for k, v in self._job_closed.items() if now - v[1] < 86400}
        if since is not None:  # rows that ended before the window are never returned again
            self._seen = {k: end for k, end in self._seen.items() if end > since - _OVERLAP_S}
        return cost, gpu_s

    def collect(self):
        with self._lock:  # concurrent scrapes must not add a closed attempt twice
            return self._collect()

    def _collect(self) -> list:
        fams = []
        now = self._now()
        nodes = self._node_gpus()
        hourly = gauge("node_gpu_hourly_cost", "Hourly cost per GPU on this node (USD), "
                                   "OpenCost's metric", ["node", "instance_type"])
        count = gauge("node_gpu_count", "GPUs on this node", ["node", "instance_type"])
        for node, (flavor, n) in sorted(nodes.items()):
            if flavor in self._prices:
                hourly.add_metric([node, flavor], self._prices[flavor])
            count.add_metric([node, flavor], n)
        fams.extend((hourly, count))

        if self._last is not None:  # capacity cost accrues at the GPU count seen at the last scrape
            for node, (flavor, n) in self._last_nodes.items():
                self._capacity[(node, flavor)] += n * self._prices.get(flavor, 0.0) * max(0.0, now - self._last) / 3600
        for node, (flavor, _) in nodes.items():
            self._capacity.setdefault((node, flavor), 0.0)
        cost, gpu_s = self._totals(now)
        self._last, self._last_nodes = now, dict(nodes)

        cap = counter("shoal_gpu_capacity_cost_usd", "Cost of the node's GPUs, used or not (USD), "
                                  "since this exporter started", ["node", "flavor"])
        for (node, flavor), v in sorted(self._capacity.items()):
            cap.add_metric([node, flavor], v)
        spend_c = counter("shoal_team_gpu_cost_usd", "GPU spend charged to the team (USD), lifetime",
                                      labels=["team", "flavor"])
        gs = counter("shoal_team_gpu_seconds", "Charged GPU-seconds, lifetime",
                                 labels=["team", "flavor"])
        teams = {t for t, _ in cost} | set(self._budgets)
        flavors_of = defaultdict(set)
        for t, f in cost:
            flavors_of[t].add(f)
        for t in sorted(teams):
            for f in sorted(flavors_of[t] or set(self._prices)):  # zero series so increase() has a start
                spend_c.add_metric([t, f], cost.get((t, f), 0.0))
                gs.add_metric([t, f], gpu_s.get((t, f), 0.0))
        fams.extend((cap, spend_c, gs))
        job = gauge("shoal_job_cost_usd", "Spend of a job holding GPUs, all its attempts so far (USD)",
                                ["job_id", "team"])
        for (jid, team), c in sorted(self._open_jobs.items()):
            job.add_metric([str(jid), team], c + self._job_closed.get((jid, team), [0.0])[0])
        fams.append(job)

        if self._spend is not None:
            spent = self._spend()
            budget = gauge("shoal_team_budget_usd", "Team budget per period (USD)",
                                       labels=["team", "period"])
            spend_g = gauge("shoal_team_spend_usd", "Spend in the current budget period (USD)",
                                        labels=["team", "period"])
            left = gauge("shoal_team_budget_remaining_usd", "Budget left this period (USD); "
                                     "negative = over budget", ["team", "period"])
            for t in sorted(set(self._budgets) | set(spent)):
                s = spent.get(t, 0.0)
                spend_g.add_metric([t, self._period], s)
                b = self._budgets.get(t)
                if b is not None:
                    budget.add_metric([t, self._period], b)
                    left.add_metric([t, self._period], b - s)
            fams.extend((budget, spend_g, left))
        return fams
