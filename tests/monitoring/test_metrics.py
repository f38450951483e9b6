"""Scheduler metrics on a scripted run with a fake clock: the real Service, SQLite store, usage
ledger, policy, fake GPUs and the in-memory executor; values read from the exposition."""
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from monitoring.gpu import FakeGpuReader
from monitoring.metrics import ShoalMetrics, reason_category
from scheduler.clock import FakeClock
from scheduler.daemon import FakeGpuLoad
from scheduler.executor import InMemoryExecutor
from scheduler.inventory import Inventory, NodeInfo
from scheduler.lifecycle import JobState as S
from scheduler.service import Service
from scheduler.spec import ClusterConfig
from scheduler.store import Store

H100_PRICE = 3.60  # USD per GPU-hour: 0.001 USD per GPU-second, easy to check


class World:
    def __init__(self, tmp, teams: dict):
        self.clock = FakeClock()
        self.config = ClusterConfig.model_validate({
            "gpu_models": {"H100 80GB": {"memory_gib": 80, "price_per_hour": H100_PRICE}},
            "teams": teams, "scheduler": {"min_runtime_s": 0}})
        self.reader = FakeGpuReader(4, "H100 80GB", 81920, clock=self.clock.now)
        self.store = Store(f"sqlite:///{tmp / 'shoal.db'}")
        self.executor = InMemoryExecutor(self.clock, duration_s=lambda spec: spec.get("duration", 10))
        self.metrics = ShoalMetrics()
        inv = Inventory(lambda: [NodeInfo("n1", "node-1", cpus=16)], {"n1": self.reader})
        self.service = Service(self.store, self.executor, inv, self.config, self.clock, tmp,
                               listeners=[FakeGpuLoad(self.reader), self.metrics.events],
                               on_cycle=self.metrics.cycle.observe)
        self.service.views.usage_refresh_s = 0.0
        self.metrics.attach(self.service)

    def submit(self, team="a", gpus=1, duration=10, mem=10000, max_retries=1, shareable=False):
        spec = {"name": "j", "duration": duration, "max_retries": max_retries,
                "resources": {"shareable": shareable}}
        return self.store.submit(spec=spec, name="j", team=team, user="u", priority=0, gpus=gpus,
                                 memory_per_gpu_mib=mem, now=self.clock.now())

    def run(self, seconds: float, step: float = 1.0):
        for _ in range(int(seconds / step)):
            self.service.tick()
            self.clock.advance(step)
        self.service.tick()

    def scrape(self) -> dict:
        """{(name, frozenset(labels)): value} from the text exposition, as Prometheus would see it."""
        text = generate_latest(self.metrics.registry).decode()
        return {(s.name, frozenset(s.labels.items())): s.value
                for f in text_string_to_metric_families(text) for s in f.samples}

    def value(self, name, **labels):
        got = [v for (n, ls), v in self.scrape().items() if n == name and set(labels.items()) <= set(ls)]
        assert len(got) == 1, f"{name}{labels}: {len(got)} series"
        return got[0]

    def series(self, name, **labels):
        return [dict(ls) for (n, ls) in self.scrape() if n == name and set(labels.items()) <= set(ls)]


@pytest.fixture
def world(tmp_path):
    # no cohort: nothing can be borrowed, so placements do not depend on the policy's borrowing rules
    w = World(tmp_path, {"a": {"gpus": 3, "budget_usd": 0.05}, "b": {"gpus": 1}})
    yield w
    w.store.close()


