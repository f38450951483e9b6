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

import operator
from bisect import bisect_left, insort
from dataclasses import dataclass, field, replace

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


def _node_index(node: NodeView, headroom: int, share_max_util: float) -> tuple[list[tuple], int]:
    """Per flavor of the node: (flavor, GPUs by index, by_gpu keys, largest GPU memory, healthy
    GPUs on a schedulable node, sorted exclusive-free (free MiB, index), shared candidates (free
    MiB, index, tenants), MiB free per GPU once Shoal's jobs left, healthy indices, jobs per GPU),
    and the node's interned shape id (_shape_id).
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
    hit = (out, _shape_id(node, out))
    _NODE_INDEX[id(node)] = (node, (headroom, share_max_util), hit)
    return hit


_LAYOUTS: dict[tuple[int, ...], dict[tuple[str, int], int]] = {}
_SHAPES: dict[tuple, int] = {}  # a node's structure -> a small id (a layout is a tuple of them)
_NODE_UNITS: dict[int, tuple] = {}  # id(node view) -> (view, (settings, first unit order), its Units)


def _shape_id(node: NodeView, out: list[tuple]) -> int:
    """The node's structure (id, CPUs, per flavor: model, largest GPU memory, GPU keys) interned as
    an int, computed once per node view: a cycle's layout key is then a tuple of ints."""
    piece = (node.node_id, node.cpus, tuple((e[0], e[3], e[2]) for e in out))
    hit = _SHAPES.get(piece)
    if hit is None:
        if len(_SHAPES) > 65536:  # bounded: ids restart, with everything that holds one
            for memo in (_SHAPES, _LAYOUTS, _NODE_INDEX, _NODE_UNITS):
                memo.clear()
        hit = _SHAPES[piece] = len(_SHAPES)
    return hit


def _layout(key: tuple[int, ...], units: list[Unit]) -> dict[tuple[str, int], int]:
    hit = _LAYOUTS.get(key)
    if hit is None:
        if len(_LAYOUTS) > 64:  # bounded: a changed cluster gets a new layout
            _LAYOUTS.clear()
        hit = _LAYOUTS[key] = {(u.node_id, i): u.order for u in units for i in u.gpus}
    return hit


