"""The cycle's working view of free GPUs, indexed so a fit costs far less than a scan of all GPUs.

A *unit* is the GPUs of one flavor on one node (a gang never mixes flavors). For each flavor:

  buckets[c]  units with exactly c exclusive-free GPUs, in snapshot order. Best fit = the lowest
              c that can hold the gang, so partly used nodes fill first and whole nodes stay
              free for large gangs.
  unit.free   its exclusive-free GPUs as a list sorted by (free MiB, index): with bisect, "how
              many GPUs have >= m MiB free" is O(log 8), and the chosen GPUs are the ones with
              the LEAST free memory that still fit (best fit by memory).
  shared      a sorted list of (free MiB, unit, index) of GPUs that host only shareable jobs,
              fewer than `share_max_jobs` of them (counted in shared_slot), and run under the
              utilization threshold: a shareable job takes the fullest one that fits
              - first while GPUs are scarce (`pack_shared`: the cycle's waiting jobs want more GPUs
              than are free), else only when no GPU of its own fits, since co-tenants slow each
              other down and sharing pays only when it lets more work run.
  failures    (gpus, MiB, CPUs per GPU, avoids-reservation) that did not fit this cycle. Free
              capacity only shrinks during a cycle, so any request at least as large fails too and
              is answered in O(#failures) without looking at a node.

Exclusive-free GPU: healthy, on a schedulable node, no Shoal job on it, some memory free after
headroom (foreign processes count: GpuView.free_mib). Exclusive jobs never share with Shoal jobs.
"""
from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass, field

from scheduler.policy.types import GpuView, NodeView, RunningJob, Snapshot


@dataclass
class Unit:
    order: int
    node_id: str
    name: str
    flavor: str
    gpus: dict[int, GpuView]  # every GPU of this flavor on the node, by index
    schedulable: bool = True
    free: list[tuple[int, int]] = field(default_factory=list)  # exclusive-free (free MiB, index), sorted
    foreign: dict[int, int] = field(default_factory=dict)  # index -> MiB free once every Shoal job left (foreign use stays)
    healthy: tuple[int, ...] = ()  # indices of its healthy GPUs
    held: dict[int, tuple[int, ...]] = field(default_factory=dict)  # index -> Shoal jobs on it (never mutated)


@dataclass
class Flavor:
    name: str
    memory_total_mib: int = 0  # largest GPU of the flavor
    gpus: int = 0  # all GPUs of the flavor (structural: healthy or not)
    healthy: int = 0  # healthy GPUs on schedulable nodes (fair-share capacity)
    largest_unit: int = 0  # most GPUs of the flavor on one node
    units: list[int] = field(default_factory=list)


Part = tuple[int, tuple[int, ...]]  # (unit order, GPU indices)


_NODE_INDEX: dict[int, tuple] = {}


def _node_index(node: NodeView, headroom: int, share_max_util: float) -> list[tuple]:
    """Per flavor of the node: (flavor, GPUs by index, by_gpu keys, largest GPU memory, healthy
    GPUs on a schedulable node, sorted exclusive-free (free MiB, index), shared candidates (free
    MiB, index, tenants), MiB free per GPU once Shoal's jobs left, healthy indices, jobs per GPU).
    What Cluster.__init__ computed per GPU, memoized on the (immutable) NodeView object: the
    simulator's inventory reuses a node's view while nothing on it changed, so an unchanged node
    costs nothing per cycle. A pure speed-up: same values, computed once per view."""
    hit = _NODE_INDEX.get(id(node))
    if hit is not None and hit[0] is node and hit[1] == (headroom, share_max_util):
        return hit[2]
    per_flavor: dict[str, dict[int, GpuView]] = {}
    for g in node.gpus:
        per_flavor.setdefault(g.model, {})[g.index] = g
    out = []
    for model, gpus in per_flavor.items():
        healthy, free_list, shared = 0, [], []
        for g in gpus.values():
            if not (node.schedulable and g.healthy):
                continue
            healthy += 1
            free = g.free_mib(headroom)
            if free <= 0:
                continue
            if not g.allocated_to:
                free_list.append((free, g.index))
            elif g.utilization < share_max_util:
                shared.append((free, g.index, g.allocated_to))
        free_list.sort()
        foreign = {i: g.memory_total_mib - max(0, g.memory_used_mib - g.reserved_mib) - headroom
                   for i, g in gpus.items()}
        out.append((model, gpus, tuple((node.node_id, i) for i in gpus), max(g.memory_total_mib for g in gpus.values()),
                    healthy, tuple(free_list), tuple(shared), foreign, tuple(i for i, g in gpus.items() if g.healthy),
                    {i: g.allocated_to for i, g in gpus.items() if g.allocated_to}))
    if len(_NODE_INDEX) > 4096:  # bounded: live views are re-indexed after a clear
        _NODE_INDEX.clear()
    _NODE_INDEX[id(node)] = (node, (headroom, share_max_util), out)
    return out


_LAYOUTS: dict[tuple, dict[tuple[str, int], int]] = {}


