"""Builds the policy's view of the hardware: nodes (from Ray, or given) and their GPUs (from each
node's GpuReader), overlaid with what Shoal's own active jobs hold."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

from monitoring.gpu import GpuReader, GpuReading
from scheduler.policy import GpuView, NodeView, RunningJob


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    name: str
    alive: bool = True
    drained: bool = False
    cpus: int | None = None  # CPUs offered to jobs (Ray's CPU resource); None = not limited


class Inventory:
    """`nodes()` lists the cluster's nodes; `readers[node_id]` reads that node's GPUs. In the
    embedded cluster there is one node whose reader lives in this process; node agents that
    feed remote readings (issue #6) plug in as readers keyed by their node id."""

    def __init__(self, nodes: Callable[[], list[NodeInfo]], readers: dict[str, GpuReader]):
        self._nodes = nodes
        self.readers = readers

    def nodes(self) -> list[NodeInfo]:
        return self._nodes()

    def node_down(self, node_id: str) -> bool:
        """Whether the node is gone now: its source lists it dead, or (a source that can probe,
        e.g. RayNodes) the node does not answer. Asked when a job on it failed, since a node that
        dies may end its jobs before the cluster declares it dead. A node not listed at all is
        not known to be down (False)."""
        probe = getattr(self._nodes, "probe", None)
        if probe is not None and not probe(node_id):
            return True
        return any(n.node_id == node_id and not n.alive for n in self._nodes())

    def read(self) -> dict[str, list[GpuReading]]:
        out = {}
        for node in self._nodes():
            reader = self.readers.get(node.node_id)
            out[node.node_id] = reader.read() if (reader and node.alive) else []
        return out

    def node_views(self, running: list[RunningJob]) -> tuple[NodeView, ...]:
        readings = self.read()
        reserved: dict[tuple[str, int], int] = defaultdict(int)
        holders: dict[tuple[str, int], list[int]] = defaultdict(list)
        cpus_held: dict[str, int] = defaultdict(int)
        for job in running:
            parts = job.placements()  # a multi-node gang holds GPUs (and CPUs) on every node
            total = sum(len(ix) for _, ix in parts) or 1
            for node_id, ix in parts:
                cpus_held[node_id] += job.cpus * len(ix) // total if len(parts) > 1 else job.cpus
                for idx in ix:
                    reserved[(node_id, idx)] += job.memory_per_gpu_mib
                    holders[(node_id, idx)].append(job.job_id)
        views = []
        for node in self._nodes():
            gpus = tuple(
                GpuView(
                    index=r.index, model=r.model, memory_total_mib=r.memory_total_mib,
                    memory_used_mib=r.memory_used_mib, utilization=r.utilization_pct / 100.0,
                    healthy=r.healthy, reserved_mib=reserved[(node.node_id, r.index)],
                    allocated_to=tuple(holders[(node.node_id, r.index)]),
                )
                for r in readings.get(node.node_id, [])
            )
            views.append(NodeView(node.node_id, node.name, gpus, node.alive and not node.drained,
                                  cpus=node.cpus, cpus_held=cpus_held[node.node_id]))
        return tuple(views)

    def gpu_info(self, node_id: str, gpu_indices) -> tuple[str | None, int | None]:
        """(flavor, memory total MiB) of the first of these GPUs (a placement never mixes flavors)."""
        reader = self.readers.get(node_id)
        if reader is None or not gpu_indices:
            return None, None
        r = next((r for r in reader.read() if r.index == gpu_indices[0]), None)
        return (r.model, r.memory_total_mib) if r else (None, None)

    def node_name(self, node_id: str) -> str:
        return next((n.name for n in self._nodes() if n.node_id == node_id), node_id)

    def node_names(self) -> dict[str, str]:
        """node_id -> name, from one `nodes()` call (node_name per node is quadratic)."""
        return {n.node_id: n.name for n in self._nodes()}
