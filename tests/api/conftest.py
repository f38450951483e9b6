"""A real API over real HTTP on loopback: the FastAPI app served by uvicorn in a thread, a real
SQLite store, the real policy, fake GPUs and the in-memory executor on a fake clock (the tests
tick the scheduler by hand, so job states are exactly what each test arranges)."""
from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest
import uvicorn
from prometheus_client import CollectorRegistry

from monitoring.gpu import FakeGpuReader
from scheduler.api import create_app
from scheduler.auth import TokenAuthority
from scheduler.clock import FakeClock
from scheduler.daemon import FakeGpuLoad
from scheduler.executor import InMemoryExecutor
from scheduler.inventory import Inventory, NodeInfo
from scheduler.models import Role
from scheduler.service import Service
from scheduler.spec import ClusterConfig
from scheduler.store import Store
from tests.integration.harness import example_spec

REPO = Path(__file__).resolve().parents[2]


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1:<free port> in a background thread."""

    def __init__(self, app, **config):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", **config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            assert self.thread.is_alive(), "uvicorn did not start"
            threading.Event().wait(0.02)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


CLUSTER = {
    "gpu_models": {"H100 80GB": {"memory_gib": 80, "price_per_hour": 2.0}},
    "local": {"gpus": 4},
    # team a may not borrow, so a third GPU for it waits for quota (b may borrow a's idle GPUs)
    "teams": {"a": {"gpus": 2, "cohort": "research", "borrowing_limit": 0}, "b": {"gpus": 2, "cohort": "research"}},
    "cohorts": {"research": {}},
}


class ApiWorld:
    def __init__(self, tmp: Path, cluster: dict | None = None, url: str | None = None):
        self.tmp = tmp
        self.clock = FakeClock(start=1_800_000_000.0)
        self.config = ClusterConfig.model_validate(cluster or CLUSTER)
        self.reader = FakeGpuReader(self.config.local.gpus)
        self.store = Store(url or f"sqlite:///{tmp / 'shoal.db'}")
        self.executor = InMemoryExecutor(self.clock, duration_s=lambda spec: 100.0)
        inv = Inventory(lambda: [NodeInfo("n1", "node-1", cpus=16)], {"n1": self.reader})
        self.service = Service(self.store, self.executor, inv, self.config, self.clock, tmp,
                               listeners=[FakeGpuLoad(self.reader)])
        self.auth = TokenAuthority(self.store, b"test-secret", clock=self.clock.now, cache_s=0.0)
        self.app = create_app(self.service, CollectorRegistry(), auth=self.auth)
        self.server = LiveServer(self.app)
        self.url = self.server.url
        self.tokens: dict[str, str] = {}
        for name, team, role in [("root", None, Role.admin), ("ann", "a", Role.team_admin),
                                 ("bob", "a", Role.member), ("vic", "a", Role.viewer), ("bea", "b", Role.member)]:
            self.tokens[name], _ = self.auth.create(name, team, role, ttl_s=None)
        self._clients: list[httpx.Client] = []

    def http(self, who: str | None) -> httpx.Client:
        """A raw HTTP client with `who`'s token (None: no token)."""
        headers = {"Authorization": f"Bearer {self.tokens[who]}"} if who else {}
        c = httpx.Client(base_url=self.url, headers=headers, timeout=30)
        self._clients.append(c)
        return c

    def sdk(self, who: str):
        from scheduler.client import Client

        c = Client(self.url, token=self.tokens[who])
        self._clients.append(c)
        return c

    def spec(self, **changes) -> dict:
        """The example spec (absolute paths) as a dict, with dotted-key changes (None removes)."""
        return example_spec(changes, none_removes=True)

    def job(self, team: str = "a", gpus: int = 1, user: str = "bob", name: str = "j"):
        """A queued job put straight into the store (no API call)."""
        return self.store.submit(spec={"name": name}, name=name, team=team, user=user, priority=0, gpus=gpus,
                                 memory_per_gpu_mib=1000, now=self.clock.now())

    def close(self) -> None:
        for c in self._clients:
            c.close()
        self.server.stop()
        self.store.close()


@pytest.fixture
def world(tmp_path, tiny_model_dir):
    w = ApiWorld(tmp_path)
    yield w
    w.close()
