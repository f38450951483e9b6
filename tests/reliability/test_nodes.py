"""Nodes lost and drained, through the real service loop and store (SQLite and PostgreSQL) with
the in-memory executor and fake GPUs: an XID/ECC fault drains its node and moves its jobs; an
operator's drain does the same; nothing new lands on a drained or lost node; a lost node's jobs
are requeued without spending a retry and its GPUs are never counted twice."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from monitoring.gpu import FakeGpuReader
from scheduler.clock import FakeClock
from scheduler.daemon import FakeGpuLoad
from scheduler.executor import InMemoryExecutor
from scheduler.inventory import Inventory, NodeInfo
from scheduler.lifecycle import JobState as S
from scheduler.service import Service
from scheduler.spec import ClusterConfig, TeamConfig
from scheduler.store import Store
from tests.reliability.db import db_url, pg_database  # noqa: F401 - fixtures

REPO = Path(__file__).resolve().parents[2]


class Cluster:
    def __init__(self, tmp: Path, url: str, nodes: int = 2, gpus: int = 2):
        self.clock = FakeClock()
        self.readers = {f"n{i}": FakeGpuReader(gpus, host=f"n{i}") for i in range(1, nodes + 1)}
        self.alive = {n: True for n in self.readers}
        self.store = Store(url)
        self.executor = InMemoryExecutor(self.clock, duration_s=lambda spec: spec.get("duration", 10))
        config = ClusterConfig(teams={"a": TeamConfig(gpus=nodes * gpus)})
        inv = Inventory(lambda: [NodeInfo(n, f"node-{n}", alive=self.alive[n]) for n in self.readers], self.readers)
        self.service = Service(self.store, self.executor, inv, config, self.clock, tmp,
                               listeners=[FakeGpuLoad(self.readers)])

    def submit(self, duration=10, gpus=1, max_retries=1):
        return self.store.submit(spec={"name": "j", "duration": duration, "max_retries": max_retries}, name="j",
                                 team="a", user="u", priority=0, gpus=gpus, memory_per_gpu_mib=1000,
                                 now=self.clock.now())

    def run(self, seconds: float):
        for _ in range(int(seconds)):
            self.service.tick()
            self.clock.advance(1)
        self.service.tick()

    def node_of(self, job):
        return (self.store.get(job.id).placement or {}).get("node_id")

    def gpus_in_snapshot(self) -> int:
        snap, _ = self.service.views.snapshot()
        return sum(len(n.gpus) for n in snap.nodes if n.schedulable)


@pytest.fixture
def cluster(tmp_path, db_url):
    c = Cluster(tmp_path, db_url)
    yield c
    c.store.close()


def test_xid_drains_node_moves_its_jobs_and_blocks_new_work_until_undrained(cluster):
    c = cluster
    job = c.submit(duration=30)
    c.run(2)
    node = c.node_of(job)
    other = "n2" if node == "n1" else "n1"
    assert c.store.get(job.id).state is S.RUNNING
    c.readers[node].inject_xid(0, count=2)
    c.service.tick()
    rec = c.store.nodes()[node]
    assert rec.drained and rec.drain_reason == "auto: GPU 0: 2 XID/ECC error(s)"
    assert c.store.get(job.id).state is S.PREEMPTING  # asked to checkpoint
    c.run(1)
    moved = c.store.get(job.id)
    assert moved.placement["node_id"] == other and moved.attempt == 2 and moved.retries == 0
    events = [e.reason for e in c.store.events(job.id)]
    assert any(f"node node-{node} drained (auto: GPU 0: 2 XID/ECC error(s))" in r for r in events)
    # Nothing new lands on the drained node, even with its GPUs free: the rest waits.
    more = [c.submit(duration=30) for _ in range(3)]
    c.run(1)
    assert [c.node_of(j) for j in more].count(other) == 1
    assert [c.store.get(j.id).state for j in more].count(S.QUEUED) == 2
    assert c.gpus_in_snapshot() == 2
    # Undrained: the faults seen so far are acknowledged; the waiting jobs land there.
    c.service.nodes.undrain(f"node-{node}")
    c.run(1)
    assert {c.node_of(j) for j in more if c.store.get(j.id).state is not S.QUEUED} == {node, other}
    assert not c.store.nodes()[node].drained
    # A new fault drains it again.
    c.readers[node].inject_xid(1)
    c.service.tick()
    assert c.store.nodes()[node].drained and "GPU 1: 1 XID/ECC" in c.store.nodes()[node].drain_reason


def test_operator_drain_by_name_and_cli(cluster, db_url):
    c = cluster
    job = c.submit(duration=30)
    c.run(2)
    node = c.node_of(job)
    proc = subprocess.run([sys.executable, "-m", "scheduler.cli", "drain", f"node-{node}", "--db", db_url,
                           "--reason", "kernel upgrade"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "drained" in proc.stdout
    c.run(2)
    assert c.node_of(job) != node and c.store.get(job.id).state in (S.STARTING, S.RUNNING)
    assert c.store.nodes()[node].drain_reason == "kernel upgrade"
    bad = subprocess.run([sys.executable, "-m", "scheduler.cli", "undrain", "nope", "--db", db_url],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "node 'nope' is not known to Shoal" in bad.stderr and "node-n1" in bad.stderr
    ok = subprocess.run([sys.executable, "-m", "scheduler.cli", "undrain", node, "--db", db_url],
                        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and not c.store.nodes()[node].drained


def test_lost_node_requeues_its_jobs_without_a_retry_and_is_not_double_counted(cluster):
    c = cluster
    jobs = [c.submit(duration=30, gpus=2), c.submit(duration=30, gpus=2)]
    c.run(2)
    assert {c.node_of(j) for j in jobs} == {"n1", "n2"}
    victim = next(j for j in jobs if c.node_of(j) == "n1")
    c.alive["n1"] = False
    c.service.tick()
    assert c.store.nodes()["n1"].lost
    rec = c.store.get(victim.id)
    assert rec.state is S.QUEUED and rec.retries == 0 and rec.placement is None
    assert "node node-n1 lost" in c.store.events(victim.id)[-1].reason
    assert not c.executor.is_active(victim.id, 1)  # the lost attempt was ended
    assert c.gpus_in_snapshot() == 2
    c.run(35)  # the other job finishes; the victim resumes on n2
    assert c.node_of(victim) == "n2" and c.store.get(victim.id).state in (S.STARTING, S.RUNNING)
    c.alive["n1"] = True  # the node returns
    c.service.tick()
    assert not c.store.nodes()["n1"].lost
    assert c.gpus_in_snapshot() == 4
    c.run(40)
    assert all(c.store.get(j.id).state is S.SUCCEEDED for j in jobs)
    assert c.store.get(victim.id).retries == 0


class ProbedNodes:
    """A node source like RayNodes: Ray's view (`ray_alive`) lags behind a node's death, and
    `probe` asks the node itself (`answers`); a node that did not answer is listed dead."""

    def __init__(self, names):
        self.ray_alive = {n: True for n in names}
        self.answers = {n: True for n in names}
        self.unreachable: set[str] = set()

    def __call__(self):
        return [NodeInfo(n, f"node-{n}", alive=up and n not in self.unreachable) for n, up in self.ray_alive.items()]

    def probe(self, node_id):
        if not self.answers[node_id]:
            self.unreachable.add(node_id)
        return self.answers[node_id]


def test_job_failing_with_its_node_before_the_node_is_declared_dead_is_requeued_without_a_retry(tmp_path, db_url):
    """The node-removal race (issue 8): the node dies, its job's attempt fails at once with the
    node's death as its cause, and Ray still lists the node alive. Not the job's failure."""
    c = Cluster(tmp_path, db_url)
    nodes = ProbedNodes(c.readers)
    c.service.inventory = Inventory(nodes, c.readers)
    try:
        job = c.submit(duration=30, max_retries=0)
        c.run(2)
        node = c.node_of(job)
        other = "n2" if node == "n1" else "n1"
        nodes.answers[node] = False  # the node is gone; Ray has not noticed yet
        c.executor.fail(job.id, 1, "ray.train.WorkerGroupError: A worker health check failed: Connection refused")
        c.service.tick()  # requeued, then placed again in the same cycle
        moves = [(e.from_state, e.to_state, e.reason) for e in c.store.events(job.id)]
        assert ("RUNNING", "QUEUED", f"node node-{node} lost; resumes from the last checkpoint on another node") \
            in moves, moves
        assert c.store.nodes()[node].lost
        rec = c.store.get(job.id)
        assert rec.retries == 0 and rec.attempt == 2 and c.node_of(job) == other
        assert c.gpus_in_snapshot() == 2  # the lost node's GPUs are not offered
        # The same failure on a node that answers is the job's: with no retries left, FAILED.
        c.executor.fail(job.id, 2, "RuntimeError: CUDA error: an illegal memory access was encountered")
        c.service.tick()
        rec = c.store.get(job.id)
        assert rec.state is S.FAILED and rec.failure_reason.startswith("RuntimeError: CUDA error")
        assert not c.store.nodes()[other].lost
    finally:
        c.store.close()


def test_unknown_node_names_the_known_ones(cluster):
    cluster.service.tick()
    with pytest.raises(KeyError, match=r"node 'zzz' is not known.*node-n1 \(n1\), node-n2 \(n2\)"):
        cluster.service.nodes.drain("zzz")
