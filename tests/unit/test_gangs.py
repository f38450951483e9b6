"""Multi-node gangs through the real service loop and store (SQLite and PostgreSQL), with fake GPUs
per node, a fake clock and the in-memory executor: a gang too big for one node gets all its GPUs
at once on the fewest nodes, is accounted on every node (reservations, CPUs, fake GPU load,
usage, metrics), and moves whole when any of its nodes is lost or drained; a scheduler restart
adopts or requeues it whole."""
from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from monitoring.gpu import FakeGpuReader
from monitoring.metrics import ShoalMetrics
from scheduler import placement as pl
from scheduler.clock import FakeClock
from scheduler.daemon import FakeGpuLoad
from scheduler.executor import InMemoryExecutor, LaunchRequest
from scheduler.inventory import Inventory, NodeInfo
from scheduler.lifecycle import JobState as S
from scheduler.ray_executor import train_config, worker_placement
from scheduler.service import Service
from scheduler.sim.executor import SimExecutor
from scheduler.spec import ClusterConfig, SpecError, load_cluster_config
from scheduler.store import Store
from tests.reliability.db import db_url, pg_database  # noqa: F401 - fixtures: every test on SQLite and PostgreSQL
from trainer.config import TrainConfig

MEM = 10000  # MiB per GPU of every job here


class Cluster:
    """`nodes` nodes of `gpus` fake GPUs (8 CPUs each), one team `a` holding all of them."""

    def __init__(self, tmp: Path, url: str, nodes: int = 3, gpus: int = 2, multi_node: bool = True):
        self.tmp, self.url = tmp, url
        self.clock = FakeClock()
        self.readers = {f"n{i}": FakeGpuReader(gpus, host=f"n{i}") for i in range(1, nodes + 1)}
        self.alive = {n: True for n in self.readers}
        self.down: set[str] = set()  # nodes that stop answering before the cluster lists them dead
        self.config = ClusterConfig.model_validate({
            "teams": {"a": {"gpus": nodes * gpus}}, "scheduler": {"multi_node": multi_node, "min_runtime_s": 0}})
        self.store = Store(url)
        self.executor = InMemoryExecutor(self.clock, duration_s=lambda spec: spec.get("duration", 10))
        self.metrics = ShoalMetrics()
        self.service = self.new_service()

    def new_service(self) -> Service:
        class Nodes:  # a node source that can probe, like RayNodes
            def __call__(_):
                return [NodeInfo(n, f"node-{n}", alive=self.alive[n] and n not in self.down, cpus=8)
                        for n in self.readers]

            def probe(_, node_id):
                return node_id not in self.down

        service = Service(self.store, self.executor, Inventory(Nodes(), self.readers), self.config, self.clock,
                          self.tmp, listeners=[FakeGpuLoad(self.readers), self.metrics.events])
        service.views.usage_refresh_s = 0.0
        return service

    def submit(self, gpus: int, duration: float = 20, max_retries: int = 1):
        return self.store.submit(spec={"name": "j", "duration": duration, "max_retries": max_retries,
                                       "resources": {"cpus_per_gpu": 2}}, name="j", team="a", user="u",
                                 priority=0, gpus=gpus, memory_per_gpu_mib=MEM, now=self.clock.now())

    def run(self, seconds: float):
        for _ in range(int(seconds)):
            self.service.tick()
            self.clock.advance(1)
        self.service.tick()

    def get(self, job):
        return self.store.get(job.id)

    def used(self) -> dict[tuple[str, int], int]:
        """(node, GPU) -> MiB the fake GPUs show in use (the fake load of Shoal's jobs)."""
        return {(n, r.index): r.memory_used_mib for n, rd in self.readers.items() for r in rd.read()}

    def scrape(self) -> list[tuple[str, dict, float]]:
        text = generate_latest(self.metrics.registry).decode()
        return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


@pytest.fixture
def cluster(tmp_path, db_url):
    c = Cluster(tmp_path, db_url)
    yield c
    c.store.close()


