"""The Shoal policy: `schedule(snapshot) -> Decision`, a pure function.

One cycle, in numbered steps:

 1. Index. Free GPUs per (node, flavor) unit (cluster.py); quota usage per team from running jobs
    (a shareable job counts the fraction of the GPU's memory it reserves); when each held GPU is
    expected to free up (for reservations). Both are kept across cycles and patched with what
    changed (cluster._Base, running.RunningIndex): caches, equal to a build from scratch.
 2. Feasibility. A job that cannot run even on the empty cluster (no flavor with enough GPUs on
    one node - or in all, with multi-node gangs - or memory or CPUs, or more GPUs than its team
    may ever hold) waits with an "infeasible: ..." reason and takes no further part.
 3. Claims. Each team's waiting within-nominal demand claims its idle nominal quota so that it is
    not lent away under it (quota.py).
 4. Order. Priority first (higher first); inside a priority level, a job long enough to set the
    makespan (longer than the backlog's drain time and every running job's expected end:
    _critical_length, `makespan_guard`) goes first, longest first. Then fair share between teams: a team's share is
    (1-w) * its dominant GPU share now (max over flavors of held/healthy GPUs) + w * its share of
    the cluster's decayed GPU-seconds (TeamQuota.usage_gpu_s, w = fair_share_history_weight),
    divided by its entitlement weight/sum(weights of teams with work); teams are grouped in bands
    of `fair_share_band` of that ratio (under its entitlement = band 0). Teams of one band are
    equals, and inside a priority level and band the job with the least remaining work goes
    first: expected GPU-seconds left (gpus * expected_duration_s) when known, else the GPU-seconds
    it has already received (least attained service first, as Tiresias does) - this is what brings
    mean completion time close to SRTF. Aging: that score decays linearly to 0 over the job's
    horizon aging_s + aging_ratio x its own length (_job_key), so no feasible job waits behind
    later arrivals longer than its horizon, and a long job's bound grows with its length.
    Ties: submit time, then job id. The order is a k-way merge over per-team queues on a heap, and
    a team's band is recomputed after each start, so fair share holds inside one cycle too.
 5. Quota and budget. Per flavor the job may use (its required one, else smallest memory first):
    within nominal, or borrowing within the cohort (quota.py). A team at or over its budget
    starts no borrowed work (over_budget="none": nothing new).
 6. Fit (cluster.py): all GPUs at once or none; one unit when one holds the gang, fullest first,
    least free memory first; else the fewest units when `multi_node`; shareable 1-GPU jobs join a
    GPU shared only by shareable jobs under `share_max_utilization` and fewer than
    `share_max_jobs` of them (co-tenants slow each other; memory and live utilization alone let a
    dozen small jobs crawl on one GPU) - first, when the cycle's waiting jobs want more GPUs than
    are free; else only when no GPU of their own fits.
 7. Blocked by resources: (a) if GPUs of jobs already stopping would hold it, it claims them and
    waits; (b) unless GPUs are expected to free up for it within `preempt_grace_s` and it has not
    yet waited that long (then it waits for them: a preemption costs the victim a restart, and
    lenders' bursts would churn), preemption (rules.py decides who may be a victim, preempt.py picks) - reclaim nominal quota from borrowers of the cohort tree,
    lower priority of the same team, or (las_preempt_factor > 0) a same-priority job of a team
    in the same or a worse band that has attained factor times more GPU-seconds; victims must have
    run `min_runtime_s`; at most `max_preemptions_per_cycle`; or, for the job the reservation
    would go to, defragmentation (defrag_factor > 0, rules.defrag_for): narrower jobs on one node
    move to free GPUs on other nodes when the gang's wait outweighs their restart cost;
    (c) otherwise the first such job gets the reservation (reserve.py) and later jobs backfill
    only where they do not delay it.
    A job blocked by its OWN team's quota may preempt lower-priority jobs of its team (rules.py).
 8. Explain: every job not started gets a reason; reserved jobs get an estimated start.
"""
from __future__ import annotations