class _Base:
    """The cluster as built from a snapshot's nodes, before any cycle changed it, kept for the next
    cycle: between two cycles most nodes' views are the same objects (the simulator's inventory
    reuses an unchanged node's view; production builds new ones, and every node then counts as
    changed), so the next cycle patches in the nodes whose view changed - their units, bucket
    entries, shared-GPU candidates, free counts and health - instead of rebuilding all. A changed
    node structure (GPUs, memory, CPUs, flavors) rebuilds from scratch. Everything a cycle changes
    is copied from the base (Cluster.__init__) or copied on write (units: Cluster.own)."""

    def __init__(self, snap: Snapshot, settings: tuple) -> None:
        self.settings = settings
        headroom, share_max_util = settings
        self.nodes: list[NodeView] = []
        self.shape: list[int] = []  # one interned shape id per node
        self.first: list[int] = []  # the node's first unit order
        self.units: list[Unit] = []
        self.flavors: dict[str, Flavor] = {}
        self.cpus_free: dict[str, float] = {}
        self.node_cpus: dict[str, float] = {}
        # flavor -> sorted (free MiB, unit, index) of GPUs hosting only Shoal jobs under the
        # utilization threshold, each with its tenants (whether they are all shareable is checked
        # per cycle, against the cycle's running jobs)
        self.candidates: dict[str, list[tuple[int, int, int]]] = {}
        self.tenants: dict[tuple[int, int], tuple[int, ...]] = {}
        self.cand_of: dict[int, list[tuple[int, int, int]]] = {}  # unit -> its entries in candidates
        self.healthy: list[int] = []  # per unit: healthy GPUs on a schedulable node
        for node in snap.nodes:
            entries, shape_id = _node_index(node, headroom, share_max_util)
            self.nodes.append(node)
            self.shape.append(shape_id)
            self.first.append(len(self.units))
            self._node(node, entries)
            for u, (model, gpus, _, mem, healthy, _, _, _, _, _) in zip(self.units[self.first[-1]:], entries):
                fl = self.flavors.get(model)
                if fl is None:
                    fl = self.flavors[model] = Flavor(model)
                fl.units.append(u.order)
                fl.gpus += len(gpus)
                fl.largest_unit = max(fl.largest_unit, len(gpus))
                fl.memory_total_mib = max(fl.memory_total_mib, mem)
                fl.healthy += healthy
        for lst in self.candidates.values():
            lst.sort()
        # (node_id, index) -> unit order. Shared by every cycle with this layout (never mutated), so
        # its identity names the layout: facts derived from it can be memoized on it (shoal._index).
        self.by_gpu: dict[tuple[str, int], int] = _layout(tuple(self.shape), self.units)
        self.buckets: dict[str, list[dict[int, None]]] = {}
        self.free_total: dict[str, int] = {}
        for name, fl in self.flavors.items():
            b: list[dict[int, None]] = [{} for _ in range(fl.largest_unit + 1)]
            for o in fl.units:
                b[len(self.units[o].free)][o] = None
            self.buckets[name] = b
            self.candidates.setdefault(name, [])
            self.free_total[name] = sum(len(self.units[o].free) for o in fl.units)

    def _node(self, node: NodeView, entries: list[tuple], replace_at: int | None = None) -> None:
        """Add (or, at `replace_at`, replace) the node's units, CPUs and shared candidates."""
        node_id = node.node_id
        self.cpus_free[node_id] = node.cpus_free()
        self.node_cpus[node_id] = float("inf") if node.cpus is None else float(node.cpus)
        first = len(self.units) if replace_at is None else replace_at
        # The node's units, reused while its view and position are the same: a cycle never
        # mutates a unit it did not copy first (own()), so a reused unit is as built.
        made = _NODE_UNITS.get(id(node))
        if made is None or made[0] is not node or made[1] != (self.settings, first):
            made = (node, (self.settings, first), [
                Unit(first + k, node_id, node.name, model, gpus, node.schedulable, list(free), foreign, ok, held)
                for k, (model, gpus, _, _, _, free, _, foreign, ok, held) in enumerate(entries)])
            if len(_NODE_UNITS) > 4096:  # bounded: live views are rebuilt after a clear
                _NODE_UNITS.clear()
            _NODE_UNITS[id(node)] = made
        for u, (model, _, _, _, healthy, _, shared, _, _, _) in zip(made[2], entries):
            if replace_at is None:
                self.units.append(u)
                self.healthy.append(healthy)
            else:
                self.units[u.order] = u
                self.healthy[u.order] = healthy
            mine = self.cand_of[u.order] = []
            for free_mib, i, held in shared:
                mine.append((free_mib, u.order, i))
                if replace_at is None:
                    self.candidates.setdefault(model, []).append((free_mib, u.order, i))
                else:
                    insort(self.candidates[model], (free_mib, u.order, i))
                self.tenants[(u.order, i)] = held

    def patch(self, snap: Snapshot) -> bool:
        """Bring the base up to the snapshot's nodes; False when the layout changed (rebuild)."""
        nodes = snap.nodes
        if len(nodes) != len(self.nodes):
            return False
        changed = [p for p, same in enumerate(map(operator.is_, nodes, self.nodes)) if not same]
        if not changed:
            return True
        if len(changed) > PATCH_MAX_SHARE * len(nodes):  # production builds every view anew: building is cheaper
            return False
        headroom, share_max_util = self.settings
        for p in changed:
            node = nodes[p]
            entries, shape_id = _node_index(node, headroom, share_max_util)
            if shape_id != self.shape[p]:
                return False
            first = self.first[p]
            for k in range(len(entries)):  # take out the old units' contributions
                u = self.units[first + k]
                fl = self.flavors[u.flavor]
                lst = self.candidates[u.flavor]
                for e in self.cand_of.pop(u.order, ()):  # sorted and unique: each found by bisection
                    del lst[bisect_left(lst, e)]
                for i in u.gpus:
                    self.tenants.pop((u.order, i), None)
                b = self.buckets[u.flavor]
                del b[len(u.free)][u.order]
                self.free_total[u.flavor] -= len(u.free)
                self.flavors[u.flavor] = replace(fl, healthy=fl.healthy - self.healthy[u.order])
            self._node(node, entries, replace_at=first)
            for k in range(len(entries)):  # and put the new ones in, in unit order
                u = self.units[first + k]
                fl = self.flavors[u.flavor]
                b = self.buckets[u.flavor]
                c = len(u.free)
                b[c] = dict.fromkeys(sorted([*b[c], u.order]))
                self.free_total[u.flavor] += c
                self.flavors[u.flavor] = replace(fl, healthy=fl.healthy + self.healthy[u.order])
            self.nodes[p] = node
        return True


