"""Multi-node gangs on a real multi-node Ray cluster (ray.cluster_utils.Cluster on this machine: a
head without GPUs and two worker nodes with 2 fake GPUs each), with Shoal connected to it by
`shoal up --ray-address`:

  - a 4-GPU LoRA job on the tiny model is ONE Ray Train run with 4 DDP (gloo) workers, two on each
    node; every worker trains on the GPU index the placement gave it on its own node; the fake
    load and the GPU series' job labels show on both nodes; the job SUCCEEDS;
  - the probe workload holds a 4-GPU gang's GPUs on both nodes; a scheduler SIGKILLed and started
    again adopts it; the gang's second node is removed: the whole gang is requeued (no retry
    spent, the first node's runner ended too) and resumes from its checkpoint, on both nodes,
    once a node joins again.
"""
from __future__ import annotations

import json
import re
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.chaos import Scheduler
from scheduler import placement as pl
from scheduler.lifecycle import JobState
from tests.integration.harness import ShoalServer, write_spec
from tests.reliability.raycluster import two_node_cluster, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def cluster():
    yield from two_node_cluster()


def _start(tmp_path, cluster, *extra: str) -> ShoalServer:
    srv = ShoalServer(tmp_path / "home", config={"teams": {"default": {"gpus": 4}}})
    srv.client_ = srv.up("--ray-address", cluster.address, *extra)
    return srv


def _job_gpus(url: str, job_id: int) -> set[tuple[str, str]]:
    """(Hostname, gpu) of every GPU series /metrics labels with this job."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {(s.labels["Hostname"], s.labels["gpu"]) for fam in text_string_to_metric_families(text)
            if fam.name == "DCGM_FI_DEV_FB_USED" for s in fam.samples
            if s.labels.get("job_id") == str(job_id) and s.value > 0}


def _running_placement(client, jid, log):
    return wait_for(lambda: (j := client.job(jid)).state is JobState.RUNNING and j.placement, 900,
                 "the gang to run", log)


def test_gang_trains_with_ddp_across_two_nodes_each_worker_on_its_own_gpu(cluster, tmp_path, tiny_model_dir):
    srv = _start(tmp_path, cluster)
    try:
        client = srv.client_
        jid = client.submit_file(write_spec(tmp_path / "g.yaml", name="gang", checkpoint_every_steps=10,
                                            max_retries=0, **{"resources.gpus": 4,
                                                              "hyperparameters.max_steps": 30})).id
        placement = _running_placement(client, jid, srv.log)
        parts = pl.named_parts(placement)
        assert len(parts) == 2 and all(len(ix) == 2 for _, _, ix in parts), placement
        assert {n for n, _, _ in parts} == {w.node_id for w in cluster.workers}
        # the fake load of the job, and its labels on the GPU series, on both nodes
        want = {(name, str(i)) for _, name, ix in parts for i in ix}
        wait_for(lambda: _job_gpus(client.url, jid) == want, 120, f"job labels on {want}", srv.log)
        final = client.wait(jid, timeout=1200)
        assert final.state is JobState.SUCCEEDED, srv.log()[-4000:]
        r = final.result
        assert (r["world_size"], r["parallelism"], r["steps"], final.retries) == (4, "ddp", 30, 0)
        # each worker said where it ran and which GPU it took: its own node's part, one GPU each
        lines = (srv.home / "jobs" / str(jid) / "train.log").read_text()
        seen = re.findall(r"\[shoal trainer\] worker (\d+)/4 on node (\w+): GPU (\d+) \((\w+)\)", lines)
        assert sorted(int(rank) for rank, *_ in seen) == [0, 1, 2, 3], lines[-3000:]
        assert sorted((node, int(gpu)) for _, node, gpu, _ in seen) == sorted(
            (n, i) for n, _, ix in parts for i in ix)
        assert {dev for *_, dev in seen} == {"cpu"}  # no CUDA here: the index is chosen, the device is CPU
        assert _job_gpus(client.url, jid) == set()  # released everywhere
    finally:
        srv.down()


def test_probe_gang_adopted_after_a_scheduler_crash_then_requeued_whole_when_its_second_node_goes(
        cluster, tmp_path, tiny_model_dir):
    while len(cluster.workers) < 2:  # whatever an earlier test left
        cluster.workers.append(cluster.add_node(num_cpus=2, num_gpus=2))
    cluster.wait_for_nodes()
    home = tmp_path / "home"
    home.mkdir()
    config = tmp_path / "cluster.yaml"
    config.write_text("teams: {default: {gpus: 4}}\n")
    sched = Scheduler(home, cluster.address, config)  # the daemon with --workload probe
    try:
        client = sched.start()
        jid = client.submit_file(write_spec(tmp_path / "p.yaml", name="probe-gang", checkpoint_every_steps=20,
                                            max_retries=0, **{"resources.gpus": 4,
                                                              "hyperparameters.max_steps": 600})).id
        placement = _running_placement(client, jid, sched.log)
        parts = pl.named_parts(placement)
        assert len(parts) == 2, placement
        on_both = {(name, str(i)) for _, name, ix in parts for i in ix}
        wait_for(lambda: _job_gpus(client.url, jid) == on_both, 120, "the job's load on both nodes", sched.log)
        # The scheduler dies; a new one adopts the running gang (same attempt, not relaunched) and
        # shows its load on both nodes again.
        sched.kill()
        client = sched.start()
        assert (j := client.job(jid)).state is JobState.RUNNING and j.attempt == 1
        wait_for(lambda: _job_gpus(client.url, jid) == on_both, 120, "the adopted job's load on both nodes", sched.log)
        wait_for(lambda: (client.job(jid).progress or {}).get("checkpoint_step", 0) >= 20, 300, "a checkpoint",
              sched.log)
        # The gang's second node goes: the whole gang is requeued, no retry spent
        second = parts[1][0]
        victim = next(w for w in cluster.workers if w.node_id == second)
        cluster.remove_node(victim, allow_graceful=False)
        cluster.workers.remove(victim)
        requeued = wait_for(lambda: (j := client.job(jid)).state is JobState.QUEUED and j, 300, "the gang requeued",
                         sched.log)
        assert requeued.retries == 0 and requeued.placement is None
        reasons = [e.reason for e in client.events(jid)]
        assert any(re.match(rf"node \S+:{second[:8]} lost; resumes from the last checkpoint", r) for r in reasons), \
            reasons
        time.sleep(3)  # 2 GPUs left: the 4-GPU gang waits (no partial gang is ever launched)
        assert client.job(jid).state is JobState.QUEUED
        cluster.workers.append(cluster.add_node(num_cpus=2, num_gpus=2))
        final = client.wait(jid, timeout=600)
        assert final.state is JobState.SUCCEEDED and final.retries == 0 and final.attempt == 2, sched.log()[-4000:]
        ledger = [json.loads(x) for x in (home / "jobs" / str(jid) / "probe-ledger.jsonl").read_text().split("\n") if x]
        starts = [e for e in ledger if e["event"] == "start"]
        assert [e["attempt"] for e in starts] == [1, 2] and starts[1]["resumed_from_step"] >= 20
        assert len(starts[1]["nodes"]) == 2 and second not in starts[1]["nodes"]
        assert [e["attempt"] for e in ledger if e["event"] == "end"] == [2]
        assert {e["event"] for e in ledger if e["attempt"] == 1} <= {"start", "lost"}  # attempt 1 never went on
    finally:
        sched.stop()