import heapq
import math
import operator
from collections import defaultdict
from typing import Any

from scheduler.policy import explain
from scheduler.policy.cluster import Cluster, Part
from scheduler.policy.quota import ANY, BORROW, NOMINAL, Check, QuotaBook
from scheduler.policy.reserve import INF, reserve
from scheduler.policy.rules import claim_stopping, defrag_for, preempt_for, quota_preempt
from scheduler.policy.running import release, running_index
from scheduler.policy.state import Cycle, Job, amount, packs, reserve_for
from scheduler.policy.types import (
    Decision, JobRequest, NodeView, Placement, PolicySettings, Snapshot, Start, TeamQuota,
)


# -- 1/2: index and feasibility ---------------------------------------------------------------

def _index(snap: Snapshot) -> Cycle:
    running = dict(zip(map(_JOB_ID, snap.running), snap.running))  # id -> view (no Python frame per job)
    cluster = Cluster(snap, running)
    cy = Cycle(snap, cluster, QuotaBook(snap.quotas, snap.cohorts), running)
    cy.held.update({u.order: u.held for u in cluster.units if u.held})  # read-only: _commit replaces them
    # The running jobs' part (the cycle's largest fixed cost when scanned): kept across cycles and
    # updated by the views that changed (running.py); the same values as a scan of every job.
    cy.kept = running_index(cy, cy.memoized(("quota-config",), snap.quota_config))
    latest, work = cy.kept.fill(cy, snap.now)
    if snap.settings.makespan_guard:
        cy.critical, cy.drain = _critical_length(snap, cluster, latest, work)
    return cy


_FEASIBLE: dict[tuple, tuple[Any, tuple[list[str], str | None]]] = {}


def _infeasible(cy: Cycle, req: JobRequest) -> tuple[list[str], str | None]:
    """(feasible flavors in preference order, or [] with the reason why none is). A function of
    the request's shape, the cluster's layout (by_gpu's identity: nodes, GPUs, their memory and
    CPUs), the quota configuration and two settings - not of what runs - so it is memoized across
    cycles on all of them."""
    s, q = cy.snap.settings, cy.snap
    key = (id(cy.cluster.by_gpu), q.memory_headroom_mib, s.multi_node, cy.memoized(("quota-config",), q.quota_config),
           q.cohorts,
           req.team, req.gpus, req.memory_per_gpu_mib, req.gpu_model, req.cpus_per_gpu, req.shareable)
    hit = _FEASIBLE.get(key)
    if hit is None or hit[0] is not cy.cluster.by_gpu:
        if len(_FEASIBLE) > 4096:
            _FEASIBLE.clear()
        hit = _FEASIBLE[key] = (cy.cluster.by_gpu, _infeasible_uncached(cy, req))
    return hit[1]


def _one_unit(cy: Cycle, f: str, g: int, cpus: int) -> bool:
    c = cy.cluster
    return cy.memoized(("unit", f, g, cpus), lambda: any(
        len(c.units[o].gpus) >= g and c.node_cpus[c.units[o].node_id] >= cpus for o in c.flavors[f].units))


def _infeasible_uncached(cy: Cycle, req: JobRequest) -> tuple[list[str], str | None]:
    c, s = cy.cluster, cy.snap.settings
    if req.team not in cy.book.teams:
        known = ", ".join(sorted(cy.book.teams)) or "none"
        return [], f"infeasible: team {req.team} has no quota (teams: {known})"
    names = [req.gpu_model] if req.gpu_model else sorted(c.flavors, key=lambda f: (c.flavors[f].memory_total_mib, f))
    ok, why = [], []
    for f in names:
        fl = c.flavors.get(f)
        if fl is None:
            why.append(f"no {f} GPUs in the cluster")
            continue
        if fl.memory_total_mib - c.headroom < req.memory_per_gpu_mib:
            why.append(f"{f} has {explain.gib(fl.memory_total_mib - c.headroom)} usable per GPU")
            continue
        if not _one_unit(cy, f, req.gpus, req.cpus) and not (s.multi_node and fl.gpus >= req.gpus):
            why.append(f"largest {f} node has {fl.largest_unit} GPUs")
            continue
        most = cy.book.max_gpus(req.team, cy.book.key(req.team, f))
        if amount(c, f, req.gpus, req.memory_per_gpu_mib, req.shareable) > most + 1e-9:
            why.append(f"team {req.team} may hold at most {most:g} {f} GPUs with borrowing")
            continue
        ok.append(f)
    if ok:
        return ok, None
    need = explain.needs(req.gpus, req.memory_per_gpu_mib, names, not s.multi_node)
    return [], f"infeasible: needs {need}; " + "; ".join(why or ["no GPUs in the cluster"])