def test_gang_too_big_for_a_node_spans_the_fewest_nodes_accounted_on_each(cluster):
    c = cluster
    c.metrics.attach(c.service)
    gang = c.submit(gpus=4)
    c.service.tick()
    rec = c.get(gang)
    parts = pl.parts(rec.placement)
    assert rec.state is S.STARTING and len(parts) == 2 and sum(len(ix) for _, ix in parts) == 4
    assert (rec.placement["node_id"], tuple(rec.placement["gpu_indices"])) == parts[0]  # first part, as before
    assert [p["node"] for p in rec.placement["parts"]] == [f"node-{n}" for n, _ in parts]
    spanned = {n for n, _ in parts}
    # the launch carries every part; the fake load shows the job's memory on all 4 GPUs, no other
    req = c.executor.runs[(gang.id, 1)].req
    assert req.all_parts() == tuple(parts) and req.gpus == 4
    assert {k for k, v in c.used().items() if v == MEM} == {(n, i) for n, ix in parts for i in ix}
    # the policy's view: reserved memory, holders and CPUs on every node of the gang
    snap, _ = c.service.views.snapshot()
    (view,) = snap.running
    assert view.placements() == tuple(parts)
    for node in snap.nodes:
        held = [g for g in node.gpus if gang.id in g.allocated_to]
        assert len(held) == (2 if node.node_id in spanned else 0)
        assert all(g.reserved_mib == MEM for g in held)
        assert node.cpus_held == (4 if node.node_id in spanned else 0)  # 2 GPUs x 2 CPUs there
    # the usage ledger charges 4 GPUs; the event says where
    (usage,) = c.store.usage()
    assert usage.gpus == 4 and usage.node == "+".join(f"node-{n}" for n, _ in parts)
    assert any(e.reason == f"placed on {pl.describe(rec.placement)}" for e in c.store.events(gang.id))
    # metrics: every GPU of the gang carries its job label, on both nodes; one job series per node
    labelled = {(lb["Hostname"], lb["gpu"]) for name, lb, _ in c.scrape()
                if name == "DCGM_FI_DEV_FB_USED" and lb.get("job_id") == str(gang.id)}
    assert labelled == {(f"node-{n}", str(i)) for n, ix in parts for i in ix}
    per_node = {lb["node"]: v for name, lb, v in c.scrape() if name == "shoal_job_gpus"}
    assert per_node == {f"node-{n}": 2.0 for n in spanned}
    assert [v for name, lb, v in c.scrape() if name == "shoal_team_gpus_used"] == [4.0]
    # the third node still takes a 2-GPU job; a second gang waits for its GPUs
    pair, second = c.submit(gpus=2), c.submit(gpus=4)
    c.service.tick()
    assert pl.node_ids(c.get(pair).placement) == [n for n in c.readers if n not in spanned]
    assert c.get(second).state is S.QUEUED
    c.run(25)  # attained GPU-seconds count all 4 GPUs
    done = c.get(gang)
    assert done.state is S.SUCCEEDED and done.attained_gpu_s == pytest.approx(4 * 20, abs=4 * 1)
    assert c.get(second).state in (S.STARTING, S.RUNNING) and len(pl.parts(c.get(second).placement)) == 2


def test_a_gang_that_one_node_could_hold_waits_for_one_rather_than_spread(tmp_path, db_url):
    c = Cluster(tmp_path, db_url, nodes=2, gpus=4)
    try:
        # a foreign process fills GPU 0 of each node: 3 + 3 GPUs free
        pids = {n: c.readers[n].add_process(0, 80000) for n in ("n1", "n2")}
        four = c.submit(gpus=4)
        c.service.tick()
        rec = c.get(four)
        assert rec.state is S.QUEUED and "waiting for resources" in rec.pending_reason  # a node holds 4: wait
        c.readers["n2"].remove_process(pids["n2"])
        c.run(1)
        rec = c.get(four)
        assert rec.state in (S.STARTING, S.RUNNING) and "parts" not in rec.placement
        assert rec.placement["node_id"] == "n2" and len(rec.placement["gpu_indices"]) == 4
    finally:
        c.store.close()