def test_cost_counters_add_up_to_price_times_time(world):
    world.scrape()  # a scrape before anything runs: counters start from the ledger, not the scrape
    a = world.submit("a", gpus=2, duration=100)
    b = world.submit("b", gpus=1, duration=50)
    world.run(30)
    # running: a 2 GPUs x 30 s, b 1 GPU x 30 s (both admitted at t=0)
    assert world.value("shoal_team_gpu_cost_usd_total", team="a", flavor="H100 80GB") == pytest.approx(0.060)
    assert world.value("shoal_team_gpu_cost_usd_total", team="b", flavor="H100 80GB") == pytest.approx(0.030)
    assert world.value("shoal_job_cost_usd", job_id=str(a.id)) == pytest.approx(0.060)
    world.run(100)
    assert world.store.get(a.id).state is S.SUCCEEDED and world.store.get(b.id).state is S.SUCCEEDED
    # finished: a 2 x 100 s, b 1 x 50 s (a job holds its GPUs until the cycle that sees its end)
    ga = world.value("shoal_team_gpu_seconds_total", team="a", flavor="H100 80GB")
    gb = world.value("shoal_team_gpu_seconds_total", team="b", flavor="H100 80GB")
    assert ga == pytest.approx(200, abs=2 * 1.0) and gb == pytest.approx(50, abs=1.0)
    assert world.value("shoal_team_gpu_cost_usd_total", team="a", flavor="H100 80GB") == pytest.approx(
        ga * H100_PRICE / 3600, rel=1e-9)
    assert world.value("shoal_team_gpu_cost_usd_total", team="b", flavor="H100 80GB") == pytest.approx(
        gb * H100_PRICE / 3600, rel=1e-9)
    assert world.series("shoal_job_cost_usd") == []  # finished jobs' series are gone
    # budget: a spent ~0.20 of 0.05 this month; b has no budget
    assert world.value("shoal_team_spend_usd", team="a") == pytest.approx(ga * 0.001)
    assert world.value("shoal_team_budget_remaining_usd", team="a") == pytest.approx(0.05 - ga * 0.001)
    assert world.series("shoal_team_budget_usd", team="b") == []
    # capacity cost: 4 GPUs for the 130 s between the first and the last scrape
    cap = world.value("shoal_gpu_capacity_cost_usd_total", node="node-1")
    assert cap == pytest.approx(4 * 130 * 0.001)
    assert world.value("node_gpu_hourly_cost", node="node-1", instance_type="H100 80GB") == H100_PRICE
    assert world.value("node_gpu_count", node="node-1") == 4


def test_cost_counters_stay_monotonic_across_attempts_and_scrapes(world):
    j = world.submit("a", gpus=1, duration=20, max_retries=2)
    world.executor.fail_next[j.id] = "boom"
    seen = []
    for _ in range(50):
        world.run(1)
        seen.append(world.value("shoal_team_gpu_cost_usd_total", team="a", flavor="H100 80GB"))
    assert world.store.get(j.id).state is S.SUCCEEDED and world.store.get(j.id).attempt == 2
    assert seen == sorted(seen) and seen[-1] == pytest.approx(
        sum(r.ended_at - r.started_at for r in world.store.usage()) * 0.001)


def test_shared_gpu_is_charged_by_memory_share(tmp_path):
    w = World(tmp_path, {"a": {"gpus": 4}})
    try:
        j = w.submit("a", gpus=1, duration=100, mem=20480, shareable=True)  # a quarter of 80 GiB
        w.run(40)
        assert w.value("shoal_team_gpu_cost_usd_total", team="a") == pytest.approx(40 * 0.25 * 0.001)
        assert w.value("shoal_job_cost_usd", job_id=str(j.id)) == pytest.approx(40 * 0.25 * 0.001)
    finally:
        w.store.close()


def test_job_queue_gpu_and_event_series(world):
    world.scrape()
    a = world.submit("a", gpus=3, duration=20)
    world.run(2)
    waiting = world.submit("a", gpus=1, duration=5)  # a holds its 3 nominal GPUs: waits on quota
    failing = world.submit("b", gpus=1, duration=3, max_retries=1)
    world.executor.fail_next[failing.id] = "boom"
    world.run(5)
    assert world.value("shoal_jobs", state="RUNNING", team="a") == 1
    assert world.value("shoal_queue_jobs", team="a") == 1
    pending = world.series("shoal_queue_pending_jobs", team="a")  # reason: the policy's word for it
    assert len(pending) == 1 and world.value("shoal_queue_pending_jobs", team="a") == 1
    assert pending[0]["reason"] == reason_category(world.store.get(waiting.id).pending_reason) != "none"
    assert world.value("shoal_queue_oldest_wait_seconds", team="a") == pytest.approx(5)
    assert world.value("shoal_gpus", state="allocated") == 4 and world.value("shoal_gpus", state="free") == 0
    idx = world.store.get(a.id).placement["gpu_indices"]
    world.reader.set_utilization(idx[0], 0.0)
    assert world.value("shoal_gpus_allocated_idle") == 1
    assert world.value("shoal_job_gpus", job_id=str(a.id)) == 3
    assert world.value("shoal_job_gpu_memory_reserved_bytes", job_id=str(a.id)) == 3 * 10000 * 2**20
    assert world.value("shoal_job_gpu_memory_used_bytes", job_id=str(a.id)) == 3 * 10000 * 2**20
    assert world.value("shoal_job_gpu_utilization_ratio", job_id=str(a.id)) == pytest.approx(0.9)
    assert world.value("shoal_job_step", job_id=str(a.id)) == 7
    dcgm = world.series("DCGM_FI_DEV_FB_USED", job_id=str(a.id))
    assert sorted(int(s["gpu"]) for s in dcgm) == sorted(idx) and {s["team"] for s in dcgm} == {"a"}
    # quota: a holds its nominal 3, b holds 1 = its nominal: nothing borrowed or lent
    assert world.value("shoal_team_gpus_used", team="a", flavor="any") == 3
    assert world.value("shoal_team_quota_nominal_gpus", team="b", flavor="any") == 1
    assert world.value("shoal_team_gpus_borrowed", team="a") == 0
    world.run(30)
    assert world.store.get(a.id).state is S.SUCCEEDED
    assert world.value("shoal_job_retries_total", team="b") == 1
    assert world.value("shoal_job_preemptions_total", team="a") == 0  # zero series exist per team
    assert world.value("shoal_job_wait_seconds_count", team="a") == 2
    assert world.value("shoal_job_wait_seconds_sum", team="a") == pytest.approx(20 - 2 + 1, abs=1)
    assert world.value("shoal_job_completion_seconds_count", team="a", state="SUCCEEDED") == 2
    assert world.value("shoal_job_transitions_total", from_state="QUEUED", to_state="ADMITTED", team="b") == 2
    assert world.value("shoal_scheduler_cycle_duration_seconds_count") > 30
    # bounded cardinality: no per-job series once every job has finished
    text = generate_latest(world.metrics.registry).decode()
    assert 'job_id="' not in text.replace('job_id=""', "")