PATCH_MAX_SHARE = 0.25  # patch the kept cluster when at most this share of the nodes changed, else rebuild
_BASE: dict[str, _Base] = {}  # the last base; a build takes it out and puts it back (one user at a time)


class Cluster:
    def __init__(self, snap: Snapshot, tenants: dict[int, RunningJob]):
        self.headroom = snap.memory_headroom_mib
        self.share_max_util = snap.settings.share_max_utilization
        self.share_max_jobs = snap.settings.share_max_jobs or float("inf")  # tenants per shared GPU, at most
        # Pack shareable jobs onto shared GPUs first only while GPUs are scarce (set per cycle by
        # the policy); with GPUs to spare they take a GPU of their own and share only if none fits.
        self.pack_shared = True
        settings = (self.headroom, self.share_max_util)
        base = _BASE.pop("base", None)
        if base is None or base.settings != settings or not base.patch(snap):
            base = _Base(snap, settings)
        self.units: list[Unit] = list(base.units)  # shared with the base until own() copies one
        # copies: a later patch of the base (possibly while this cycle runs, in another thread)
        # replaces entries of its dicts; Flavor and Unit objects are replaced, never mutated
        self.flavors: dict[str, Flavor] = dict(base.flavors)
        self.cpus_free: dict[str, float] = dict(base.cpus_free)
        self.node_cpus: dict[str, float] = dict(base.node_cpus)
        self.buckets: dict[str, list[dict[int, None]]] = {f: [dict(d) for d in b] for f, b in base.buckets.items()}
        # flavor -> sorted (free MiB, unit, index) of GPUs that host only shareable jobs, fewer than
        # share_max_jobs of them; (unit, index) -> (its entry's free MiB, shareable jobs on it)
        self.shared: dict[str, list[tuple[int, int, int]]] = {}
        self.shared_slot: dict[tuple[int, int], tuple[int, int]] = {}
        cap, held_by = self.share_max_jobs, base.tenants
        for f, lst in base.candidates.items():
            mine = self.shared[f] = []
            for e in lst:
                held = held_by[(e[1], e[2])]
                if len(held) < cap and all(t in tenants and tenants[t].shareable for t in held):
                    mine.append(e)
                    self.shared_slot[(e[1], e[2])] = (e[0], len(held))
        self.failures: dict[str, list[tuple[int, int, int, bool]]] = {f: [] for f in base.flavors}
        self.free_total: dict[str, int] = dict(base.free_total)  # flavor -> exclusive-free GPUs
        self.by_gpu: dict[tuple[str, int], int] = base.by_gpu
        self._owned: set[int] = set()  # units this cycle copied before changing them
        _BASE["base"] = base

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

    def fitting_count(self, o: int, m: int, avoid: set[int] | None) -> int:
        """How many of unit o's free GPUs have >= m MiB, minus `avoid`."""
        u = self.units[o]
        pos = bisect_left(u.free, (m, -1))
        if not avoid:
            return len(u.free) - pos
        return sum(1 for _, i in u.free[pos:] if i not in avoid)

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
    def own(self, o: int) -> Unit:
        """Unit o, copied first if this cycle has not yet: units are shared with later cycles
        while their node is unchanged, so a cycle changes only its own copy."""
        if o not in self._owned:
            u = self.units[o]
            self.units[o] = replace(u, free=list(u.free))
            self._owned.add(o)
        return self.units[o]

    def take(self, parts: list[Part], m: int, cpg: int, shareable: bool) -> None:
        for o, idx in parts:
            u = self.own(o)
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
