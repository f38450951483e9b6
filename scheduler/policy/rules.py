"""Preemption rules of the Shoal policy (who may be preempted for whom; preempt.choose picks
among the allowed victims), and waiting for victims that are already stopping."""
from __future__ import annotations

from typing import Any, cast

from scheduler.policy import explain
from scheduler.policy.preempt import choose, lost_work, usable
from scheduler.policy.quota import NOMINAL
from scheduler.policy.reserve import reserve
from scheduler.policy.state import Cycle, Job, amount, in_backoff, packs, reserve_for, sets_makespan
from scheduler.policy.types import JobRequest, Preempt, RunningJob


INLINE_SCAN = True  # False: every victim through why() (tests check both give the same decisions)


def claim_stopping(cy: Cycle, flavors: list[str], req: JobRequest, avoid: dict) -> list[int]:
    c = cy.cluster
    for o, ids in cy.stopping.items():
        u = c.units[o]
        if not ids or u.flavor not in flavors:
            continue
        if usable(c, o, req.memory_per_gpu_mib, ids, cy.held.get(o, {}), avoid.get(o, set())) >= req.gpus:
            claimed = sorted(ids)
            cy.stopping[o] = set()
            cy.gen += 1  # memo entries that saw these GPUs as stopping are stale
            return claimed
    return []


