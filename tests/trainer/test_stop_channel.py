"""The trainer's stop poll never stalls training: a hung scheduler actor costs a step at most
STOP_WAIT_S, and a stop request is still seen (real local Ray, real actors)."""
import time

import pytest
import ray

from trainer.ray_worker import STOP_POLL_INTERVAL_S, STOP_TIMEOUT_S, STOP_WAIT_S, ProgressChannel

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=1, include_dashboard=False, namespace="shoal-stop-test")
    yield
    ray.shutdown()


@ray.remote(num_cpus=0, max_concurrency=4)
class Scheduler:
    def __init__(self, delay_s: float):
        self.delay_s, self.stop, self.asked = delay_s, False, 0

    def should_stop(self, job_id, attempt):
        self.asked += 1
        time.sleep(self.delay_s)
        return self.stop

    def set_stop(self, v):
        self.stop = v

    def count(self):
        return self.asked


def test_a_stop_request_is_seen_within_a_poll_interval(local_ray):
    sched = Scheduler.options(name="answers").remote(0.0)
    ray.get(sched.count.remote())
    ch = ProgressChannel("answers", "shoal-stop-test", 1, 0)  # asks at once (while the model loads)
    assert ch.should_stop() is False
    ray.get(sched.set_stop.remote(True))
    deadline = time.monotonic() + STOP_POLL_INTERVAL_S + 2.0
    while not ch.should_stop():
        assert time.monotonic() < deadline, "the stop request was never seen"
        time.sleep(0.05)
    assert ch.should_stop() is True  # sticky


def test_a_hung_scheduler_costs_a_step_at_most_the_short_wait(local_ray):
    sched = Scheduler.options(name="hangs").remote(30.0)
    ray.get(sched.count.remote())
    ch = ProgressChannel("hangs", "shoal-stop-test", 1, 0)
    worst, t_end = 0.0, time.monotonic() + STOP_TIMEOUT_S + 1.0
    while time.monotonic() < t_end:  # "steps" for longer than the timeout
        t = time.perf_counter()
        assert ch.should_stop() is False
        worst = max(worst, time.perf_counter() - t)
    assert worst < STOP_WAIT_S + 0.2  # a blocking call would have held this step for seconds
    assert ray.get(sched.count.remote()) >= 2  # the unanswered question was asked again after the timeout
