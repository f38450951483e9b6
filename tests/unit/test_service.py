"""The service loop with real store (SQLite and PostgreSQL), fake clock, fake GPUs and the in-memory executor."""
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
from tests.reliability.db import db_url, pg_database  # noqa: F401 - fixtures: every test on SQLite and PostgreSQL


class World:
    def __init__(self, tmp: Path, quotas: dict[str, int] | None = None, gpus: int = 4, url: str | None = None):
        self.clock = FakeClock()
        self.reader = FakeGpuReader(gpus)
        self.url = url or f"sqlite:///{tmp / 'shoal.db'}"
        self.tmp = tmp
        self.config = ClusterConfig(teams={t: TeamConfig(gpus=n) for t, n in (quotas or {"a": 4, "b": 4}).items()})
        self.store = Store(self.url)
        self.executor = InMemoryExecutor(self.clock, duration_s=lambda spec: spec.get("duration", 10))
        self.service = self.new_service()

    def new_service(self) -> Service:
        inv = Inventory(lambda: [NodeInfo("n1", "node-1")], {"n1": self.reader})
        return Service(self.store, self.executor, inv, self.config, self.clock, self.tmp,
                       listeners=[FakeGpuLoad(self.reader)])

    def submit(self, team="a", gpus=1, prio=0, duration=10, max_retries=1, mem=10000):
        return self.store.submit(spec={"name": "j", "duration": duration, "max_retries": max_retries},
                                 name="j", team=team, user="u", priority=prio, gpus=gpus,
                                 memory_per_gpu_mib=mem, now=self.clock.now())

    def run(self, seconds: float, step: float = 1.0):
        t = 0.0
        while t < seconds:
            self.service.tick()
            self.clock.advance(step)
            t += step
        self.service.tick()

    def state(self, job) -> S:
        return self.store.get(job.id).state


@pytest.fixture
def world(tmp_path, db_url):
    w = World(tmp_path, url=db_url)
    yield w
    w.store.close()


def test_jobs_run_to_success_on_distinct_gpus_with_history(world):
    a, b = world.submit(), world.submit(team="b")
    world.service.tick()
    pa, pb = (world.store.get(j.id).placement for j in (a, b))
    assert pa["gpu_indices"] != pb["gpu_indices"]
    assert world.state(a) is S.STARTING
    # While running, the fake GPU shows the job's memory (as NVML would).
    assert world.reader.read()[pa["gpu_indices"][0]].memory_used_mib == 10000
    world.run(12)
    assert world.state(a) is S.SUCCEEDED and world.state(b) is S.SUCCEEDED
    assert [e.to_state for e in world.store.events(a.id)] == ["QUEUED", "ADMITTED", "STARTING", "RUNNING", "SUCCEEDED"]
    assert world.reader.read()[pa["gpu_indices"][0]].memory_used_mib == 0
    assert world.store.get(a.id).progress["step"] == 10
    assert "step 10/10" in world.service.log_path(a.id).read_text()


def test_over_quota_job_waits_with_reason_then_runs(tmp_path, db_url):
    w = World(tmp_path, url=db_url, quotas={"a": 2})
    first, second = w.submit(gpus=2), w.submit(gpus=1)
    w.service.tick()
    assert w.state(first) is S.STARTING and w.state(second) is S.QUEUED
    assert w.store.get(second.id).pending_reason == ("waiting for quota: team a uses 2/2 GPUs, job needs 1; "
                                                    "no cohort to borrow from")
    w.run(11)
    assert w.state(first) is S.SUCCEEDED and w.state(second) in (S.STARTING, S.RUNNING)
    assert w.store.get(second.id).pending_reason is None


def test_failure_retries_then_fails_for_good(world):
    job = world.submit(max_retries=1)
    world.executor.fail_next[job.id] = "CUDA error: boom"
    world.run(11)
    rec = world.store.get(job.id)
    assert rec.retries == 1 and rec.attempt == 2 and rec.state in (S.STARTING, S.RUNNING)
    world.executor.fail_next[job.id] = "CUDA error: boom again"
    world.run(11)
    rec = world.store.get(job.id)
    assert rec.state is S.FAILED and "boom again" in rec.failure_reason
    reasons = [e.reason for e in world.store.events(job.id)]
    assert any("retry 1/1" in r for r in reasons)


def test_cancel_queued_and_running(tmp_path, db_url):
    w = World(tmp_path, url=db_url, quotas={"a": 1})
    running, queued = w.submit(), w.submit()
    w.run(2)
    assert w.state(running) is S.RUNNING
    w.store.request_cancel(queued.id)
    w.store.request_cancel(running.id)
    w.service.tick()
    w.service.tick()
    assert w.state(queued) is S.CANCELLED and w.state(running) is S.CANCELLED
    assert not w.executor.active()