def preempt_for(cy: Cycle, job: Job, allowed: list[tuple[str, str]], avoid: dict, fs: Any) -> str:
    req, s, c, book, now = job.req, cy.snap.settings, cy.cluster, cy.book, cy.snap.now
    nominal = {f for f, k in allowed if k == NOMINAL}
    flavors = {f for f, _ in allowed}
    my_band = fs.band(req.team)
    # The candidate set depends on the requester only through these, and on the cycle's state only
    # through what a start or a preemption changes (cy.gen): jobs of one shape and team, blocked one
    # after another, share one scan of the running jobs.
    key = ("victims", cy.gen, req.team, req.priority, my_band, frozenset(nominal), frozenset(flavors),
           (job.score, req.gpus) if s.las_preempt_factor > 0 else None)
    earlier = cy.memo.get(key)  # (reclaim?, candidates) of an earlier requester of this key
    if earlier is not None and not earlier[1]:
        return ""

    teams_reclaimable: dict[tuple[str, str], bool] = {}

    def reclaimable(team: str, f: str) -> bool:  # another team of the tree borrowing on f: once per team and flavor
        hit = teams_reclaimable.get((team, f))
        if hit is None:
            k = book.key(team, f)
            hit = teams_reclaimable[(team, f)] = (team != req.team and book.same_tree(team, req.team)
                                                  and book.borrowing(team, k) - cy.reclaimed[(team, k)] > 1e-9)
        return hit

    if earlier is not None:
        reclaim, cands = earlier
    else:
        reclaim = any(reclaimable(t, f) for f in nominal for t in sorted(cy.victim_teams.get(f, ())))
        cands = None
    if not (reclaim or cy.min_prio.get(req.team, req.priority) < req.priority or s.las_preempt_factor > 0):
        cy.memo[key] = (reclaim, {})
        return ""

    def why(r: RunningJob) -> str | None:
        rf = cy.flavor_of[r.job_id]
        if r.team == req.team and r.priority < req.priority:
            return f"priority {req.priority} job {req.job_id} of team {req.team} needs the GPUs"
        if sets_makespan(r, now, cy.drain):
            return None  # it sets the makespan (makespan guard): not for reclaim or LAS, only for priority
        if in_backoff(r, now, s.min_runtime_s, s.preempt_backoff):
            return None  # preemption backoff: restarted k times, it runs min_runtime_s x backoff^k first
        if reclaim and rf in nominal and reclaimable(r.team, rf):
            return f"team {r.team} borrows beyond its nominal quota; team {req.team} reclaims its own"
        if (s.las_preempt_factor > 0 and r.priority <= req.priority and fs.band(r.team) >= my_band
                and r.attained(now) > s.las_preempt_factor * max(job.score, s.min_runtime_s * req.gpus)
                and (r.team == req.team or book.borrowing(r.team, book.key(r.team, rf)) > 1e-9)):
            return (f"job {req.job_id} has less work left or attained ({job.score:.0f} GPU-s) than this job's "
                    f"{r.attained(now):.0f} GPU-s")
        return None

    if cands is None:
        cands = {}
        if s.las_preempt_factor > 0 or not INLINE_SCAN:
            for f in flavors:
                for o, rs in cy.victims_ok.get(f, {}).items():
                    for r in rs.values():
                        if why(r):
                            cands.setdefault(o, []).append(r)
        else:  # why(r) inlined (the scan is the cost of a blocked job): the same candidates
            exempt = _exempt(cy)
            for f in flavors:  # victims_ok[f] holds jobs of flavor f
                teams = {t for t in cy.victim_teams.get(f, ()) if reclaimable(t, f)} if reclaim and f in nominal else ()
                for o, rs in cy.victims_ok.get(f, {}).items():
                    mine = [r for r in rs.values() if (r.team == req.team and r.priority < req.priority)
                            or (r.team in teams and r.job_id not in exempt)]
                    if mine:
                        cands[o] = mine
        cy.memo[key] = (reclaim, cands)
    if not cands:
        return ""
    cy.attempts += 1
    if s.preempt_grace_s > 0 and now - req.submitted_at < s.preempt_grace_s:
        # GPUs expected to free up for it soon: wait for them instead - once: a job that has waited
        # the grace already preempts (others may have taken the GPUs that freed up)
        res = reserve_for(cy, req, sorted(flavors))
        if res is not None and res.at <= now + s.preempt_grace_s:
            return ""
    # the same answer for every job of this shape until a start, preemption or claim (cy.gen)
    pick = cy.memoized(("choose", key, tuple(f for f, _ in allowed), req.gpus, req.memory_per_gpu_mib,
                        req.cpus_per_gpu, bool(avoid)),
                       lambda: choose(c, [f for f, _ in allowed], req.gpus, req.memory_per_gpu_mib, req.cpus_per_gpu,
                                      now, cands, cy.stopping, cy.held, avoid))
    if pick is None or len(cy.preempts) + len(pick.victims) > s.max_preemptions_per_cycle:
        return ""
    reasons = {r.job_id: why(r) for r in pick.victims}  # before the state below changes
    cy.gen += 1
    for r in pick.victims:
        cy.preempts.append(Preempt(r.job_id, cast(str, reasons[r.job_id])))  # candidates all had a reason
        rf = cy.flavor_of[r.job_id]
        cy.not_a_victim(r.job_id)
        k = book.key(r.team, rf)
        cy.reclaimed[(r.team, k)] += amount(c, rf, len(r.gpu_indices), r.memory_per_gpu_mib, r.shareable)
    ids = [r.job_id for r in pick.victims]
    return (f"preempting {explain.jobs(ids)} on {c.units[pick.unit].name} for it "
            f"({reasons[ids[0]]}); starts when they checkpoint")