# -- 4: order ---------------------------------------------------------------------------------

def _job_key(req: JobRequest, now: float, score: float, horizon: float) -> tuple[tuple, bool]:
    """(sort key, aged?). The GPU-seconds score - remaining GPU-seconds when the duration is
    known, else attained GPU-seconds - decays linearly to 0 over the job's aging horizon
    aging_s + aging_ratio x (its duration, or attained GPU-s per GPU): a job that waited its
    horizon ties with a brand-new job of no work and wins on submit time, so no job waits behind
    later arrivals for longer than its horizon, and long jobs' horizons scale with their length
    (bounded slowdown), instead of every job turning FIFO under sustained load. `score` and
    `horizon` come from _request_facts (they do not change while the job waits)."""
    wait = now - req.submitted_at
    wait = wait if wait > 0.0 else 0.0  # max(0.0, wait), without the call (the same value)
    left = 1.0 - wait / horizon if horizon > 0 else 0.0
    effective = score * (left if left > 0.0 else 0.0) if horizon > 0 else 0.0
    return (-req.priority, effective, req.submitted_at, req.job_id), wait >= horizon


_REQUESTS: dict[int, tuple] = {}  # id(request) -> (request, settings key, shape, score, horizon, static)


def _request_facts(req: JobRequest, s: PolicySettings, skey: tuple) -> tuple:
    """(request, settings key, shape, GPU-seconds score, aging horizon, reason-memo key part): what
    the job key, the shape facts and _one's memo need that does not change while the request object is the same (the service
    hands the policy one request object per queued attempt), memoized on it."""
    hit = _REQUESTS.get(id(req))
    if hit is not None and hit[0] is req and hit[1] == skey:
        return hit
    score = req.gpus * req.expected_duration_s if req.expected_duration_s is not None else req.attained_gpu_s
    own = req.expected_duration_s if req.expected_duration_s is not None else req.attained_gpu_s / max(1, req.gpus)
    horizon = s.aging_s + s.aging_ratio * own  # the longest it waits behind later arrivals
    shape = (req.team, req.gpus, req.memory_per_gpu_mib, req.gpu_model, req.cpus_per_gpu, req.shareable,
             packs(req, s))
    static = (*shape, req.priority, req.expected_duration_s is None)  # what _one's reason memo keys on
    if len(_REQUESTS) > 65536:  # bounded (it keeps old requests alive): live ones are recomputed after a clear
        _REQUESTS.clear()
        _INTERNED.clear()
    # Equal tuples share one object, so a cycle's per-shape dicts key on its id (an int hashes
    # faster than a tuple of seven); after a clear an equal tuple may get a second object, which
    # only costs a second computation of the same facts.
    shape, static = _INTERNED.setdefault(shape, shape), _INTERNED.setdefault(static, static)
    hit = _REQUESTS[id(req)] = (req, skey, shape, score, horizon, static)
    return hit


_INTERNED: dict[tuple, tuple] = {}