def test_restart_requeues_lost_jobs_and_never_runs_one_twice(tmp_path, db_url):
    w = World(tmp_path, url=db_url, quotas={"a": 4})
    jobs = [w.submit(duration=20), w.submit(duration=20)]
    w.run(3)
    assert all(w.state(j) is S.RUNNING for j in jobs)
    # The service dies; its executor's runs die with it (a new, empty executor after restart).
    old = w.executor
    w.store.close()
    w.store = Store(w.url)
    w.executor = InMemoryExecutor(w.clock, duration_s=lambda spec: spec["duration"])
    w.service = w.new_service()
    w.service.recover()
    assert all(w.state(j) is S.QUEUED for j in jobs)
    w.run(25)
    assert all(w.state(j) is S.SUCCEEDED for j in jobs)
    for j in jobs:  # each attempt launched once; attempts never overlap
        assert w.store.get(j.id).attempt == 2
    assert sorted(w.executor.launches) == sorted((j.id, 2) for j in jobs)
    # A late outcome from the dead executor's attempt is ignored.
    w.clock.advance(100)
    for o in old.poll():
        w.service._ingest_outcome(o)
    assert all(w.state(j) is S.SUCCEEDED for j in jobs)


def test_recover_adopts_live_runs(world):
    job = world.submit(duration=20)
    world.run(3)
    world.service = world.new_service()  # same executor: the run is still alive
    world.service.recover()
    assert world.state(job) is S.RUNNING
    world.run(20)
    assert world.state(job) is S.SUCCEEDED and world.executor.launches == [(job.id, 1)]


def test_shutdown_checkpoints_and_requeues(world):
    job = world.submit(duration=50)
    world.run(3)
    world.service.shutdown(grace_s=5)
    rec = world.store.get(job.id)
    assert rec.state is S.QUEUED and rec.placement is None
    assert [e.to_state for e in world.store.events(job.id)][-2:] == ["PREEMPTING", "QUEUED"]
    assert world.reader.read()[0].memory_used_mib == 0


def test_foreign_process_pushes_job_to_another_gpu(world):
    world.reader.add_process(0, 75000, name="someone-elses-notebook")
    job = world.submit(mem=10000)
    world.service.tick()
    assert world.store.get(job.id).placement["gpu_indices"] == [1]


class _BrokenLauncher(InMemoryExecutor):
    def launch(self, req):
        raise ConnectionError("Ray is unreachable")


def test_launch_errors_count_as_failed_attempts(tmp_path, db_url):
    w = World(tmp_path, url=db_url)
    w.executor = _BrokenLauncher(w.clock)
    w.service = w.new_service()
    job = w.submit(max_retries=2)
    w.run(3)
    rec = w.store.get(job.id)
    assert rec.state is S.FAILED and rec.attempt == 3 and rec.retries == 2
    assert "Ray is unreachable" in rec.failure_reason
    assert w.reader.read()[0].memory_used_mib == 0  # nothing left on the GPU


def test_policy_preemption_checkpoints_and_requeues(tmp_path, db_url):
    """A policy that preempts job 1 for job 2 (the seam richer policies use)."""
    from scheduler.policy import Decision, Preempt, schedule

    def preempt_low_priority(snap):
        d = schedule(snap)
        waiting_high = [p for p in snap.pending if p.priority > 0 and p.job_id in d.pending]
        victims = [r for r in snap.running if r.priority == 0]
        if waiting_high and victims:
            return Decision(d.to_start, (Preempt(victims[0].job_id, "priority"),), d.pending)
        return d

    w = World(tmp_path, url=db_url, quotas={"a": 1})
    w.service.policy = preempt_low_priority
    low = w.submit(duration=30)
    w.run(3)
    high = w.submit(prio=10, duration=5)
    w.run(2)
    assert [e.to_state for e in w.store.events(low.id)][-2:] == ["PREEMPTING", "QUEUED"]
    assert "preempted: priority" in w.store.events(low.id)[-2].reason
    w.run(40)
    assert w.state(high) is S.SUCCEEDED and w.state(low) is S.SUCCEEDED
    assert w.store.get(low.id).attempt == 2


def test_snapshot_carries_attempt_times_and_attained_service(world):
    """The policy's inputs for fair share / LAS / min-runtime: per-attempt start, and GPU-seconds
    accumulated across attempts (a preempted attempt's time is kept)."""
    job = world.submit(gpus=2, duration=100)
    t0 = world.clock.now()
    world.service.tick()
    world.clock.advance(5)
    snap, _ = world.service.views.snapshot()
    (running,) = snap.running
    assert running.started_at == t0 and snap.now == t0 + 5
    assert running.attained(snap.now) == pytest.approx(2 * 5)
    world.service._preempt(job.id, "test")
    world.clock.advance(1)
    world.service.tick()  # stopped, requeued and (GPUs free) started again, all in this tick
    rec = world.store.get(job.id)
    assert rec.attempt == 2 and rec.attempt_started_at == t0 + 6
    assert rec.attained_gpu_s == pytest.approx(2 * 6)  # the first attempt's GPU-seconds, kept
    world.clock.advance(1)
    snap, _ = world.service.views.snapshot()
    assert snap.running[0].attained(snap.now) == pytest.approx(2 * 7)


