"""GPU-time and cost accounting over the usage ledger. Pure functions, no I/O.

The ledger has one `UsageRecord` per job attempt: opened by the store in the same transaction
that admits the attempt (placement known), closed in the transaction that takes it out of the
active states. Everything that talks about usage — fair share (decayed GPU-seconds), budgets
(spend in the current period), usage/cost reports and Prometheus cost counters — reads it, so they
agree with each other.

Charging rule. An exclusive job is charged `gpus x price` per hour from admission until its
attempt ends (starting and checkpointing time included: the GPUs are held). A shareable job is
charged `gpus x (reserved MiB / GPU MiB) x price`: tenants of a shared GPU pay their memory share,
and the unreserved rest of a shared GPU is idle cost that no team is charged for. The price is
captured when the attempt starts, so a later price change does not rewrite history.
"""
from __future__ import annotations

import calendar
import math
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Callable, Iterable, Literal

Period = Literal["day", "week", "month"]
GROUP_KEYS = ("team", "user", "job_id", "gpu_model", "node")


@dataclass(frozen=True)
class UsageRecord:
    job_id: int
    attempt: int
    team: str
    user: str
    gpu_model: str | None
    node: str | None
    gpus: int
    gpu_fraction: float  # 1.0 exclusive; shareable: reserved MiB / GPU MiB (<= 1)
    price_per_gpu_hour: float
    started_at: float
    ended_at: float | None  # None = still running

    def overlap_s(self, since: float, until: float) -> float:
        end = until if self.ended_at is None else min(self.ended_at, until)
        return max(0.0, end - max(self.started_at, since))


def charge_fraction(shareable: bool, memory_per_gpu_mib: int, gpu_memory_mib: int | None) -> float:
    if not shareable or not gpu_memory_mib:
        return 1.0
    return min(1.0, memory_per_gpu_mib / gpu_memory_mib)


def gpu_seconds(rec: UsageRecord, since: float, until: float) -> float:
    """Charged GPU-seconds of `rec` inside [since, until]; a running attempt counts up to `until`."""
    return rec.overlap_s(since, until) * rec.gpus * rec.gpu_fraction


def cost_usd(rec: UsageRecord, since: float, until: float) -> float:
    return gpu_seconds(rec, since, until) / 3600.0 * rec.price_per_gpu_hour


@dataclass(frozen=True)
class UsageSummary:
    key: dict[str, str]
    gpu_hours: float
    cost_usd: float
    jobs: int


def summarize(records: Iterable[UsageRecord], by: tuple[str, ...], since: float, until: float) -> list[UsageSummary]:
    """GPU-hours, $ and distinct jobs per group (`by` from GROUP_KEYS), sorted by key."""
    bad = [k for k in by if k not in GROUP_KEYS]
    if bad:
        raise ValueError(f"by: unknown grouping {bad}; choose from {', '.join(GROUP_KEYS)}")
    acc: dict[tuple, list] = defaultdict(lambda: [0.0, 0.0, set()])
    for r in records:
        gs = gpu_seconds(r, since, until)
        if gs <= 0 and r.overlap_s(since, until) <= 0:
            continue
        key = tuple("" if getattr(r, k) is None else str(getattr(r, k)) for k in by)
        a = acc[key]
        a[0] += gs / 3600.0
        a[1] += cost_usd(r, since, until)
        a[2].add(r.job_id)
    return [UsageSummary(dict(zip(by, key)), a[0], a[1], len(a[2])) for key, a in sorted(acc.items())]


def decayed_gpu_seconds(records: Iterable[UsageRecord], now: float, half_life_s: float) -> dict[str, float]:
    """Per team, sum of charged GPU-seconds weighted by 2^(-age / half_life) (Slurm's decayed
    usage, PriorityDecayHalfLife). The integral is exact per record:
    ∫ 2^{-(now-t)/h} dt over the record's interval = h/ln2 · (2^{-(now-end)/h} - 2^{-(now-start)/h})."""
    k = math.log(2) / half_life_s
    out: dict[str, float] = defaultdict(float)
    for r in records:
        end = now if r.ended_at is None else min(r.ended_at, now)
        if end <= r.started_at:
            continue
        out[r.team] += r.gpus * r.gpu_fraction * (math.exp(-k * (now - end)) - math.exp(-k * (now - r.started_at))) / k
    return dict(out)