def _critical_length(snap: Snapshot, c: Cluster, latest: float, work: float) -> tuple[float, float]:
    """Makespan guard: the expected duration from which a waiting job would end after everything
    else even if it started now - longer than both the latest expected end of a running job and
    the time the cluster needs to drain all known work (running remaining + pending, in GPU-seconds,
    over the healthy GPUs). Such a job sets the makespan, so it goes first within its priority
    level (ahead of shorter work, longest first): shortest-work-first alone would leave it to the
    end and stretch the makespan (SRTF's weakness). Few jobs qualify - only those longer than the
    whole backlog - so mean completion time barely moves. Returns (that length, the drain time);
    inf when nothing is known. A running job with more than the drain time left is not preempted
    for quota reclaim or LAS (rules.py): its restart would push back the end of everything.
    `latest` and `work` are the running jobs' latest expected end from now and their GPU-seconds
    left (the running pass sums them); the pending jobs' work is added here, in order."""
    work = sum([p.expected_duration_s * p.gpus for p in snap.pending if p.expected_duration_s is not None], work)
    gpus = sum(fl.healthy for fl in c.flavors.values())
    if gpus <= 0:
        return math.inf, math.inf
    return max(latest, work / gpus), work / gpus


class _FairShare:
    def __init__(self, cy: Cycle, teams: set[str]):
        s = cy.snap.settings
        # the cycle's use, not the cycle: the cycle holds this object (cy.fair), and a reference
        # back would make every cycle garbage only the cyclic collector frees (docs/simulator.md)
        self.use, self.width = cy.use, s.fair_share_band
        q = {t.team: t for t in cy.snap.quotas}
        self.weight = {t: (q[t].weight if t in q else 1.0) for t in teams}
        total_w = sum(self.weight.values()) or 1.0
        self.entitled = {t: w / total_w for t, w in self.weight.items()}
        hist = {t: (q[t].usage_gpu_s if t in q else 0.0) for t in teams}
        total_h = sum(hist.values())
        self.hist = {t: (h / total_h if total_h > 0 else 0.0) for t, h in hist.items()}
        self.w = s.fair_share_history_weight if total_h > 0 else 0.0  # no history yet: live share only
        self.cap = {f: max(1, fl.healthy) for f, fl in cy.cluster.flavors.items()}

        self._cache: dict[str, tuple[float, float]] = {}

    def changed(self, team: str) -> None:
        self._cache.pop(team, None)

    def _get(self, team: str) -> tuple[float, float]:
        if team not in self._cache:
            use = self.use.get(team, {})
            dom = max((v / self.cap.get(f, 1) for f, v in use.items()), default=0.0)
            r = ((1 - self.w) * dom + self.w * self.hist.get(team, 0.0)) / max(self.entitled[team], 1e-12)
            self._cache[team] = (r, r if self.width <= 0 else float(math.floor(r / self.width)))
        return self._cache[team]

    def ratio(self, team: str) -> float:
        return self._get(team)[0]

    def band(self, team: str) -> float:
        return self._get(team)[1]


def _ordered(cy: Cycle, jobs: list[Job]):
    """Yield jobs in policy order; the team's band is re-read after each yielded job."""
    queues: dict[str, list[Job]] = defaultdict(list)
    for j in jobs:
        queues[j.req.team].append(j)
    fs = cy.fair = _FairShare(cy, set(queues) | {r.team for r in cy.snap.running})
    heap = []
    pos = {}
    for team, q in queues.items():
        q.sort(key=_KEY)
        pos[team] = 0
        heap.append(_entry(fs, team, q[0]))
    heapq.heapify(heap)
    entry = heapq.heappop(heap) if heap else None
    while entry is not None:
        team = entry[-1]
        q = queues[team]
        yield q[pos[team]], fs
        pos[team] += 1
        if pos[team] < len(q):  # push the team's next job and pop the least in one step
            entry = heapq.heappushpop(heap, _entry(fs, team, q[pos[team]]))
        else:
            entry = heapq.heappop(heap) if heap else None


_KEY = operator.attrgetter("key")
_JOB_ID = operator.attrgetter("job_id")


def _entry(fs: _FairShare, team: str, j: Job) -> tuple:
    ratio, band = fs._get(team)
    return (j.key[0], band, j.key[1:], ratio, team)