def test_records_the_api_hands_over_are_used_only_while_their_row_is_unchanged(tmp_path, db_url):
    """The API's batcher hands the jobs it committed to the loop (StoreViews.note_submitted) so the
    loop need not read them back; a hint whose row changed since is ignored and the row read."""
    from dataclasses import replace

    w = World(tmp_path, url=db_url, quotas={"a": 1})
    running, fresh, changed = w.submit(), w.submit(), w.submit()
    w.service.tick()  # `running` takes the team's one GPU; the two others wait
    w.clock.advance(5)
    late = w.submit()
    # `changed` was held and released after the hint was made: its row's version moved on.
    w.store.transition(changed.id, S.QUEUED, S.HELD, reason="hold", now=w.clock.now())
    w.store.transition(changed.id, S.HELD, S.QUEUED, reason="release", now=w.clock.now())
    stale_hint = replace(w.store.get(changed.id), priority=99, updated_at=changed.updated_at)
    # A hint is trusted while its version equals the row's: marked here so the test can tell.
    w.service.views.note_submitted([replace(late, name="as-handed"), stale_hint])
    w.service.tick()
    cache = {i: rec for i, (_, rec) in w.service.views._queued_cache.items()}
    assert sorted(cache) == [fresh.id, changed.id, late.id]
    assert cache[late.id].name == "as-handed"  # taken as handed over: equal version, not read back
    assert cache[changed.id].priority == 0  # the row, not the stale hint
    assert w.store.get(late.id).pending_reason.startswith("waiting for quota")
    assert w.service.views._handed == {}


def test_remaining_time_of_a_job_past_its_estimate_is_not_zero():
    """Expected remaining run time: the estimate minus the work done; once a job has run past its
    estimate, a quarter of what it ran so far (heavy-tailed run times), so it neither looks about
    to end nor shortest of all."""
    from scheduler.snapshot import remaining_s

    spec = {"resources": {"expected_duration_s": 1000}}
    assert remaining_s(spec, 2, attained_gpu_s=0) == 1000
    assert remaining_s(spec, 2, attained_gpu_s=2 * 600) == 400
    assert remaining_s(spec, 2, attained_gpu_s=2 * 1000) == 250  # at the estimate: 0.25 x 1000
    assert remaining_s(spec, 2, attained_gpu_s=2 * 4000) == 1000
    assert remaining_s({"resources": {}}, 2, attained_gpu_s=50) is None


def test_the_loops_views_kept_by_a_change_log_equal_a_full_read(tmp_path):
    """On a MemoryStore the loop's running views, queue and requests are kept by the store's change
    log (StoreViews._advance, Store.changes_since) instead of read in full every cycle. Through
    starts, ends, a failure, checkpoints, a preemption, a hold, a cancel and late arrivals they
    equal, after every tick and in the same order, what the full reads give."""
    from scheduler.store import MemoryStore

    w = World(tmp_path, quotas={"a": 2, "b": 2})
    w.store.close()
    w.store = MemoryStore()
    w.config = ClusterConfig(teams=w.config.teams, scheduler={"min_runtime_s": 0})  # preemptible at once
    w.service = w.new_service()
    views = w.service.views
    low = [w.submit(team="a", duration=30) for _ in range(2)] + [w.submit(team="b", duration=5)]
    w.submit(team="b", gpus=2, duration=8)
    seen_states: set[S] = set()
    for t in range(40):
        if t == 3:
            w.submit(team="a", prio=5, duration=4)  # preempts one of team a's long jobs
        if t == 4:
            w.store.update_fields(low[0].id, last_checkpoint_at=w.clock.now(), last_checkpoint_step=10)
        if t == 6:
            held = w.submit(team="b")
            w.store.transition(held.id, S.QUEUED, S.HELD, reason="hold", now=w.clock.now())
        if t == 9:
            w.store.transition(held.id, S.HELD, S.QUEUED, reason="release", now=w.clock.now())
            w.store.request_cancel(w.submit(team="a").id)
        if t == 12 and w.state(low[1]) is S.RUNNING:
            w.executor.fail(low[1].id, w.store.get(low[1].id).attempt, "boom")
        w.service.tick()
        queued = views.queued_jobs()
        full_queue = w.store.jobs(states=[S.QUEUED], cancel_requested=False)
        assert queued == full_queue  # the current records (reasons written last cycle included)
        assert views.live_running_views() == tuple(views.running_views(w.store.active_jobs()))
        snap, _ = views.snapshot(queued)
        assert snap.pending == views.pending_views(full_queue)
        seen_states |= {j.state for j in w.store.jobs()}
        w.clock.advance(1)
    assert {S.RUNNING, S.PREEMPTING, S.QUEUED, S.SUCCEEDED, S.CANCELLED} <= seen_states
    assert w.store.events(low[0].id)[-1].to_state == "SUCCEEDED" and w.store.get(low[0].id).attempt == 2
