"""Node agents as Ray actors: one `NodeAgent` per Ray node with GPUs, in an actor pinned to that
node (NodeAffinitySchedulingStrategy, hard), so NVML is read where the GPUs are. Used by
`shoal up --ray-address` (scheduler.daemon).

Lifecycle: `RayNodeAgents.reader_for(node_id, gpus)` is the `make_reader` of
`scheduler.ray_executor.RayNodes`, the Inventory's node source: the first time a node with GPUs
shows up, its agent actor is started and an `AgentProxy` (the node's GpuReader) is returned. The
actor dies with its node (a removed node keeps its proxy, empty, so its series disappear); an
agent that dies on a node that is still alive is started again at the next refresh, its node's
last readings standing until the new agent answers (a new fake reader starts without the fake
load of running jobs: FakeGpuLoad re-attaches on the next placement only).

Data flow (pulled): a thread in the scheduler process (`RayNodeAgents.start(nodes)`) refreshes the
node list and, every `interval_s`, asks each agent for what changed since the last pull
(`pull(host, holders, have)`: one small call per node, all in flight at once, waited for at most
`interval_s`). The agent polls its reader on its own thread every `interval_s` and renders its
node's GPU series after each poll, labelled with the host name and GPU holders (job ids, teams)
the scheduler sent in the previous pull; the reply carries the readings and that text. The
Inventory and /metrics read the proxies' copies, so neither the scheduling loop nor a scrape waits
on Ray. A scrape that sees holders the agent has not rendered yet (a job was just placed)
renders that node's text itself until the next pull.

Agents use the cluster config's reader: `nvml` (a node without a driver reports no GPUs and
`shoal_agent_reader_up{node} 0`), or `fake` (FakeGpuReader with the node's GPU count from Ray's
GPU resource; `attach_job`/`detach_job` go to the agent, so FakeGpuLoad works through agents).
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Callable

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from monitoring.agent import NodeAgent
from monitoring.dcgm import NodeHolders, NodeText
from monitoring.exposition import gauge
from monitoring.gpu import GpuReading

log = logging.getLogger("shoal.agents")


def reader_factory(spec: dict, gpus: int) -> Callable[[], object]:
    """`spec`: {"kind": "nvml"} or {"kind": "fake", "model": ..., "memory_mib": ...}."""
    kind = spec.get("kind")
    if kind == "nvml":
        from monitoring.gpu import NvmlReader

        return NvmlReader
    if kind == "fake":
        from monitoring.gpu import FakeGpuReader

        model, memory_mib = spec["model"], int(spec["memory_mib"])
        return lambda: FakeGpuReader(gpus, model, memory_mib, host=spec.get("host") or socket.gethostname())
    raise ValueError(f"reader spec kind: {kind!r} is not one of nvml, fake")


class AgentActor:
    """Runs in the Ray actor on the node: a NodeAgent polling on its own thread."""

    def __init__(self, spec: dict, gpus: int, interval_s: float):
        self.agent = NodeAgent(reader_factory(spec, gpus), interval_s=interval_s).start()
        self.node_id = ray.get_runtime_context().get_node_id()

    def where(self) -> tuple[str, str]:
        return self.node_id, socket.gethostname()

    def pull(self, host: str, held: NodeHolders, have: tuple[int, tuple] | None):
        """The readings and rendered text, unless the caller's `have` (polls, text key) is current.
        Returns None, or (polls, readings, chunks, (host, holders) they were rendered for, error)."""
        chunks = self.agent.exposition(host, held)
        polls, readings = self.agent.polls, self.agent.read()
        key = (host, held)
        if have == (polls, key):
            return None
        return polls, readings, chunks, key, self.agent.error

    def attach_job(self, job_id: int, indices: tuple[int, ...], memory_mib: int) -> None:
        reader = self.agent.reader
        if reader is not None and hasattr(reader, "attach_job"):  # the fake only
            reader.detach_job(job_id)
            reader.attach_job(job_id, indices, memory_mib)
            self.agent.poll()

    def detach_job(self, job_id: int) -> None:
        reader = self.agent.reader
        if reader is not None and hasattr(reader, "detach_job"):
            reader.detach_job(job_id)
            self.agent.poll()

    def fault(self, method: str, args: tuple, kwargs: dict) -> None:
        """A fake-GPU fault (monitoring/fault_file.py): inject_xid / inject_ecc / remove_gpu."""
        reader = self.agent.reader
        if reader is not None and method in _FAULTS and hasattr(reader, method):  # the fake only
            getattr(reader, method)(*args, **kwargs)
            self.agent.poll()

    def stop(self) -> None:
        self.agent.close()


_FAULTS = ("inject_xid", "inject_ecc", "remove_gpu")


# One call at a time (in order per caller: a job's detach before its attach); the agent polls on
# its own thread meanwhile.
_RemoteAgent = ray.remote(num_cpus=0, max_restarts=0)(AgentActor)


class AgentProxy:
    """The scheduler's GpuReader for one node: the latest readings and text its agent sent."""

    def __init__(self, node_id: str, actor):
        self.node_id = node_id
        self.actor = actor
        self.readings: list[GpuReading] = []
        self.error: str | None = "not pulled yet"
        self.alive = True  # False once the actor died (started again while its node lives)
        self.node_gone = False  # the node left the cluster: no readings, no series
        self.pulled_at: float | None = None  # wall time of the last successful pull
        # (polls, (host, holders)) and the text the agent rendered for them, replaced as one
        # tuple so a concurrent scrape never pairs one pull's text with another's key
        self._text: tuple[tuple[int, tuple], dict[str, bytes]] | None = None
        self._want: tuple[str, NodeHolders] = (node_id, ())
        self._local = NodeText()

    def read(self) -> list[GpuReading]:
        return self.readings

    def exposition(self, host: str, held: NodeHolders) -> dict[str, bytes]:
        self._want = (host, held)  # sent with the next pull
        text, readings = self._text, self.readings
        if text is not None and text[0][1] == (host, held):
            return text[1]
        return self._local.get(host, readings, held)  # holders changed since the agent rendered

    def _update(self, reply) -> None:
        if reply is not None:
            polls, readings, chunks, key, error = reply
            self._text = ((polls, key), chunks)
            self.readings, self.error = readings, error
        self.pulled_at = time.time()

    def _gone(self, why: str) -> None:
        self.alive, self.node_gone = False, True
        self._text = None
        self.readings, self.error = [], why

    # FakeGpuLoad's interface (fire and forget; calls from one caller run in order on the actor)
    def attach_job(self, job_id: int, indices: tuple[int, ...], memory_mib: int) -> None:
        if self.alive:
            self.actor.attach_job.remote(job_id, tuple(indices), memory_mib)

    def detach_job(self, job_id: int) -> None:
        if self.alive:
            self.actor.detach_job.remote(job_id)

    # fault_file.inject's interface: passed on to the agent's fake reader
    def inject_xid(self, *args, **kwargs) -> None:
        self._fault("inject_xid", args, kwargs)

    def inject_ecc(self, *args, **kwargs) -> None:
        self._fault("inject_ecc", args, kwargs)

    def remove_gpu(self, *args, **kwargs) -> None:
        self._fault("remove_gpu", args, kwargs)

    def _fault(self, method: str, args: tuple, kwargs: dict) -> None:
        if self.alive:
            self.actor.fault.remote(method, args, kwargs)

    def close(self) -> None:
        if self.alive:
            ray.kill(self.actor)
        self._gone("closed")