# -- the cycle ----------------------------------------------------------------------------------

def schedule(snap: Snapshot) -> Decision:
    return plan(snap)[0]


def plan(snap: Snapshot) -> tuple[Decision, tuple[tuple[str, tuple[int, ...], float, int], ...] | None]:
    """The decision plus the cycle's reservation as (node_id, GPUs, start time, job id) per part
    (for tests and the simulator's traces)."""
    cy = _cycle(snap)
    release(cy.kept)
    c, r = cy.cluster, cy.reservation
    held = tuple((*c.gpus_of(p), r.at, r.job_id) for p in r.parts) if r else None
    return Decision(tuple(cy.starts), tuple(cy.preempts), cy.pending, cy.eta), held


def forecast(snap: Snapshot, depth: int = 64) -> dict[int, float]:
    """Estimated start times (clock) of the jobs the cycle leaves waiting for GPUs - what `squeue
    --start` shows - for the first `depth` of them in policy order, beyond the one reservation the
    cycle makes. Conservative-backfill style: after the cycle's own starts, each waiting job in
    rank order takes the earliest GPUs that fit it (as a reservation would) and holds them until
    its expected end, so later jobs plan around it. A job whose start depends on a running or
    planned job with no expected duration gets no estimate, nor does a job waiting for quota or
    budget (its start depends on other teams' work, not on GPUs freeing up). Pure like
    `schedule`, and separate from it: it costs O(depth x GPUs), so the service runs it at a
    slower cadence than the cycle."""
    cy = _cycle(snap)
    release(cy.kept)  # what follows reads only the cycle's own copies
    c, now, s = cy.cluster, snap.now, snap.settings
    out = dict(cy.eta)
    ends = dict(cy.ends)
    cpu_ends = {k: list(v) for k, v in cy.cpu_ends.items()}
    by_id = {job.req.job_id: job for job in cy.order}

    def hold(req: JobRequest, at: float, parts) -> None:  # in the plan, from now until its end
        end = at + req.expected_duration_s if req.expected_duration_s is not None else INF
        for o, ix in parts:
            u = c.own(o)
            u.free[:] = [e for e in u.free if e[1] not in ix]
            for i in ix:
                ends[(o, i)] = max(ends.get((o, i), 0.0), end)
            c.cpus_free[u.node_id] -= len(ix) * req.cpus_per_gpu
            cpu_ends.setdefault(u.node_id, []).append((end, float(len(ix) * req.cpus_per_gpu)))

    if cy.reservation is not None and cy.reservation.job_id in by_id:
        hold(by_id[cy.reservation.job_id].req, cy.reservation.at, cy.reservation.parts)
    planned = 0
    for job in cy.order:
        if planned >= depth:
            break
        req = job.req
        if req.job_id in out:
            planned += 1
            continue
        if not cy.pending.get(req.job_id, "").startswith(("waiting for resources", "backfill:")):
            continue
        planned += 1
        res = reserve(c, req.job_id, job.flavors, req.gpus, req.memory_per_gpu_mib, now, ends, s.multi_node,
                      req.cpus, cpu_ends)
        if res is None or res.at == INF:
            continue
        out[req.job_id] = res.at
        hold(req, res.at, res.parts)
    return out


