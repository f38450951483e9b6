"""The spine policy: quota, order, gang-on-one-node, best fit, live memory."""
from scheduler.policy import GpuView, JobRequest, NodeView, RunningJob, Snapshot, TeamQuota, never_fits, schedule

H100 = 81559


def node(name: str, gpus: int = 8, model: str = "H100 80GB", used: dict[int, int] | None = None,
         held: dict[int, int] | None = None, unhealthy: tuple[int, ...] = ()) -> NodeView:
    used, held = used or {}, held or {}
    return NodeView(name, name, tuple(
        GpuView(i, model, H100, used.get(i, 0), healthy=i not in unhealthy,
                allocated_to=(held[i],) if i in held else (), reserved_mib=10000 if i in held else 0)
        for i in range(gpus)))


def job(jid: int, team: str = "a", gpus: int = 1, prio: int = 0, t: float = 0.0, mem: int = 10000,
        model: str | None = None) -> JobRequest:
    return JobRequest(jid, team, prio, t or float(jid), gpus, mem, model)


def snap(nodes, pending, running=(), quotas=(("a", 8), ("b", 8))) -> Snapshot:
    return Snapshot(tuple(nodes), tuple(running), tuple(pending), tuple(TeamQuota(*q) for q in quotas), 1024)


def test_quota_keeps_job_pending_with_reason():
    running = [RunningJob(1, "a", 0, "n1", (0, 1, 2), 10000)]
    d = schedule(snap([node("n1", held={0: 1, 1: 1, 2: 1})], [job(2, gpus=2)], running, quotas=[("a", 4)]))
    assert d.to_start == ()
    assert d.pending[2] == "quota: team a holds 3 of 4 GPUs; job needs 2"


def test_priority_then_submit_time_decides_who_gets_the_last_gpu():
    d = schedule(snap([node("n1", gpus=1)], [job(1, t=1), job(2, t=2, prio=5), job(3, t=0.5)]))
    assert [s.job_id for s in d.to_start] == [2]
    assert set(d.pending) == {1, 3}
    d = schedule(snap([node("n1", gpus=1)], [job(1, t=1), job(3, t=0.5)]))
    assert [s.job_id for s in d.to_start] == [3]


def test_gang_is_all_or_nothing_on_one_node_and_best_fit():
    # n1 has 3 free, n2 has 8 free: a 2-GPU job goes to n1 (best fit keeps n2 whole).
    nodes = [node("n1", held={i: 9 for i in range(5)}), node("n2")]
    d = schedule(snap(nodes, [job(1, gpus=2)]))
    assert d.to_start[0].placement.node_id == "n1"
    assert d.to_start[0].placement.gpu_indices == (5, 6)
    # 4 GPUs: n1 cannot hold it whole, so n2; never split across nodes.
    d = schedule(snap(nodes, [job(2, gpus=4)]))
    assert d.to_start[0].placement.node_id == "n2"
    d = schedule(snap([node("n1", gpus=4), node("n2", gpus=4)], [job(3, gpus=6)], quotas=[("a", 8)]))
    assert d.to_start == () and "on one node" in d.pending[3]


def test_foreign_memory_is_respected():
    # GPU 0 has 75 GiB used by a process Shoal does not own: a 10 GiB job must go elsewhere.
    n = node("n1", gpus=2, used={0: 75000})
    d = schedule(snap([n], [job(1, mem=10000)]))
    assert d.to_start[0].placement.gpu_indices == (1,)
    d = schedule(snap([node("n1", gpus=1, used={0: 75000})], [job(1, mem=10000)]))
    assert d.to_start == () and "resources" in d.pending[1]


def test_same_cycle_starts_do_not_collide_and_unhealthy_gpus_are_skipped():
    d = schedule(snap([node("n1", gpus=4, unhealthy=(0,))], [job(i) for i in range(1, 6)]))
    placed = [s.placement.gpu_indices[0] for s in d.to_start]
    assert sorted(placed) == [1, 2, 3] and len(d.pending) == 2


def test_flavor_constraint():
    nodes = [node("l4", gpus=4, model="L4"), node("h", gpus=4)]
    d = schedule(snap(nodes, [job(1, model="L4")]))
    assert d.to_start[0].placement.node_id == "l4"


def test_deterministic():
    nodes = [node("n1", held={0: 9}), node("n2")]
    pending = [job(i, team="ab"[i % 2], gpus=1 + i % 3) for i in range(1, 12)]
    assert schedule(snap(nodes, pending)) == schedule(snap(nodes, pending))


def test_never_fits_reasons():
    nodes = (node("n1", gpus=4),)
    quotas = (TeamQuota("a", 8),)
    assert never_fits(job(1, gpus=4), nodes, quotas) is None
    assert "largest node: 4" in never_fits(job(1, gpus=8), nodes, quotas)
    assert "quota is 8" in never_fits(job(1, gpus=16), nodes, quotas)
    assert "no quota" in never_fits(job(1, team="zz"), nodes, quotas)
    assert never_fits(job(1, mem=200_000), nodes, quotas) is not None


def test_cpus_are_a_limit_too():
    # 8 free GPUs but 4 CPUs: two 1-GPU jobs with 2 CPUs per GPU fit, the third waits.
    n = NodeView("n1", "n1", node("n1").gpus, cpus=4)
    reqs = [JobRequest(i, "a", 0, float(i), 1, 1000, None, cpus_per_gpu=2) for i in (1, 2, 3)]
    d = schedule(snap([n], reqs))
    assert [s.job_id for s in d.to_start] == [1, 2]
    assert d.pending[3] == "resources: needs 2 CPUs on one node with its GPUs; the most free CPUs on a node is 0"
    held = NodeView("n1", "n1", node("n1").gpus, cpus=4, cpus_held=3)
    assert schedule(snap([held], reqs[:1])).to_start == ()
    big = JobRequest(9, "a", 0, 0.0, 2, 1000, None, cpus_per_gpu=3)
    assert "6 CPUs" in never_fits(big, (n,), (TeamQuota("a", 8),))
