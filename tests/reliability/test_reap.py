"""Runners left behind by a crash are ended on the next start (RayExecutor.reap): the chaos run
found three runner actors alive, holding their GPUs, for attempts that had already SUCCEEDED -
the scheduler was killed after recording the outcome and before ending the runner."""
import pytest

pytestmark = pytest.mark.ray


def test_reap_ends_runners_of_attempts_that_are_not_active():
    import ray

    from scheduler.ray_executor import RayExecutor

    ray.init(num_cpus=1, namespace="shoal-reap-test", include_dashboard=False, log_to_driver=False)
    try:
        @ray.remote(num_cpus=0)
        class Runner:
            def ping(self) -> bool:
                return True

        ex = RayExecutor(namespace="shoal-reap-test", workload="probe")
        actors = {name: Runner.options(name=name, lifetime="detached").remote()
                  for name in ("shoal-job-7-a1", "shoal-job-8-a2", "shoal-job-8-a1", "not-a-runner")}
        ray.get([a.ping.remote() for a in actors.values()])
        ended = ex.reap(keep={(8, 2)})
        assert sorted(ended) == ["shoal-job-7-a1", "shoal-job-8-a1"]
        names = {e["name"] for e in ray.util.list_named_actors(all_namespaces=True)
                 if e["namespace"] == "shoal-reap-test"}
        assert "shoal-job-8-a2" in names and "not-a-runner" in names
        assert ex.reap(keep={(8, 2)}) == []  # nothing left to end
        for name in ("shoal-job-8-a2", "not-a-runner"):
            ray.kill(actors[name])
    finally:
        ray.shutdown()