def _cycle(snap: Snapshot) -> Cycle:
    cy = _index(snap)
    s, now, c, book = snap.settings, snap.now, cy.cluster, cy.book
    jobs = []
    critical = cy.critical
    facts: dict[int, tuple] = {}  # per (interned) shape: (flavors, why, demand key, claims?, amount)
    skey, memo = (s.aging_s, s.aging_ratio, s.share_max_duration_s), _REQUESTS
    for req in snap.pending:
        hit = memo.get(id(req))
        if hit is None or hit[0] is not req or hit[1] != skey:
            hit = _request_facts(req, s, skey)
        _, _, shape, score, horizon, static = hit
        fact = facts.get(id(shape))
        if fact is None:  # nothing has started yet: these depend on the shape alone
            flavors, why = _infeasible(cy, req)
            fact = facts[id(shape)] = (flavors, why) if why is not None else (
                flavors, None, _demand_key(cy, req, flavors), _fits_free(cy, req, flavors),
                amount(c, flavors[0], req.gpus, req.memory_per_gpu_mib, req.shareable))
        if fact[1] is not None:
            cy.pending[req.job_id] = fact[1]
            continue
        key, aged = _job_key(req, now, score, horizon)
        if req.expected_duration_s is not None and req.expected_duration_s >= critical:
            key = (key[0], -req.expected_duration_s, *key[2:])  # ahead of its priority level, longest first
        job = Job(req, fact[0], key, score, fact[2], aged, static)
        jobs.append(job)
        if fact[3]:  # claims only for work the free GPUs could take
            book.want(req.team, job.dkey, fact[4])
    book.build()
    c.pack_shared = sum(j.req.gpus for j in jobs) > sum(c.free_count(f) for f in c.flavors)
    for job, fs in _ordered(cy, jobs):
        cy.order.append(job)
        _one(cy, job, fs)
    return cy


def _fits_free(cy: Cycle, req: JobRequest, flavors: list[str]) -> bool:
    """Whether the GPUs free now could take the job, reservation or not (memoized by shape until
    the next start or preemption). Before the first start - the claims, step 3 - only a job the
    free GPUs could take claims its team's idle nominal quota: a claim for a gang that cannot
    start anyway (its GPUs are busy or scattered) would keep idle GPUs from borrowers and gain
    the team nothing; that job gets its GPUs by reservation or reclaim instead."""
    s, c = cy.snap.settings, cy.cluster
    share = packs(req, s)
    return cy.memoized(("fits", cy.gen, tuple(flavors), req.gpus, req.memory_per_gpu_mib, req.cpus_per_gpu, share),
                       lambda: any(c.fit(f, req.gpus, req.memory_per_gpu_mib, req.cpus_per_gpu, share, s.multi_node,
                                         {}) is not None for f in flavors))


def _quota(book: QuotaBook, team: str, k: str, amt: float, f: str, over: str | None, explain: bool) -> Check:
    chk = book.check(team, k, amt, "GPUs" if k == ANY else f"{f} GPUs", explain=explain)
    if chk.ok and chk.kind == BORROW and over:
        return Check(False, reason=f"over budget: {over}; borrowing paused (within nominal only)")
    return chk


def _free_summary(c: Cluster, flavors: list[str], req: JobRequest) -> tuple[int, float, int]:
    """(most free GPUs on one unit, the most free CPUs on a unit that could hold the job - inf when
    none could -, free GPUs in all) for a waiting reason."""
    best = max(c.max_free_on_unit(f) for f in flavors)
    return best, math.inf if best < req.gpus else c.most_cpus(flavors, req.gpus, req.cpus), \
        sum(c.free_count(f) for f in flavors)


def _demand_key(cy: Cycle, req: JobRequest, flavors: list[str]) -> str:
    book = cy.book
    if book.key(req.team, flavors[0]) == ANY or req.gpu_model:
        return book.key(req.team, flavors[0])
    return max(flavors, key=lambda f: book.nominal(req.team, f) - book.used[(req.team, f)])


def _one(cy: Cycle, job: Job, fs: _FairShare) -> None:
    """Steps 5-7 for one job. A job that waits and changes nothing (no start, preemption, claim,
    reservation or preemption attempt) leaves the cycle's state as it found it, so the next job of
    the same shape, in the same state, waits for the same reason: that reason is memoized on
    everything the steps read (the shape, the state's generation, the preemption gate, where the
    job stands against the reservation), and a saturated cycle costs a lookup per job, not a pass
    through the steps."""
    req, s, res = job.req, cy.snap.settings, cy.reservation
    d = req.expected_duration_s
    gate = s.preemption and len(cy.preempts) < s.max_preemptions_per_cycle and cy.attempts < s.max_preemptions_per_cycle
    key = ("waits", cy.gen, gate, id(job.static),  # team, priority, shape, d is None (interned)
           job.aged if res is None else (d is None or cy.snap.now + d > res.at),
           cy.snap.now - req.submitted_at < s.preempt_grace_s, job.score if s.las_preempt_factor > 0 else None)
    hit = cy.memo.get(key)
    if hit is not None:
        cy.pending[req.job_id] = hit[0]
        cy.attempts += hit[1]  # the preemption attempts that found nothing, as the steps would count them
        return
    gen, attempts = cy.gen, cy.attempts
    _steps(cy, job, fs)
    if cy.gen == gen and cy.reservation is res:
        cy.memo[key] = (cy.pending[req.job_id], cy.attempts - attempts)


