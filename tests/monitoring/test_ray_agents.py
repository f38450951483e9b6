"""Node agents as Ray actors on a real multi-node Ray cluster (ray.cluster_utils.Cluster on this
machine: a head without GPUs and worker nodes with fake GPUs): one agent per node, pinned to it,
feeding the scheduler's inventory and /metrics; the fake GPU load of placed jobs goes through the
agents; a node that joins gets an agent and its GPUs appear; a removed node's series disappear."""
from __future__ import annotations

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.chaos import private_ray_tmpdir
from monitoring.exposition import render
from monitoring.metrics import ShoalMetrics
from scheduler.clock import WallClock
from scheduler.daemon import FakeGpuLoad
from scheduler.executor import InMemoryExecutor
from scheduler.inventory import Inventory
from scheduler.lifecycle import JobState
from scheduler.service import Service
from scheduler.spec import ClusterConfig
from scheduler.store import Store

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]


def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := pred()):
        assert time.monotonic() < deadline, f"timed out waiting for {what() if callable(what) else what}"
        time.sleep(0.2)
    return value


def _fb_used(registry) -> dict[tuple[str, str], tuple[float, str | None]]:
    """(Hostname, gpu) -> (DCGM_FI_DEV_FB_USED, job_id label) from the scheduler's exposition."""
    text = render(registry).decode()
    return {(s.labels["Hostname"], s.labels["gpu"]): (s.value, s.labels.get("job_id"))
            for f in text_string_to_metric_families(text) if f.name == "DCGM_FI_DEV_FB_USED" for s in f.samples}


@pytest.fixture(scope="module")
def cluster():
    """A head without GPUs and two worker nodes with 2 fake GPUs each."""
    from ray.cluster_utils import Cluster

    private_ray_tmpdir()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
    c.workers = [c.add_node(num_cpus=2, num_gpus=2) for _ in range(2)]
    c.wait_for_nodes()
    yield c
    c.shutdown()


def test_one_agent_per_ray_node_feeds_inventory_and_metrics(tmp_path, cluster):
    import ray

    from monitoring.ray_agents import RayNodeAgents
    from scheduler.ray_executor import RayNodes

    workers = cluster.workers
    ray.init(address=cluster.address, namespace="shoal-agents-test", log_to_driver=False)
    agents = None
    store = Store(f"sqlite:///{tmp_path / 'shoal.db'}")
    try:
        agents = RayNodeAgents({"kind": "fake", "model": "H100 80GB", "memory_mib": 81920}, interval_s=0.3)
        nodes = RayNodes(agents.reader_for)
        inventory = Inventory(nodes, nodes.readers)
        agents.start(nodes, first_s=120)
        config = ClusterConfig.model_validate({"gpu_models": {"H100 80GB": {"memory_gib": 80, "price_per_hour": 2}},
                                               "teams": {"a": {"gpus": 8}}})
        clock = WallClock()
        metrics = ShoalMetrics()
        service = Service(store, InMemoryExecutor(clock, duration_s=lambda spec: 3600), inventory, config, clock,
                          tmp_path, listeners=[FakeGpuLoad(nodes.readers), metrics.events])
        metrics.attach(service)
        metrics.registry.register(agents.collector())

        # every node's GPUs, read by the agent on that node
        ids = [w.node_id for w in workers]
        assert {nid: len(rs) for nid, rs in inventory.read().items()} == {ids[0]: 2, ids[1]: 2}
        for nid in ids:
            assert ray.get(agents.proxies[nid].actor.where.remote())[0] == nid
        names = inventory.node_names()
        assert {h for h, _ in _fb_used(metrics.registry)} == {names[ids[0]], names[ids[1]]}
        assert metrics.registry.get_sample_value("shoal_agent_reader_up", {"node": names[ids[0]]}) == 1.0

        # a placed job's fake load goes through its node's agent, into the readings and /metrics
        job = store.submit(spec={"name": "j"}, name="j", team="a", user="u", priority=0, gpus=2,
                           memory_per_gpu_mib=30000, now=clock.now())
        _wait(lambda: (service.tick(), store.get(job.id).state is JobState.RUNNING)[1], 30,
              lambda: f"the job to run (pending: {store.get(job.id).pending_reason})")
        placement = store.get(job.id).placement
        node = placement["node_id"]
        _wait(lambda: [r.memory_used_mib for r in inventory.read()[node]] == [30000, 30000], 30,
              "the agent to report the job's memory")
        host = names[node]
        series = _wait(lambda: (s := _fb_used(metrics.registry)).get((host, "0")) == (30000.0, str(job.id)) and s,
                       30, "the job's GPUs in /metrics")
        assert series[(host, "1")] == (30000.0, str(job.id))
        other = names[ids[1] if node == ids[0] else ids[0]]
        assert series[(other, "0")] == (0.0, None)

        # an agent that dies while its node lives is started again, and its node's GPUs come back
        quiet = ids[1] if node == ids[0] else ids[0]
        proxy, dead = agents.proxies[quiet], agents.proxies[quiet].actor
        ray.kill(dead)
        _wait(lambda: proxy.actor is not dead and proxy.error is None and proxy.pulled_at, 60,
              "the agent to be started again")
        assert len(inventory.read()[quiet]) == 2
        assert ray.get(agents.proxies[quiet].actor.where.remote())[0] == quiet

        # a node that joins gets its agent; a removed node's series disappear
        extra = cluster.add_node(num_cpus=1, num_gpus=1)
        _wait(lambda: len(inventory.read().get(extra.node_id, [])) == 1, 60, "the new node's GPU")
        new_host = inventory.node_names()[extra.node_id]
        _wait(lambda: (new_host, "0") in _fb_used(metrics.registry), 30, "the new node's series")
        assert ray.get(agents.proxies[extra.node_id].actor.where.remote())[0] == extra.node_id
        cluster.remove_node(extra)
        _wait(lambda: all(h != new_host for h, _ in _fb_used(metrics.registry)), 60, "the removed node's series to go")
        assert inventory.read()[extra.node_id] == []
        assert metrics.registry.get_sample_value("shoal_agent_reader_up", {"node": new_host}) is None
        assert {h for h, _ in _fb_used(metrics.registry)} == {names[ids[0]], names[ids[1]]}
    finally:
        if agents is not None:
            agents.close()
        store.close()
        ray.shutdown()


