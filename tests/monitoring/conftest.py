"""One played fake-GPU cluster and one real Prometheus scraping it, shared by the monitoring tests
that need them (session scope: the scenario takes ~10 s, Prometheus ~1 s to start). Prometheus
starts before the scenario plays, so rates and histograms see every event."""
import pytest

from tests.monitoring.harness import FakeCluster, Prometheus


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    c = FakeCluster(tmp_path_factory.mktemp("cluster"))
    prom = None
    try:
        prom = Prometheus(tmp_path_factory.mktemp("prometheus"), {
            "shoal": [f"127.0.0.1:{c.port}"],
            "shoal-agents": [f"127.0.0.1:{c.agent_b_port}"],
        })
        prom.wait_scraped(n=2)
        c.jobs = c.play()
        prom.wait_scraped(n=3)
        yield c, prom
    finally:
        if prom is not None:
            prom.close()
        c.close()


@pytest.fixture(scope="session")
def cluster(stack):
    return stack[0]


@pytest.fixture(scope="session")
def prometheus(stack):
    return stack[1]