def defrag_for(cy: Cycle, job: Job, allowed: list[tuple[str, str]], avoid: dict) -> str:
    """Defragmenting preemption (migration, as Gandiva does it): the gang about to take the
    reservation would wait until GPUs held by running jobs free up on one node while as many GPUs
    sit free in fragments elsewhere. If a few running jobs on one node can move to those free GPUs
    - each fits on free GPUs of another node at once - and the gang's wait in GPU-seconds
    (gpus x time until the reservation) is at least `defrag_factor` x the movers' cost (their GPUs
    x (work lost since their last checkpoint + min_runtime_s, which stands for a restart)), they
    checkpoint and stop, restart elsewhere, and the gang gets the node. Quota-neutral (every team
    keeps the GPUs it holds), so any team's job may move; the exemptions of reclaim (a job that
    sets the makespan, a job in its preemption backoff) and a higher priority protect it. At most
    one gang per cycle: only the job the reservation would go to."""
    req, s, c, now = job.req, cy.snap.settings, cy.cluster, cy.snap.now
    g = req.gpus  # (the caller's preemption gate keeps len(cy.preempts) under the cycle's maximum)
    if g < 2:
        return ""
    flavors = [f for f, _ in allowed]
    if sum(c.free_count(f) for f in flavors) < g:  # the gang and the movers need g free GPUs in all
        return ""
    exempt = _exempt(cy)
    cands: dict[int, list[RunningJob]] = {}
    for f in flavors:
        for o, rs in cy.victims_ok.get(f, {}).items():
            mine = [r for r in rs.values()
                    if r.gpu_count < g and r.priority <= req.priority and r.job_id not in exempt and not r.parts
                    and not r.shareable]
            if mine:
                cands[o] = mine
    if not cands:
        return ""
    while True:  # the cheapest node whose movers all fit elsewhere
        pick = choose(c, flavors, g, req.memory_per_gpu_mib, req.cpus_per_gpu, now, cands, cy.stopping, cy.held,
                      avoid)
        if pick is None or len(cy.preempts) + len(pick.victims) > s.max_preemptions_per_cycle:
            return ""
        if _movable(cy, pick.unit, pick.victims, avoid):
            break
        del cands[pick.unit]
    # when the gang would start without moving anyone: as the reservation computes it, but a job
    # already past its expected end is expected to overrun by as much again (not to end now)
    ends = {k: (e if e > now else now + (now - e)) for k, e in cy.ends.items()}
    res = reserve(c, req.job_id, flavors, g, req.memory_per_gpu_mib, now, ends, s.multi_node, req.cpus, cy.cpu_ends)
    cost = sum(r.gpu_count * (lost_work(r, now) + s.min_runtime_s) for r in pick.victims)
    if res is None or res.at <= now or g * (res.at - now) < s.defrag_factor * cost:
        return ""
    u = c.units[pick.unit]
    why = (f"defragmentation: job {req.job_id} needs {g} GPUs on one node and {u.name} is the cheapest to "
           f"clear; free GPUs on another node can take this job at once")
    cy.attempts += 1
    cy.gen += 1
    for r in pick.victims:
        cy.preempts.append(Preempt(r.job_id, why))
        cy.not_a_victim(r.job_id)
    when = explain.clock(res.at, now)
    return (f"preempting {explain.jobs([r.job_id for r in pick.victims])} on {u.name} for it (defragmentation: "
            f"they restart on free GPUs elsewhere; otherwise it would wait until {when}); starts when they checkpoint")


def _movable(cy: Cycle, unit: int, movers: tuple[RunningJob, ...], avoid: dict) -> bool:
    """Whether every mover fits at once on free GPUs of other units of its flavor (largest first,
    each on the fullest unit that holds it, as Cluster.fit places a gang)."""
    c = cy.cluster
    taken: dict[int, int] = {}
    cpus: dict[str, float] = {}
    for r in sorted(movers, key=lambda r: (-r.gpu_count, r.job_id)):
        best, best_n = None, 0
        for o in c.flavors[cy.flavor_of[r.job_id]].units:
            u = c.units[o]
            if o == unit or not u.schedulable or not u.free:
                continue
            n = c.fitting_count(o, r.memory_per_gpu_mib, avoid.get(o)) - taken.get(o, 0)
            have = cpus.get(u.node_id, c.cpus_free[u.node_id])
            if n >= r.gpu_count and (best is None or n < best_n) and have >= r.cpus:
                best, best_n = o, n
        if best is None:
            return False
        taken[best] = taken.get(best, 0) + r.gpu_count
        node = c.units[best].node_id
        cpus[node] = cpus.get(node, c.cpus_free[node]) - r.cpus
    return True