def test_multi_node_off_in_the_config_keeps_big_gangs_waiting_with_the_reason(tmp_path, db_url):
    c = Cluster(tmp_path, db_url, nodes=2, gpus=2, multi_node=False)
    try:
        gang = c.submit(gpus=4)
        c.service.tick()
        rec = c.get(gang)
        assert rec.state is S.QUEUED and "largest H100 80GB node has 2 GPUs" in rec.pending_reason
    finally:
        c.store.close()


def test_losing_any_node_of_a_gang_requeues_it_whole_without_a_retry(cluster):
    c = cluster
    gang = c.submit(gpus=4, duration=30)
    c.run(2)
    parts = pl.parts(c.get(gang).placement)
    second = parts[1][0]
    c.alive[second] = False  # the cluster lists the gang's second node dead
    c.service.tick()
    rec = c.get(gang)
    assert rec.state in (S.QUEUED, S.ADMITTED, S.STARTING) and rec.retries == 0 and rec.attempt >= 1
    events = [e.reason for e in c.store.events(gang.id)]
    assert f"node node-{second} lost; resumes from the last checkpoint on another node" in events
    assert (gang.id, 1) not in c.executor.runs  # the whole attempt was killed, not just one node's part
    assert c.store.nodes()[second].lost
    # the first node's GPUs were let go too (no fake load left from attempt 1 anywhere)
    c.run(1)
    rec = c.get(gang)
    assert rec.attempt == 2 and second not in pl.node_ids(rec.placement)
    assert sum(v == MEM for v in c.used().values()) == 4


def test_a_gang_failing_with_a_silent_node_is_requeued_not_failed(cluster):
    c = cluster
    gang = c.submit(gpus=4, duration=30, max_retries=0)
    c.run(2)
    second = pl.parts(c.get(gang).placement)[1][0]
    c.down.add(second)  # alive to the cluster, but its raylet no longer answers
    c.executor.fail(gang.id, 1, "RayActorError: the actor died unexpectedly")
    c.service.tick()
    rec = c.get(gang)
    assert rec.state is not S.FAILED and rec.retries == 0
    assert c.store.nodes()[second].lost
    assert f"node node-{second} lost; resumes from the last checkpoint on another node" in [
        e.reason for e in c.store.events(gang.id)]


def test_a_gang_moves_whole_when_one_of_its_nodes_is_drained_by_a_gpu_fault(cluster):
    c = cluster
    gang = c.submit(gpus=4, duration=60)
    c.run(2)
    parts = pl.parts(c.get(gang).placement)
    faulty = parts[1][0]
    c.readers[faulty].inject_xid(parts[1][1][0], count=1)
    c.service.tick()
    assert c.store.nodes()[faulty].drained
    assert c.get(gang).state is S.PREEMPTING  # the whole gang checkpoints
    c.run(1)
    rec = c.get(gang)
    assert rec.attempt == 2 and rec.retries == 0 and faulty not in pl.node_ids(rec.placement)
    assert len(pl.parts(rec.placement)) == 2


def test_restart_adopts_a_live_gang_and_requeues_a_dead_one(cluster):
    c = cluster
    gang = c.submit(gpus=4, duration=30)
    c.run(3)
    parts = pl.parts(c.get(gang).placement)
    # a new scheduler, same executor (the runs live on): adopted, its load shown on every node again
    for r in c.readers.values():
        r.detach_job(gang.id)
    c.service = c.new_service()
    c.service.recover()
    assert c.get(gang).state is S.RUNNING and c.executor.launches == [(gang.id, 1)]
    assert {k for k, v in c.used().items() if v == MEM} == {(n, i) for n, ix in parts for i in ix}
    # a new scheduler AND a new executor (the runs died): requeued whole, relaunched once on 4 GPUs
    c.store.close()
    c.store = Store(c.url)
    c.executor = InMemoryExecutor(c.clock, duration_s=lambda spec: spec.get("duration", 10))
    c.service = c.new_service()
    c.service.recover()
    rec = c.get(gang)
    assert rec.state is S.QUEUED and rec.placement is None
    assert not any(v for v in c.used().values())  # released on every node
    c.run(1)
    assert c.executor.launches == [(gang.id, 2)] and c.executor.runs[(gang.id, 2)].req.gpus == 4