class RayNodeAgents:
    """Starts, pulls from and restarts the node agents of a Ray cluster (see the module doc)."""

    def __init__(self, reader_spec: dict, interval_s: float = 1.0):
        if interval_s <= 0:
            raise ValueError(f"interval_s: must be > 0, got {interval_s}")
        reader_factory(reader_spec, 0)  # a bad spec fails here, not in every actor
        self.reader_spec = reader_spec
        self.interval_s = interval_s
        self.proxies: dict[str, AgentProxy] = {}
        self._gpus: dict[str, int] = {}
        self._pending: dict = {}  # pull ObjectRef -> (proxy, the actor asked), while in flight
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _spawn(self, node_id: str, gpus: int):
        # Unnamed: owned by this process (a dead agent's name would linger and be handed back).
        return _RemoteAgent.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        ).remote(self.reader_spec, gpus, self.interval_s)

    def reader_for(self, node_id: str, gpus: int) -> AgentProxy:
        """RayNodes' `make_reader`: the node's proxy, its agent started on first sight."""
        with self._lock:
            proxy = self.proxies.get(node_id)
            if proxy is None:
                proxy = self.proxies[node_id] = AgentProxy(node_id, self._spawn(node_id, gpus))
                self._gpus[node_id] = gpus
                log.info("node agent started on Ray node %s (%d GPU(s))", node_id[:12], gpus)
            return proxy

    def refresh(self, nodes: list) -> None:
        """One round: `nodes` is the Inventory's node list (NodeInfo). Agents of dead nodes are
        dropped, agents that died on live nodes restarted, and every live agent pulled."""
        alive = {n.node_id for n in nodes if n.alive}
        with self._lock:
            for nid, proxy in self.proxies.items():
                if nid not in alive and not proxy.node_gone:
                    proxy._gone("node is gone")
                    log.info("node %s is gone: its agent and series with it", nid[:12])
                elif nid in alive and not proxy.alive:
                    # its node lives: a new agent, same proxy; the last readings stand until it answers
                    log.warning("node agent on %s died (%s): starting it again", nid[:12], proxy.error)
                    proxy.actor, proxy.alive, proxy._text = self._spawn(nid, self._gpus[nid]), True, None
            live = [p for p in self.proxies.values() if p.alive]
        # at most one pull in flight per agent: a slow agent is not sent a queue of them
        self._pending = {ref: (p, actor) for ref, (p, actor) in self._pending.items() if p.alive and p.actor is actor}
        busy = {id(p) for p, _ in self._pending.values()}
        for p in live:
            if id(p) not in busy:
                self._pending[p.actor.pull.remote(*p._want, p._text[0] if p._text else None)] = (p, p.actor)
        if not self._pending:
            return
        ready, _ = ray.wait(list(self._pending), num_returns=len(self._pending), timeout=self.interval_s)
        for ref in ready:
            proxy, actor = self._pending.pop(ref)
            if proxy.actor is not actor:
                continue  # an answer from an agent that has been replaced
            try:
                proxy._update(ray.get(ref))
            except ray.exceptions.RayActorError as e:
                proxy.alive, proxy.error = False, f"agent died: {type(e).__name__}"  # restarted next round
            except Exception as e:  # noqa: BLE001 - one node's failure must not stop the others
                proxy.error = f"{type(e).__name__}: {e}"
                log.warning("node agent on %s: %s", proxy.node_id[:12], proxy.error)

    def start(self, nodes: Callable[[], list], first_s: float = 30.0) -> RayNodeAgents:
        """Refresh every `interval_s` on a daemon thread; `nodes` is the Inventory's node source
        (calling it also starts agents on nodes that joined). Waits up to `first_s` for every
        agent's first answer (actors take seconds to start), so the first scheduling cycle sees
        the GPUs; agents that take longer join when they answer."""
        deadline = time.monotonic() + first_s
        while True:
            self.refresh(nodes())
            waiting = [p.node_id[:12] for p in self.proxies.values() if p.alive and p.pulled_at is None]
            if not waiting:
                break
            if time.monotonic() > deadline:
                log.warning("node agents not answering after %.0f s: %s (going on without them)", first_s,
                            ", ".join(waiting))
                break

        def run() -> None:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    self.refresh(nodes())
                except Exception:  # noqa: BLE001 - keep refreshing (Ray may be restarting)
                    log.exception("node agents: refresh failed")
                self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - t0)))

        self._thread = threading.Thread(target=run, name="shoal-node-agents", daemon=True)
        self._thread.start()
        return self

    def collector(self):
        """Agent health for /metrics: shoal_agent_reader_up{node} and
        shoal_agent_last_poll_timestamp_seconds{node} (the last pull that got an answer)."""
        agents = self

        class _Health:
            def describe(self):
                return []

            def collect(self):
                up = gauge("shoal_agent_reader_up", "1 if the node agent answers and reads its GPUs "
                           "(e.g. NVML initialised)", ["node"])
                last = gauge("shoal_agent_last_poll_timestamp_seconds", "Unix time of the node agent's last "
                             "answer", ["node"])
                for nid, p in sorted(agents.proxies.items()):
                    if p.node_gone:
                        continue
                    name = p._want[0]
                    up.add_metric([name], 1.0 if p.alive and p.pulled_at is not None and p.error is None else 0.0)
                    if p.pulled_at is not None:
                        last.add_metric([name], p.pulled_at)
                return [up, last]

        return _Health()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            for p in self.proxies.values():
                try:
                    p.close()
                except Exception:  # noqa: BLE001 - Ray may be gone already
                    pass