def _steps(cy: Cycle, job: Job, fs: _FairShare) -> None:
    req, s, c, book, now = job.req, cy.snap.settings, cy.cluster, cy.book, cy.snap.now
    over = book.over_budget(req.team)
    if over and s.over_budget == "none":
        cy.pending[req.job_id] = f"over budget: {over}; no new work starts until the period ends"
        return
    allowed: list[tuple[str, str]] = []  # (flavor, NOMINAL/BORROW)
    first_no = ""
    seen: dict[tuple[str, float], Check] = {}  # flavor-agnostic quota: one check serves every flavor
    for f in job.flavors:
        k = book.key(req.team, f)
        amt = amount(c, f, req.gpus, req.memory_per_gpu_mib, req.shareable)
        chk = seen.get((k, amt))
        if chk is None:
            # the same answer for every job of the team asking the same amount until a start
            chk = seen[(k, amt)] = cy.memoized(("quota", cy.gen, req.team, k, amt, not first_no),
                                               lambda: _quota(book, req.team, k, amt, f, over, not first_no))
        if chk.ok:
            allowed.append((f, chk.kind))
        elif not first_no:
            first_no = chk.reason
    if not allowed:
        cy.pending[req.job_id] = quota_preempt(cy, job) or first_no
        return
    if len(allowed) > 1:
        allowed.sort(key=lambda fk: fk[1] != NOMINAL)  # stable: nominal flavors first
    end = now + req.expected_duration_s if req.expected_duration_s is not None else None
    avoid = cy.reservation.avoid_for(end) if cy.reservation else {}
    for f, kind in allowed:
        parts = c.fit(f, req.gpus, req.memory_per_gpu_mib, req.cpus_per_gpu, packs(req, s), s.multi_node, avoid)
        if parts is not None:
            _commit(cy, job, f, parts, end)
            return
    _blocked(cy, job, allowed, avoid, fs)


def _commit(cy: Cycle, job: Job, f: str, parts: list[Part], end: float | None) -> None:
    req, c, book = job.req, cy.cluster, cy.book
    cy.gen += 1
    c.take(parts, req.memory_per_gpu_mib, req.cpus_per_gpu, req.shareable)
    amt = amount(c, f, req.gpus, req.memory_per_gpu_mib, req.shareable)
    book.commit(req.team, book.key(req.team, f), amt, job.dkey)
    cy.use[req.team][f] += amt
    cy.fair.changed(req.team)
    # cy.held's and cy.cpu_ends' values may be shared with the kept indexes: replaced, not mutated
    for o, ix in parts:
        h = dict(cy.held.get(o, {}))
        for i in ix:
            cy.ends[(o, i)] = max(cy.ends.get((o, i), 0.0), end if end is not None else INF)
            h[i] = h.get(i, ()) + (req.job_id,)
        cy.held[o] = h
        if cy.unit_ends is not None:  # the unit's sorted ends with these GPUs' new ones (a new list)
            new = set(ix)
            cy.unit_ends[o] = sorted([*(e for e in cy.unit_ends.get(o, ()) if e[1] not in new),
                                      *((cy.ends[(o, i)], i) for i in new)])
    for o, ix in parts:
        node_id = c.units[o].node_id
        cy.cpu_ends[node_id] = [*cy.cpu_ends.get(node_id, ()), (end if end is not None else INF,
                                                                 float(len(ix) * req.cpus_per_gpu))]
    named = [c.gpus_of(p) for p in parts]
    first = named[0]
    cy.starts.append(Start(req.job_id, Placement(first[0], first[1], tuple(named) if len(named) > 1 else ())))