def test_cluster_config_multi_node_field_and_its_errors(tmp_path):
    assert ClusterConfig().scheduler.multi_node is True
    bad = tmp_path / "cluster.yaml"
    bad.write_text("scheduler:\n  multi_node: sometimes\n")
    with pytest.raises(SpecError) as e:
        load_cluster_config(bad)
    assert any("scheduler.multi_node" in p for p in e.value.problems)


def req(parts, node="n1", gpus=(0, 1)) -> LaunchRequest:
    spec = {"name": "j", "team": "a", "model": "/m", "dataset": {"train": "/t.jsonl"},
            "sim": {"duration_s": 10}}
    return LaunchRequest(job_id=1, attempt=1, spec=spec, node_id=node, gpu_indices=gpus, memory_per_gpu_mib=1,
                         job_dir="/jobs/1", output_dir="/out", parts=parts)


def test_launch_request_parts_reach_the_trainer_and_ray_placement():
    one = req(())
    assert one.all_parts() == (("n1", (0, 1)),) and one.gpus == 2
    assert worker_placement(one) == {"placement_strategy": "STRICT_PACK", "label_selector": {"ray.io/node-id": "n1"}}
    assert "gpu_indices_by_node" not in train_config(one)
    gang = req((("n1", (0, 1)), ("n2", (1,))))
    assert gang.gpus == 3
    assert worker_placement(gang) == {"placement_strategy": "PACK", "label_selector": [
        {"ray.io/node-id": "n1"}, {"ray.io/node-id": "n1"}, {"ray.io/node-id": "n2"}]}
    cfg = TrainConfig.model_validate(train_config(gang))
    assert cfg.gpu_indices == [0, 1] and cfg.gpu_indices_by_node == {"n1": [0, 1], "n2": [1]}


def test_sim_executor_runs_a_gang_on_the_gpus_of_every_node():
    clock = FakeClock()
    ex = SimExecutor(clock, share_throughput=[1.0, 1.0])  # two tenants of a GPU: half speed each
    ex.launch(req((("n1", (0, 1)), ("n2", (0, 1)))))
    assert ex.allocated_gpus() == 4
    r2 = req(())
    ex.launch(LaunchRequest(**{**r2.__dict__, "job_id": 2, "node_id": "n2", "gpu_indices": (1,)}))
    assert ex.allocated_gpus() == 4  # job 2 shares n2's GPU 1 with the gang: the gang slows down too
    clock.advance(15)
    assert ex.poll() == []  # 10 s of work at half speed (alone on its GPUs, the gang would be done)
    clock.advance(5)
    assert {o.job_id: o.status for o in ex.poll()} == {1: "succeeded", 2: "succeeded"}


def test_submit_admits_a_gang_wider_than_a_node_only_with_multi_node(tmp_path):
    import json

    from scheduler.admission import SubmitError, check_submission
    from scheduler.policy import GpuView, NodeView, TeamQuota
    from scheduler.spec import JobSpec

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16", "hidden_size": 64,
                                                   "num_hidden_layers": 2}))
    (model / "model.safetensors").write_bytes(b"\0" * 2_000_000)
    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "a", "completion": "b"}\n' * 3)
    nodes = tuple(NodeView(n, n, tuple(GpuView(i, "H100 80GB", 81920, 0) for i in range(8))) for n in ("n1", "n2"))

    def submit(gpus: int, multi_node: bool):
        cfg = ClusterConfig.model_validate({"teams": {"a": {"gpus": 32}}, "scheduler": {"multi_node": multi_node}})
        spec = JobSpec.model_validate({"name": "j", "team": "a", "model": str(model), "dataset": {"train": str(train)},
                                       "resources": {"gpus": gpus}})
        return check_submission(spec, cfg, nodes, (TeamQuota("a", 32),))

    assert submit(16, multi_node=True).gpus == 16
    with pytest.raises(SubmitError, match="can never run here: .*largest H100 80GB node has 8 GPUs"):
        submit(16, multi_node=False)
    with pytest.raises(SubmitError, match="can never run here"):
        submit(24, multi_node=True)  # more than the whole cluster