def spend_by_team(records: Iterable[UsageRecord], since: float, until: float) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for r in records:
        out[r.team] += cost_usd(r, since, until)
    return dict(out)


def period_start(now: float, period: Period) -> float:
    """Start (UTC) of the budget period containing `now`: midnight, Monday midnight, or the 1st."""
    t = datetime.fromtimestamp(now, tz=timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "week":
        t -= timedelta(days=t.weekday())
    elif period == "month":
        t = t.replace(day=1)
    elif period != "day":
        raise ValueError(f"budget_period: {period!r} is not one of day, week, month")
    return calendar.timegm(t.timetuple())


class TeamUsage:
    """Decayed GPU-seconds (fair share) and spend in the current budget period, per team, kept
    incrementally from the ledger so that a refresh costs O(attempts opened or closed since the
    last refresh), not O(ledger) nor O(open attempts).

    Closed attempts never change: their decayed sum is carried forward by one factor
    2^(-elapsed/half-life) (exact: every record's integral decays by the same factor) and their
    spend within the period is fixed. Open attempts are kept as per-team sums in closed form:
    an attempt open since s contributes g·f·(1 - e^(-k(now-s)))/k to the decayed sum, i.e.
    (Σ g·f - e^(-k(now-ref)) Σ g·f·e^(-k(ref-s)))/k with the second sum carried forward like the
    closed one, and g·f·p·(now - max(s, period start)) to the spend, i.e. now·Σ g·f·p - Σ g·f·p·
    max(s, period start); each attempt enters the sums when it is first read open and leaves
    them when it is read closed. Between full recounts the ledger is read for what changed since
    the last refresh only (`read(since, opened_since)`: records closed since, records opened
    since), with a 1 s overlap (a record closed or opened at the very instant of the last refresh
    is not missed; the ones already counted are remembered by (job, attempt)); a full recount
    happens at the start of each budget period and every `full_every_s`, so that another
    writer's late records (an HA fail-over) are picked up.
    """

    OVERLAP_S = 1.0

    def __init__(self, read: Callable[[float | None, float | None], list[UsageRecord]], half_life_s: float,
                 period: Period, full_every_s: float = 86_400.0):
        # (since, opened_since) -> ledger records ending after `since`, or still open (and, with
        # opened_since, started at or after it)
        self.read = read
        self.half_life_s, self.period, self.full_every_s = half_life_s, period, full_every_s
        self._k = math.log(2) / half_life_s
        self._period_start: float | None = None
        self._full_at = -math.inf
        self._at = 0.0  # time of the last refresh
        self._decayed: dict[str, float] = {}  # closed records, decayed to self._at
        self._spent: dict[str, float] = {}  # closed records' spend in the period
        self._recent: dict[tuple[int, int], float] = {}  # counted closed records near self._at -> ended_at
        self._reset_open()

    def _reset_open(self) -> None:
        # open records: (job, attempt) -> (team, g·f, start, g·f·$/s, g·f·$/s·max(start, period start))
        self._open: dict[tuple[int, int], tuple[str, float, float, float, float]] = {}
        self._gf: dict[str, float] = {}  # team -> Σ g·f of its open records
        self._gf_decayed: dict[str, float] = {}  # team -> Σ g·f·e^(-k(self._at - s)), carried like _decayed
        self._rate: dict[str, float] = {}  # team -> Σ g·f·price per second
        self._rate_from: dict[str, float] = {}  # team -> Σ g·f·price per second x max(s, period start)

    def _add_closed(self, r: UsageRecord, now: float, start: float) -> None:
        end = min(r.ended_at, now)
        if end > r.started_at:
            self._decayed[r.team] = self._decayed.get(r.team, 0.0) + r.gpus * r.gpu_fraction * (
                math.exp(-self._k * (now - end)) - math.exp(-self._k * (now - r.started_at))) / self._k
        self._spent[r.team] = self._spent.get(r.team, 0.0) + cost_usd(r, start, now)

    def _open_add(self, key: tuple[int, int], r: UsageRecord, now: float, start: float) -> None:
        gf = r.gpus * r.gpu_fraction
        rate = gf * r.price_per_gpu_hour / 3600.0
        entry = self._open[key] = (r.team, gf, r.started_at, rate, rate * max(r.started_at, start))
        self._sums(entry, 1.0, now)

    def _open_drop(self, key: tuple[int, int], now: float) -> None:
        self._sums(self._open.pop(key), -1.0, now)

    def _sums(self, entry: tuple[str, float, float, float, float], sign: float, now: float) -> None:
        team, gf, started, rate, rate_from = entry
        self._gf[team] = self._gf.get(team, 0.0) + sign * gf
        self._gf_decayed[team] = self._gf_decayed.get(team, 0.0) + sign * gf * math.exp(-self._k * (now - started))
        self._rate[team] = self._rate.get(team, 0.0) + sign * rate
        self._rate_from[team] = self._rate_from.get(team, 0.0) + sign * rate_from

    def refresh(self, now: float) -> tuple[dict[str, float], dict[str, float]]:
        start = period_start(now, self.period)
        if start != self._period_start or now - self._full_at >= self.full_every_s or now < self._at:
            records = self.read(min(start, now - 10 * self.half_life_s), None)  # older usage weighs < 0.1 %
            self._decayed, self._spent, self._recent = {}, {}, {}
            self._reset_open()
            self._period_start, self._full_at = start, now
        else:
            records = self.read(self._at - self.OVERLAP_S, self._at - self.OVERLAP_S)
            f = math.exp(-self._k * (now - self._at))
            self._decayed = {t: v * f for t, v in self._decayed.items()}
            self._gf_decayed = {t: v * f for t, v in self._gf_decayed.items()}
        self._at = now
        late: list[UsageRecord] = []  # closed after `now` (a writer's clock ahead of ours): exact, each time
        opened, recent = self._open, self._recent
        for r in records:
            key = (r.job_id, r.attempt)
            if r.ended_at is None:
                if key not in opened:
                    if r.started_at <= now:
                        self._open_add(key, r, now, start)
                    else:
                        late.append(r)
                continue
            if key in opened:  # closed since it was counted open
                self._open_drop(key, now)
            if r.ended_at > now:
                late.append(r)
            elif key not in recent:
                recent[key] = r.ended_at
                self._add_closed(r, now, start)
        decayed, spent = dict(self._decayed), dict(self._spent)
        k = self._k
        for team, gf in self._gf.items():
            d = (gf - self._gf_decayed[team]) / k
            if d > 0.0 or team in decayed:
                decayed[team] = decayed.get(team, 0.0) + max(0.0, d)
            s = self._rate[team] * now - self._rate_from[team]
            if s > 0.0 or team in spent:
                spent[team] = spent.get(team, 0.0) + max(0.0, s)
        for r in late:  # open at `now`: recomputed every time
            end = now if r.ended_at is None else min(r.ended_at, now)
            if end > r.started_at:
                decayed[r.team] = decayed.get(r.team, 0.0) + r.gpus * r.gpu_fraction * (
                    math.exp(-k * (now - end)) - math.exp(-k * (now - r.started_at))) / k
            spent[r.team] = spent.get(r.team, 0.0) + cost_usd(r, start, now)
        horizon = now - self.OVERLAP_S
        self._recent = {key: e for key, e in recent.items() if e >= horizon}
        return decayed, spent
