"""Cluster nodes with live GPU readings; drain and undrain (admin)."""

from typing import Annotated

from fastapi import Depends, FastAPI

from scheduler.api import Problem, _path_node
from scheduler.models import DrainIn, GpuOut, NodeOut
from scheduler.service import Service


def register(app: FastAPI, service: Service, Who) -> None:
    store = service.store

    @app.get("/v1/nodes")
    def nodes(p: Who) -> list[NodeOut]:
        """Nodes and their GPUs with live readings (memory, utilization, health) and the Shoal
        jobs on each; drained nodes take no new jobs."""
        active = store.active_jobs()
        team_of = {j.id: j.team for j in active}
        recorded = store.nodes()  # drained (operator or GPU fault) / lost, as the service recorded it
        out = []
        for n in service.inventory.node_views(service.views.running_views(active)):
            rec = recorded.get(n.node_id)
            d = rec if rec is not None and rec.drained else None
            gpus = []
            for g in n.gpus:
                seen = [j for j in g.allocated_to if p.sees_team(team_of.get(j, ""))]
                gpus.append(GpuOut(index=g.index, model=g.model, memory_total_mib=g.memory_total_mib,
                                   memory_used_mib=g.memory_used_mib, reserved_mib=g.reserved_mib,
                                   utilization=g.utilization, healthy=g.healthy, jobs=seen,
                                   hidden_jobs=len(g.allocated_to) - len(seen)))
            out.append(NodeOut(id=n.node_id, name=n.name, schedulable=n.schedulable and d is None,
                               drained=d is not None, drain_reason=d.drain_reason if d else None,
                               lost=rec is not None and rec.lost, cpus=n.cpus,
                               cpus_held=n.cpus_held, gpus=gpus))
        return out

    def find(name: str) -> str:
        for n in service.inventory.node_views(()):
            if name in (n.name, n.node_id):
                return n.node_id
        raise Problem(404, "Node not found", f"node {name!r} is not part of the cluster")

    @app.post("/v1/nodes/{name}/drain")
    def drain(name: Annotated[str, Depends(_path_node)], body: DrainIn, p: Who) -> NodeOut:
        """Stop placing new jobs on the node; its running jobs checkpoint and move elsewhere
        (the same drain a GPU fault triggers, recorded in the store)."""
        node_id = find(name)
        service.nodes.note(node_id)
        service.nodes.drain(node_id, body.reason)
        return next(n for n in nodes(p) if n.id == node_id)

    @app.post("/v1/nodes/{name}/undrain")
    def undrain(name: Annotated[str, Depends(_path_node)], p: Who) -> NodeOut:
        node_id = find(name)
        service.nodes.note(node_id)
        service.nodes.undrain(node_id)
        return next(n for n in nodes(p) if n.id == node_id)

