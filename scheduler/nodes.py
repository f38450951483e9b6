"""The cluster's nodes as Shoal records them: new nodes are recorded, nodes the inventory reports
dead are marked lost, a GPU with new XID/ECC errors drains its node, operators drain and undrain
(acknowledging the faults seen so far), and the policy's view of the nodes is overlaid with all
that. What happens to the jobs on a lost or drained node is the service's business
(`Service._sync_nodes`)."""
from __future__ import annotations

import dataclasses
import logging

from scheduler.clock import Clock
from scheduler.inventory import Inventory
from scheduler.store import Store

log = logging.getLogger("shoal.service")


class Nodes:
    def __init__(self, store: Store, inventory: Inventory, clock: Clock):
        self.store, self.inventory, self.clock = store, inventory, clock
        self._healthy_seen: dict = {}  # node id -> its last reading with every GPU healthy

    def sync(self) -> dict | None:
        """Record what the inventory shows now. Returns the node records (node id -> NodeRecord)
        when some node is lost or drained, so its jobs must move; None when none is (the usual
        case, which spares the caller a pass over every active job)."""
        infos = self.inventory.nodes()
        readings = self.inventory.read()
        stored = self.store.nodes()
        now = self.clock.now()
        for info in infos:
            rec = stored.get(info.node_id)
            if info.alive and (rec is None or rec.lost or rec.name != info.name):
                rec = self.store.upsert_node(info.node_id, info.name, now)
                stored[info.node_id] = rec
            if rec is None:
                continue
            if not info.alive and not rec.lost:
                log.warning("node %s lost", info.name)
                self.store.mark_node_lost(info.node_id, now)
                stored[info.node_id] = dataclasses.replace(rec, lost=True, lost_at=now)
            elif info.alive and not rec.drained:
                seen = readings.get(info.node_id, [])
                if self._healthy_seen.get(info.node_id) is seen:
                    continue  # the same reading object as a cycle that found every GPU healthy
                if all(r.healthy for r in seen):
                    self._healthy_seen[info.node_id] = seen
                    continue
                ack = rec.xid_ack or {}
                faults = [r for r in seen if not r.healthy and r.xid_errors > int(ack.get(str(r.index), 0))]
                if faults:
                    why = "; ".join(f"GPU {r.index}: {r.xid_errors} XID/ECC error(s)" for r in faults)
                    log.warning("draining node %s: %s", info.name, why)
                    stored[info.node_id] = self.store.set_drained(info.node_id, True, reason=f"auto: {why}", now=now)
        return stored if any(n.lost or n.drained for n in stored.values()) else None

    def overlay(self, views):
        """The policy's node views with drained and lost nodes (store) taking no new work."""
        nodes = self.store.nodes()
        return tuple(dataclasses.replace(v, schedulable=False)
                     if (n := nodes.get(v.node_id)) is not None and (n.drained or n.lost) else v
                     for v in views)

    def find(self, ref: str):
        """A node by id, unique id prefix (>= 6 characters) or unique name; KeyError naming the
        known nodes otherwise."""
        return find_node(list(self.store.nodes().values()), ref)

    def note(self, node_id: str) -> None:
        """Record a node the inventory shows before the loop has (so it can be drained at once)."""
        if node_id not in self.store.nodes():
            self.store.upsert_node(node_id, self.inventory.node_name(node_id), self.clock.now())

    def drain(self, ref: str, reason: str = "drained by operator"):
        """No new job lands on the node; its running jobs checkpoint and move (next cycle)."""
        node = self.find(ref)
        return self.store.set_drained(node.node_id, True, reason=reason, now=self.clock.now())

    def undrain(self, ref: str):
        """The node takes work again; GPU faults seen so far are acknowledged (only new ones
        drain it again)."""
        node = self.find(ref)
        ack = {str(r.index): r.xid_errors for r in self.inventory.read().get(node.node_id, [])}
        return self.store.set_drained(node.node_id, False, reason=None, now=self.clock.now(),
                                      xid_ack={**(node.xid_ack or {}), **ack})


def find_node(nodes, ref: str):
    """`nodes`: NodeRecords. Matches an exact id, a unique id prefix of >= 6 characters, or a
    unique name."""
    exact = [n for n in nodes if n.node_id == ref]
    if exact:
        return exact[0]
    by = [n for n in nodes if n.name == ref] or (
        [n for n in nodes if n.node_id.startswith(ref)] if len(ref) >= 6 else [])
    if len(by) == 1:
        return by[0]
    known = ", ".join(f"{n.name} ({n.node_id[:12]})" for n in nodes) or "none yet"
    if by:
        raise KeyError(f"node {ref!r} is ambiguous: it matches {len(by)} nodes; use the node id. Known: {known}")
    raise KeyError(f"node {ref!r} is not known to Shoal (by id, id prefix of 6+ characters, or name). Known: {known}")