def test_daemon_with_ray_address_reads_every_node_through_its_agent(tmp_path, cluster):
    """`shoal up --ray-address` (the daemon process, probe workload): both worker nodes' GPUs in
    /metrics with their Hostname and agent health; a placed job's fake load shows on its GPU."""
    import httpx
    import yaml

    from benchmarks.chaos import Scheduler, job_spec

    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump({"teams": {"default": {"gpus": 4}}, "local": {"reader": "fake"}}))
    home = tmp_path / "home"
    home.mkdir()
    sched = Scheduler(home, cluster.address, config)
    try:
        client = sched.start(timeout=180)
        url = f"{client.url}/metrics"

        def scrape() -> dict:
            text = httpx.get(url, timeout=30).text
            return {(f.name, tuple(sorted(s.labels.items()))): s.value
                    for f in text_string_to_metric_families(text) for s in f.samples}

        def fb_used() -> dict:
            return {(dict(k)["Hostname"], dict(k)["gpu"]): (v, dict(k).get("job_id"))
                    for (n, k), v in scrape().items() if n == "DCGM_FI_DEV_FB_USED"}

        hosts = _wait(lambda: h if len(h := {host for host, _ in fb_used()}) == 2 else None, 60,
                      lambda: f"both nodes' GPUs in /metrics\n{sched.log()[-3000:]}")
        prefixes = {w.node_id[:8] for w in cluster.workers}
        assert {h.rsplit(":", 1)[1] for h in hosts} == prefixes  # Hostname = host:node id prefix
        assert sorted(fb_used()) == sorted((h, g) for h in hosts for g in ("0", "1"))
        up = {dict(k)["node"]: v for (n, k), v in scrape().items() if n == "shoal_agent_reader_up"}
        assert up == {h: 1.0 for h in hosts}
        job = client.submit(job_spec(0, steps=100000))  # probe steps: runs until the test ends
        # its estimated memory, on its one GPU (labelled at once; the memory comes with the agent's next poll)
        series = _wait(lambda: [(k, v) for k, v in fb_used().items() if v[1] == str(job.id) and v[0] > 0], 90,
                       lambda: f"the job's GPU and its memory in /metrics\n{sched.log()[-3000:]}")
        assert len(series) == 1
        assert sum(v for (_, _), (v, _) in fb_used().items()) == series[0][1][0]  # no other GPU is loaded
    finally:
        sched.stop()