def _exempt(cy: Cycle) -> set[int]:
    """The preemptible running jobs kept from reclaim and LAS this cycle (why() in preempt_for):
    each sets the makespan (more than the drain time left) or is in its preemption backoff. From
    the kept running index (a suffix of its jobs by expected end, and its restarted jobs), else
    from a pass over the victims."""
    hit = cy.memo.get(("exempt",))
    if hit is None:
        s, now = cy.snap.settings, cy.snap.now
        if cy.kept is not None:
            hit = cy.kept.exempt(now, cy.drain, s.min_runtime_s, s.preempt_backoff)
        else:
            hit = {r.job_id for units in cy.victims_ok.values() for rs in units.values() for r in rs.values()
                   if sets_makespan(r, now, cy.drain) or in_backoff(r, now, s.min_runtime_s, s.preempt_backoff)}
        cy.memo[("exempt",)] = hit
    return hit


def quota_preempt(cy: Cycle, job: Job) -> str:
    """A job blocked by its own team's quota may preempt lower-priority jobs of its team: enough
    of them to bring the team back within nominal for it, and - if the GPUs are not free - the
    ones on one node that make room (preempt.choose). Waits instead if jobs already stopping
    free enough quota."""
    req, s, c, book, now = job.req, cy.snap.settings, cy.cluster, cy.book, cy.snap.now
    if (not s.preemption or cy.min_prio.get(req.team, req.priority) >= req.priority
            or len(cy.preempts) >= s.max_preemptions_per_cycle or cy.attempts >= s.max_preemptions_per_cycle):
        return ""
    for f in job.flavors:
        k = book.key(req.team, f)
        amt = amount(c, f, req.gpus, req.memory_per_gpu_mib, req.shareable)
        deficit = book.used.get((req.team, k), 0.0) + amt - book.nominal(req.team, k) - cy.reclaimed[(req.team, k)]
        if amt > book.nominal(req.team, k) + 1e-9:
            continue
        if deficit <= cy.stopping_amt[(req.team, k)] + 1e-9:
            return "waiting for lower-priority jobs of its team to checkpoint and stop"
        deficit -= cy.stopping_amt[(req.team, k)]
        mine = {r.job_id: r for units in cy.victims_ok.values() for jobs in units.values() for r in jobs.values()
                if r.team == req.team and r.priority < req.priority and book.key(r.team, cy.flavor_of[r.job_id]) == k}
        if not mine:
            continue
        cy.attempts += 1
        chosen: list[RunningJob] = []
        if c.fit(f, req.gpus, req.memory_per_gpu_mib, req.cpus_per_gpu, packs(req, s), s.multi_node, {}) is None:
            cands: dict[int, list[RunningJob]] = {}
            for o, jobs in cy.victims_ok.get(f, {}).items():
                cands[o] = [r for r in jobs.values() if r.job_id in mine]
            pick = choose(c, [f], req.gpus, req.memory_per_gpu_mib, req.cpus_per_gpu, now, cands, cy.stopping,
                          cy.held, {})
            if pick is None:
                continue
            chosen = list(pick.victims)
        freed = sum(amount(c, cy.flavor_of[r.job_id], len(r.gpu_indices), r.memory_per_gpu_mib, r.shareable)
                    for r in chosen)
        for r in sorted(mine.values(), key=lambda r: (r.priority, lost_work(r, now), r.job_id)):
            if freed >= deficit - 1e-9:
                break
            if r not in chosen:
                chosen.append(r)
                freed += amount(c, cy.flavor_of[r.job_id], len(r.gpu_indices), r.memory_per_gpu_mib, r.shareable)
        if freed < deficit - 1e-9 or len(cy.preempts) + len(chosen) > s.max_preemptions_per_cycle:
            continue
        why = f"priority {req.priority} job {req.job_id} of team {req.team} needs the quota"
        cy.gen += 1
        for r in chosen:
            cy.preempts.append(Preempt(r.job_id, why))
            cy.not_a_victim(r.job_id)
        cy.reclaimed[(req.team, k)] += freed
        return f"preempting {explain.jobs([r.job_id for r in chosen])} of lower priority for it; starts when they checkpoint"
    return ""
