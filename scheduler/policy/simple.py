"""The first policy: strict per-team GPU quota, priority then submit-time order, whole-GPU gang
placement on one node, best fit. Richer policy (borrowing, fair share, packing, preemption,
reservations) is issue #3 and replaces this module behind the same `schedule` signature.

One cycle:
  1. order pending jobs: priority (high first), then submit time, then id;
  2. for each: quota check against the team's nominal GPUs minus what it already holds;
  3. fit: the schedulable node with the fewest free GPUs that still has enough (best fit keeps
     whole nodes free for large gangs) and enough free CPUs for the job's workers; a GPU is free
     when no Shoal job holds it, it is healthy and its live free memory covers the job's
     per-GPU estimate;
  4. commit the start into the working view so later jobs in the same cycle see it;
  5. everything else gets a pending reason.
A job that does not fit does not block lower-ranked jobs (no reservations yet: issue #3).
"""
from __future__ import annotations

from collections import Counter

from scheduler.policy.types import (
    Decision, GpuView, JobRequest, NodeView, Placement, Snapshot, Start, TeamQuota,
)


def _free_gpus(node: NodeView, req: JobRequest, headroom: int, taken: set[tuple[str, int]]) -> list[GpuView]:
    return [
        g for g in node.gpus
        if not g.allocated_to and g.healthy and (node.node_id, g.index) not in taken
        and (req.gpu_model is None or g.model == req.gpu_model)
        and g.free_mib(headroom) >= req.memory_per_gpu_mib
    ]


def _fit(req: JobRequest, nodes: tuple[NodeView, ...], headroom: int,
         taken: set[tuple[str, int]], cpus_taken: Counter[str]) -> Placement | None:
    best: tuple[int, str, list[GpuView]] | None = None
    for node in nodes:
        if not node.schedulable or node.cpus_free() - cpus_taken[node.node_id] < req.cpus:
            continue
        free = _free_gpus(node, req, headroom, taken)
        if len(free) >= req.gpus and (best is None or (len(free), node.node_id) < best[:2]):
            best = (len(free), node.node_id, free)
    if best is None:
        return None
    # Lowest indices first; deterministic.
    chosen = sorted(best[2], key=lambda g: g.index)[: req.gpus]
    return Placement(best[1], tuple(g.index for g in chosen))


def _why_not_fit(req: JobRequest, nodes: tuple[NodeView, ...], headroom: int,
                 taken: set[tuple[str, int]], cpus_taken: Counter[str]) -> str:
    live = [n for n in nodes if n.schedulable]
    if not live:
        return "no schedulable nodes"
    flavor = f" {req.gpu_model}" if req.gpu_model else ""
    gpus = max(len(_free_gpus(n, req, headroom, taken)) for n in live)
    if gpus < req.gpus:
        return (f"resources: needs {req.gpus}{flavor} GPU(s) on one node with {req.memory_per_gpu_mib} MiB "
                f"free each; the best node has {gpus}")
    cpus = max(n.cpus_free() - cpus_taken[n.node_id] for n in live)
    return f"resources: needs {req.cpus} CPUs on one node with its GPUs; the most free CPUs on a node is {cpus:.0f}"


def schedule(snap: Snapshot) -> Decision:
    quota = {q.team: q.nominal_gpus for q in snap.quotas}
    used: Counter[str] = Counter()
    for r in snap.running:
        used[r.team] += len(r.gpu_indices)

    order = sorted(snap.pending, key=lambda j: (-j.priority, j.submitted_at, j.job_id))
    taken: set[tuple[str, int]] = set()
    cpus_taken: Counter[str] = Counter()
    starts: list[Start] = []
    pending: dict[int, str] = {}
    for req in order:
        nominal = quota.get(req.team, 0)
        if used[req.team] + req.gpus > nominal:
            pending[req.job_id] = (f"quota: team {req.team} holds {used[req.team]} of {nominal} GPUs; "
                                   f"job needs {req.gpus}")
            continue
        placement = _fit(req, snap.nodes, snap.memory_headroom_mib, taken, cpus_taken)
        if placement is None:
            pending[req.job_id] = _why_not_fit(req, snap.nodes, snap.memory_headroom_mib, taken, cpus_taken)
            continue
        starts.append(Start(req.job_id, placement))
        used[req.team] += req.gpus
        taken.update((placement.node_id, i) for i in placement.gpu_indices)
        cpus_taken[placement.node_id] += req.cpus
    return Decision(to_start=tuple(starts), pending=pending)


def never_fits(req: JobRequest, nodes: tuple[NodeView, ...], quotas: tuple[TeamQuota, ...]) -> str | None:
    """Why `req` can never start on this cluster even when it is empty, or None if it could.
    Ignores live usage (that changes); checks node size, flavor, memory and nominal quota."""
    nominal = {q.team: q.nominal_gpus for q in quotas}
    if req.team not in nominal:
        return f"team {req.team!r} has no quota; known teams: {', '.join(sorted(nominal)) or 'none'}"
    if req.gpus > nominal[req.team]:
        return f"job needs {req.gpus} GPUs but team {req.team}'s quota is {nominal[req.team]}"
    for node in nodes:
        fitting = [g for g in node.gpus
                   if (req.gpu_model is None or g.model == req.gpu_model)
                   and g.memory_total_mib >= req.memory_per_gpu_mib]
        if len(fitting) >= req.gpus and (node.cpus is None or node.cpus >= req.cpus):
            return None
    flavor = f" {req.gpu_model}" if req.gpu_model else ""
    biggest = max((len(n.gpus) for n in nodes), default=0)
    return (f"no node has {req.gpus}{flavor} GPU(s) with {req.memory_per_gpu_mib} MiB each and "
            f"{req.cpus} CPUs (largest node: {biggest} GPUs; a job runs on one node)")