def _layout(shape: list[tuple]) -> dict[tuple[str, int], int]:
    key = tuple(shape)
    hit = _LAYOUTS.get(key)
    if hit is None:
        if len(_LAYOUTS) > 64:  # bounded: a changed cluster gets a new layout
            _LAYOUTS.clear()
        hit = _LAYOUTS[key] = {k: o for o, (_, _, _, keys, _) in enumerate(shape) for k in keys}
    return hit


class Cluster:
    def __init__(self, snap: Snapshot, tenants: dict[int, RunningJob]):
        self.headroom = snap.memory_headroom_mib
        self.share_max_util = snap.settings.share_max_utilization
        self.share_max_jobs = snap.settings.share_max_jobs or float("inf")  # tenants per shared GPU, at most
        # Pack shareable jobs onto shared GPUs first only while GPUs are scarce (set per cycle by
        # the policy); with GPUs to spare they take a GPU of their own and share only if none fits.
        self.pack_shared = True
        self.units: list[Unit] = []
        self.flavors: dict[str, Flavor] = {}
        self.cpus_free: dict[str, float] = {}
        self.node_cpus: dict[str, float] = {}
        self.buckets: dict[str, list[dict[int, None]]] = {}
        self.shared: dict[str, list[tuple[int, int, int]]] = {}
        # (unit, index) -> (its entry's free MiB, shareable jobs on it)
        self.shared_slot: dict[tuple[int, int], tuple[int, int]] = {}
        self.failures: dict[str, list[tuple[int, int, int, bool]]] = {}
        self.free_total: dict[str, int] = {}  # flavor -> exclusive-free GPUs
        shape: list[tuple] = []  # the cluster's layout: (node, flavor, largest GPU MiB, GPU indices, CPUs) per unit
        for node in snap.nodes:
            self.cpus_free[node.node_id] = node.cpus_free()
            self.node_cpus[node.node_id] = float("inf") if node.cpus is None else float(node.cpus)
            for model, gpus, keys, mem, healthy, free, shared, foreign, ok, held in _node_index(
                    node, self.headroom, self.share_max_util):
                fl = self.flavors.get(model)
                if fl is None:
                    fl = self.flavors[model] = Flavor(model)
                u = Unit(len(self.units), node.node_id, node.name, model, gpus, node.schedulable, list(free),
                         foreign, ok, held)
                self.units.append(u)
                fl.units.append(u.order)
                fl.gpus += len(gpus)
                fl.largest_unit = max(fl.largest_unit, len(gpus))
                fl.memory_total_mib = max(fl.memory_total_mib, mem)
                fl.healthy += healthy
                shape.append((node.node_id, model, mem, keys, node.cpus))
                for free_mib, i, held in shared:  # GPUs that host only shareable jobs (checked per cycle)
                    if len(held) < self.share_max_jobs and all(t in tenants and tenants[t].shareable for t in held):
                        self.shared.setdefault(model, []).append((free_mib, u.order, i))
                        self.shared_slot[(u.order, i)] = (free_mib, len(held))
        # (node_id, index) -> unit order. Shared by every cycle with this layout (never mutated), so
        # its identity names the layout: facts derived from it can be memoized on it (shoal._index).
        self.by_gpu: dict[tuple[str, int], int] = _layout(shape)
        for name, fl in self.flavors.items():
            b: list[dict[int, None]] = [{} for _ in range(fl.largest_unit + 1)]
            for o in fl.units:
                b[len(self.units[o].free)][o] = None
            self.buckets[name] = b
            self.shared.setdefault(name, []).sort()
            self.failures[name] = []
            self.free_total[name] = sum(len(self.units[o].free) for o in fl.units)

    # -- queries --------------------------------------------------------------------------
    def free_count(self, flavor: str) -> int:
        return self.free_total.get(flavor, 0)

    def max_free_on_unit(self, flavor: str) -> int:
        b = self.buckets.get(flavor, [])
        return next((c for c in range(len(b) - 1, -1, -1) if b[c]), 0)

    def most_cpus(self, flavors: list[str], g: int, enough: float) -> float:
        """The most free CPUs on a unit with >= g free GPUs (stops at the first with `enough`)."""
        most = 0.0
        for f in flavors:
            b = self.buckets[f]
            for c in range(g, len(b)):
                for o in b[c]:
                    most = max(most, self.cpus_free[self.units[o].node_id])
                    if most >= enough:
                        return most
        return most

    @staticmethod
    def _fitting(u: Unit, m: int, avoid: set[int] | None) -> list[int]:
        """Indices of u's free GPUs with >= m MiB, least free first, minus `avoid`."""
        pos = bisect_left(u.free, (m, -1))
        return [i for _, i in u.free[pos:] if not avoid or i not in avoid]

    def _failed_before(self, flavor: str, g: int, m: int, cpg: int, avoiding: bool) -> bool:
        return any(g >= fg and m >= fm and cpg >= fc and (avoiding or not fa)
                   for fg, fm, fc, fa in self.failures[flavor])

    def fit(self, flavor: str, g: int, m: int, cpg: int, shareable: bool, multi_node: bool,
            avoid: dict[int, set[int]]) -> list[Part] | None:
        """GPUs for a gang of `g` GPUs with `m` MiB each and `cpg` CPUs per GPU, or None.
        One unit when one holds it; else, if `multi_node` and the gang is bigger than any one node
        of the flavor (GPUs or CPUs), the fewest units: a gang that one node could hold waits for
        one rather than spreading over busy nodes. `avoid` maps a unit to GPU indices this job
        must not take (a reservation it would delay)."""
        if flavor not in self.flavors:
            return None
        share = shareable and g == 1
        if share and self.pack_shared:
            hit = self._fit_shared(flavor, m, cpg, avoid)
            if hit is not None:
                return [hit]
        avoiding = bool(avoid)
        if g > self.free_count(flavor) or self._failed_before(flavor, g, m, cpg, avoiding):
            hit = self._fit_shared(flavor, m, cpg, avoid) if share and not self.pack_shared else None
            return None if hit is None else [hit]
        buckets = self.buckets[flavor]
        for c in range(g, len(buckets)):
            for o in buckets[c]:
                u = self.units[o]
                if self.cpus_free[u.node_id] < g * cpg:
                    continue
                fits = self._fitting(u, m, avoid.get(o))
                if len(fits) >= g:
                    return [(o, tuple(sorted(fits[:g])))]
        if share and not self.pack_shared and (hit := self._fit_shared(flavor, m, cpg, avoid)) is not None:
            return [hit]
        if multi_node and not self.one_node_holds(flavor, g, g * cpg):
            parts = self._fit_spread(flavor, g, m, cpg, avoid)
            if parts is not None:
                return parts
        self._remember_failure(flavor, (g, m, cpg, avoiding))
        return None

    def one_node_holds(self, flavor: str, g: int, cpus: float) -> bool:
        """Whether some node has >= g GPUs of the flavor and `cpus` CPUs (busy or not): a gang
        spreads over nodes only when none does (multi-node)."""
        fl = self.flavors[flavor]
        return g <= fl.largest_unit and any(
            len(self.units[o].gpus) >= g and self.node_cpus[self.units[o].node_id] >= cpus for o in fl.units)

    def _remember_failure(self, flavor: str, f: tuple[int, int, int, bool]) -> None:
        fails = self.failures[flavor]
        if len(fails) < 64:
            fails.append(f)

    def _fit_spread(self, flavor: str, g: int, m: int, cpg: int, avoid: dict[int, set[int]]) -> list[Part] | None:
        """Fewest units: take units with the most fitting GPUs first."""
        parts: list[Part] = []
        need = g
        buckets = self.buckets[flavor]
        for c in range(len(buckets) - 1, 0, -1):
            for o in buckets[c]:
                u = self.units[o]
                fits = self._fitting(u, m, avoid.get(o))
                cpus = self.cpus_free[u.node_id]
                k = min(len(fits), need, need if cpus == float("inf") else int(cpus // max(1, cpg)))
                if k <= 0:
                    continue
                parts.append((o, tuple(sorted(fits[:k]))))
                need -= k
                if need == 0:
                    return parts
        return None

    def _fit_shared(self, flavor: str, m: int, cpg: int, avoid: dict[int, set[int]]) -> Part | None:
        lst = self.shared[flavor]
        for k in range(bisect_left(lst, (m, -1, -1)), len(lst)):
            _, o, i = lst[k]
            if self.cpus_free[self.units[o].node_id] >= cpg and i not in avoid.get(o, ()):
                return (o, (i,))
        return None

    # -- commit ---------------------------------------------------------------------------
    def take(self, parts: list[Part], m: int, cpg: int, shareable: bool) -> None:
        for o, idx in parts:
            u = self.units[o]
            self.cpus_free[u.node_id] -= cpg * len(idx)
            shared = self.shared[u.flavor]
            before = len(u.free)
            for i in idx:
                entry = next((e for e in u.free if e[1] == i), None)
                if entry is not None:  # an exclusive-free GPU
                    u.free.remove(entry)
                    if (shareable and u.gpus[i].utilization < self.share_max_util and entry[0] - m > 0
                            and self.share_max_jobs > 1):
                        insort(shared, (entry[0] - m, o, i))
                        self.shared_slot[(o, i)] = (entry[0] - m, 1)
                    continue
                free, n = self.shared_slot.pop((o, i))
                del shared[bisect_left(shared, (free, o, i))]
                if free - m > 0 and n + 1 < self.share_max_jobs:
                    insort(shared, (free - m, o, i))
                    self.shared_slot[(o, i)] = (free - m, n + 1)
            if len(u.free) != before:
                self.free_total[u.flavor] -= before - len(u.free)
                b = self.buckets[u.flavor]
                del b[before][o]
                b[len(u.free)][o] = None

    def gpus_of(self, part: Part) -> tuple[str, tuple[int, ...]]:
        return self.units[part[0]].node_id, part[1]