def _blocked(cy: Cycle, job: Job, allowed: list[tuple[str, str]], avoid: dict, fs: _FairShare) -> None:
    req, s, c, now = job.req, cy.snap.settings, cy.cluster, cy.snap.now
    flavors = [f for f, _ in allowed]
    one_node = not s.multi_node
    # (a) GPUs of jobs already stopping (preempted earlier) hold it: claim them and wait.
    waiting = claim_stopping(cy, flavors, req, avoid)
    if waiting:
        cy.pending[req.job_id] = f"waiting for preempted {explain.jobs(waiting)} to checkpoint and stop"
        return
    # (b) preemption.
    if s.preemption and len(cy.preempts) < s.max_preemptions_per_cycle and cy.attempts < s.max_preemptions_per_cycle:
        why = preempt_for(cy, job, allowed, avoid, fs)
        if not why and s.defrag_factor > 0 and s.backfill and cy.reservation is None:
            why = defrag_for(cy, job, allowed, avoid)
        if why:
            cy.pending[req.job_id] = why
            return
    # (c) the first blocked job gets the reservation; later ones backfill around it.
    need = explain.needs(req.gpus, req.memory_per_gpu_mib, flavors, one_node)
    if s.backfill and cy.reservation is None:
        res = reserve_for(cy, req, flavors)
        if res is not None and (res.at < INF or job.aged):
            cy.reservation = res
            where = explain.where([(c.units[o].name, ix) for o, ix in res.parts])  # names people know
            if res.at < INF:
                cy.eta[req.job_id] = res.at
                cy.pending[req.job_id] = f"reserved: starts at {explain.clock(res.at, now)} on {where}"
            else:
                cy.pending[req.job_id] = (f"reserved: waited past its aging horizon; holds {where} as they "
                                          f"free up (running jobs have no expected end)")
            return
    if avoid and cy.reservation is not None:
        if _fits_free(cy, req, flavors):  # it would, but for the reservation
            r = cy.reservation
            cy.pending[req.job_id] = (f"backfill: would delay job {r.job_id}'s reservation (starts at "
                                      f"{explain.clock(r.at, now)}); " +
                                      ("no expected duration given" if req.expected_duration_s is None
                                       else "it would not end by then"))
            return
    best, cpus, free = cy.memoized(("most-free", cy.gen, tuple(flavors), req.gpus, req.cpus),
                                   lambda: _free_summary(c, flavors, req))
    if cpus < req.cpus:
        cy.pending[req.job_id] = (f"waiting for resources: needs {req.cpus} CPUs on one node with its GPUs; "
                                  f"the most free CPUs on a node with free GPUs is {cpus:.0f}")
        return
    cy.pending[req.job_id] = (f"waiting for resources: needs {need}; the most free on a node is {best}, "
                              f"{free} free in all")


def never_fits(req: JobRequest, nodes: tuple[NodeView, ...], quotas: tuple[TeamQuota, ...],
               cohorts=(), settings: PolicySettings | None = None, memory_headroom_mib: int = 0) -> str | None:
    """Why `req` can never start on this cluster even when it is empty, or None if it could.
    Ignores live usage and health (they change); checks flavor, node size, memory, CPUs and the
    most GPUs the team may hold with borrowing."""
    snap = Snapshot(tuple(nodes), (), (), tuple(quotas), memory_headroom_mib, cohorts=tuple(cohorts),
                    settings=settings or PolicySettings())
    cy = Cycle(snap, Cluster(snap, {}), QuotaBook(snap.quotas, snap.cohorts), {})
    _, why = _infeasible(cy, req)
    return None if why is None else why.removeprefix("infeasible: ")