def test_borrowed_and_lent_in_a_cohort(tmp_path):
    w = World(tmp_path, {"a": {"gpus": 1, "cohort": "c"}, "b": {"gpus": 3, "cohort": "c", "lending_limit": 1},
                         "x": {"gpus": 0}})
    try:
        # the scheduler's policy decides borrowing; here a job of `a` simply holds 2 GPUs
        j = w.submit("a", gpus=2, duration=50)
        w.store.transition(j.id, S.QUEUED, S.ADMITTED, reason="test", now=w.clock.now(),
                           placement={"node_id": "n1", "node": "node-1", "gpu_indices": [0, 1],
                                      "gpu_model": "H100 80GB"}, attempt=1)
        assert w.value("shoal_team_gpus_borrowed", team="a") == 1
        assert w.value("shoal_team_gpus_lent", team="b") == 1
        assert w.value("shoal_team_gpus_lent", team="x") == 0
    finally:
        w.store.close()


@pytest.mark.parametrize("reason,category", [
    ("quota: team a holds 3 of 3 GPUs; job needs 1", "quota"),
    ("waiting for quota: team a uses 2/2 GPUs, job needs 1; no cohort to borrow from", "quota"),
    ("over budget: team a spent $12.00 of $10.00", "over_budget"),
    ("resources: needs 4 CPUs on one node", "resources"),
    ("no schedulable nodes", "other"),
    (None, "none"),
])
def test_reason_category_is_bounded(reason, category):
    assert reason_category(reason) == category


def test_trainer_step_telemetry_is_exported(tmp_path):
    """Every per-step figure the trainer sends (trainer.loop step events) becomes a job gauge."""
    from scheduler.executor import ProgressEvent

    world = World(tmp_path, {"a": {"gpus": 4}})
    job = world.submit("a", duration=100)
    world.run(2)
    world.executor._progress.append(ProgressEvent(job.id, world.store.get(job.id).attempt, {
        "type": "step", "step": 3, "total_steps": 100, "loss": 2.5, "lr": 1e-4, "tokens_per_s": 1234.0,
        "step_time_s": 0.25, "padding_waste": 0.1, "gpu_mem_peak_mib": 512.0, "mfu": 0.41}))
    world.run(1)
    got = {name: world.value(name, job_id=str(job.id)) for name in (
        "shoal_job_learning_rate", "shoal_job_tokens_per_second", "shoal_job_step_seconds",
        "shoal_job_padding_waste_ratio", "shoal_job_gpu_memory_peak_bytes", "shoal_job_mfu_ratio")}
    assert got == {"shoal_job_learning_rate": 1e-4, "shoal_job_tokens_per_second": 1234.0,
                   "shoal_job_step_seconds": 0.25, "shoal_job_padding_waste_ratio": 0.1,
                   "shoal_job_gpu_memory_peak_bytes": 512 * 2**20, "shoal_job_mfu_ratio": 0.41}
