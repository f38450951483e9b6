"""A small fake-GPU cluster for the monitoring tests: the real Service loop (SQLite store, policy,
usage ledger) with the in-memory executor, two fake nodes from a scenario (one read through an
in-process NodeAgent, one through a node agent served over real HTTP), and the scheduler's
/metrics served by prometheus-client on a real port. No Ray.

Also: a real Prometheus (Debian's `prometheus` binary) on 127.0.0.1 with a temporary config and
data directory, scraping the exporters every second and loading deploy/prometheus/alerts.yml.
"""
from __future__ import annotations

import dataclasses
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import yaml
from prometheus_client import start_http_server

from monitoring.agent import HttpAgentReader, NodeAgent
from monitoring.metrics import ShoalMetrics
from monitoring.scenario import Scenario, parse_scenario
from scheduler.clock import WallClock
from scheduler.executor import InMemoryExecutor
from scheduler.inventory import Inventory, NodeInfo
from scheduler.lifecycle import JobState
from scheduler.policy import Preempt, schedule
from scheduler.service import Service
from scheduler.spec import ClusterConfig
from scheduler.store import Store

REPO = Path(__file__).resolve().parents[2]

CONFIG = {
    "gpu_models": {"H100 80GB": {"memory_gib": 80, "price_per_hour": 2.49},
                   "A100 80GB": {"memory_gib": 80, "price_per_hour": 1.29}},
    "teams": {"alpha": {"gpus": 3, "cohort": "research", "budget_usd": 1000.0},
              "beta": {"gpus": 2, "cohort": "research", "budget_usd": 0.0001}},
    "scheduler": {"interval_s": 0.1, "min_runtime_s": 0},
}

SCENARIO = """
nodes:
  - name: node-a
    gpus: 4
    model: H100 80GB
    foreign:
      - {gpu: 0, memory_mib: 2048, utilization_pct: 10}
  - name: node-b
    gpus: 2
    model: A100 80GB
    tdp_w: 400
faults:
  - {node: node-a, gpu: 3, xid: 79}
  - {node: node-b, gpu: 1, ecc_corrected: 3}
"""


class ProgressExecutor(InMemoryExecutor):
    """The in-memory executor whose step reports carry what the real trainer sends."""

    def drain_progress(self):
        out = []
        for ev in super().drain_progress():
            e = dict(ev.event)
            if e.get("type") == "step":
                e.update(tokens_per_s=1000.0 + e["step"], mfu=0.42, eval_loss=1.1, loss=1.0 / e["step"])
            out.append(dataclasses.replace(ev, event=e))
        return out


class FakeLoadByNode:
    """Makes each node's fake GPUs look busy while a job holds them (FakeGpuLoad, per node)."""

    def __init__(self, readers: dict, agents: dict):
        self.readers, self.agents = readers, agents

    def placed(self, job) -> None:
        r = self.readers[job.placement["node"]]
        r.detach_job(job.id)
        r.attach_job(job.id, tuple(job.placement["gpu_indices"]), job.memory_per_gpu_mib)
        self.agents[job.placement["node"]].poll()

    def released(self, job) -> None:
        for name, r in self.readers.items():
            r.detach_job(job.id)
            self.agents[name].poll()


class ScriptedPreemption:
    """The real policy, plus: preempt each job in `victims` once, when it runs (a stand-in for a
    higher-priority arrival, so the preemption path is exercised whatever policy is merged)."""

    def __init__(self):
        self.victims: set[int] = set()

    def __call__(self, snap):
        d = schedule(snap)
        running = {r.job_id for r in snap.running if r.preemptible}
        hit = self.victims & running
        self.victims -= hit
        if not hit:
            return d
        return dataclasses.replace(d, to_preempt=d.to_preempt + tuple(Preempt(j, "scripted") for j in sorted(hit)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeCluster:
    def __init__(self, home: Path):
        self.config = ClusterConfig.model_validate(CONFIG)
        self.clock = WallClock()
        mem = {k: int(m.memory_gib * 1024) for k, m in self.config.gpu_models.items()}
        self.scenario = Scenario(parse_scenario(SCENARIO), memory_by_model=mem)
        self.metrics = ShoalMetrics()
        ra, rb = self.scenario.readers["node-a"], self.scenario.readers["node-b"]
        # node-a: agent in this process (as in `shoal up`); node-b: an agent served over HTTP
        self.agent_a = NodeAgent(ra, interval_s=0.2, hostname="node-a", registry=self.metrics.registry).start()
        self.agent_b = NodeAgent(rb, interval_s=0.2, hostname="node-b").start()
        self.agent_b_server, self.agent_b_port = self.agent_b.serve("127.0.0.1", 0)
        self.remote_b = HttpAgentReader(f"http://127.0.0.1:{self.agent_b_port}")
        nodes = [NodeInfo("na", "node-a", cpus=16), NodeInfo("nb", "node-b", cpus=16)]
        inventory = Inventory(lambda: nodes, {"na": self.agent_a, "nb": self.remote_b})
        self.store = Store(f"sqlite:///{home / 'shoal.db'}")
        self.executor = ProgressExecutor(self.clock, duration_s=lambda spec: spec.get("duration", 3))
        self.policy = ScriptedPreemption()
        load = FakeLoadByNode({"node-a": ra, "node-b": rb}, {"node-a": self.agent_a, "node-b": self.agent_b})
        self.service = Service(self.store, self.executor, inventory, self.config, self.clock, home,
                               listeners=[load, self.metrics.events], on_cycle=self.metrics.cycle.observe,
                               policy=self.policy)
        self.service.views.usage_refresh_s = 0.5
        # node-a's GPU 3 starts with an XID (the health panels need one): an operator has already
        # seen it, so the node is not drained for it (only new faults drain a node); the faulty GPU
        # itself stays unhealthy and gets no job.
        now = self.clock.now()
        self.store.upsert_node("na", "node-a", now)
        self.store.set_drained("na", False, reason=None, now=now,
                               xid_ack={str(r.index): r.xid_errors for r in ra.read()})
        self.metrics.attach(self.service)
        self.server, _ = start_http_server(0, addr="127.0.0.1", registry=self.metrics.registry)
        self.port = self.server.server_port
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.service.run, args=(self.stop,), daemon=True)

    def submit(self, team: str, gpus: int = 1, duration: float = 3, gpu_model: str | None = None,
               max_retries: int = 1, mem: int = 20000, name: str = "j"):
        spec = {"name": name, "duration": duration, "max_retries": max_retries,
                "resources": {"gpu_model": gpu_model} if gpu_model else {}}
        return self.store.submit(spec=spec, name=name, team=team, user="u", priority=0, gpus=gpus,
                                 memory_per_gpu_mib=mem, now=self.clock.now())

    def wait_for(self, cond, timeout: float = 30.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.05)

    def state(self, job) -> JobState:
        return self.store.get(job.id).state

    def play(self) -> dict:
        """The scripted run: successes, a retried failure, a preemption, an idle allocated GPU,
        a job waiting on quota, borrowing, a team over budget. Returns the jobs by role."""
        self.thread.start()
        jobs = {}
        jobs["done"] = self.submit("alpha", gpus=2, duration=2, gpu_model="H100 80GB", name="done")
        jobs["retried"] = self.submit("alpha", gpus=1, duration=1.5, gpu_model="A100 80GB", name="retried")
        self.executor.fail_next[jobs["retried"].id] = "CUDA error: an illegal memory access"
        jobs["victim"] = self.submit("beta", gpus=1, duration=300, gpu_model="H100 80GB", name="victim")
        self.policy.victims.add(jobs["victim"].id)
        self.wait_for(lambda: self.state(jobs["done"]) is JobState.SUCCEEDED, what="first job to succeed")
        self.wait_for(lambda: self.state(jobs["retried"]) is JobState.SUCCEEDED, what="retried job to succeed")
        self.wait_for(lambda: self.store.get(jobs["victim"].id).attempt >= 2
                      and self.state(jobs["victim"]) is JobState.RUNNING, what="preempted job to run again")
        jobs["idle"] = self.submit("alpha", gpus=1, duration=300, gpu_model="A100 80GB", name="idle")
        jobs["long"] = self.submit("alpha", gpus=2, duration=300, gpu_model="H100 80GB", name="long")
        self.wait_for(lambda: self.state(jobs["long"]) is JobState.RUNNING, what="long job to run")
        self.wait_for(lambda: self.state(jobs["idle"]) is JobState.RUNNING, what="idle job to run")
        idx = self.store.get(jobs["idle"].id).placement["gpu_indices"][0]
        self.scenario.readers["node-b"].set_utilization(idx, 0.0, job_id=jobs["idle"].id)
        jobs["waiting"] = self.submit("beta", gpus=2, duration=5, gpu_model="H100 80GB", name="waiting")
        self.wait_for(lambda: self.store.get(jobs["waiting"].id).pending_reason is not None,
                      what="a pending reason")
        return jobs

    def close(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=10)
        self.server.shutdown()
        self.agent_b_server.shutdown()
        self.remote_b.close()
        self.agent_a.close()
        self.agent_b.close()
        self.store.close()


class Prometheus:
    """Debian's prometheus on 127.0.0.1:<free port>, temp config and TSDB, 1 s scrapes."""

    def __init__(self, workdir: Path, targets: dict[str, list[str]], cluster: str = "test"):
        exe = shutil.which("prometheus")
        if exe is None:
            raise RuntimeError("prometheus is not on PATH: `make test` installs it "
                               "(apt-get install -y --no-install-recommends prometheus)")
        workdir.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "deploy/prometheus/alerts.yml", workdir / "alerts.yml")
        cfg = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": ["alerts.yml"],
            "scrape_configs": [
                {"job_name": name, "static_configs": [{"targets": t, "labels": {"cluster": cluster}}]}
                for name, t in targets.items()
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(workdir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [exe, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h",
             "--web.enable-lifecycle"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=self.url, timeout=10)
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.http.get("/-/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prometheus did not start:\n{(workdir / 'prometheus.log').read_text()[-3000:]}")
            time.sleep(0.1)

    def query(self, expr: str) -> list[dict]:
        r = self.http.get("/api/v1/query", params={"query": expr})
        body = r.json()
        if body.get("status") != "success":
            raise AssertionError(f"query failed: {expr}\n{body.get('error')}")
        return body["data"]["result"]

    def series(self, match: str, last_s: float | None = None) -> list[dict]:
        params = {"match[]": match}
        if last_s is not None:
            params["start"] = str(time.time() - last_s)
        return self.http.get("/api/v1/series", params=params).json()["data"]

    def wait_scraped(self, n: int = 3, timeout: float = 30) -> None:
        """Until every target is up and each has been scraped `n` more times."""
        deadline = time.monotonic() + timeout
        first = None
        while time.monotonic() < deadline:
            up = self.query("up")
            if up and all(float(s["value"][1]) == 1 for s in up):
                c = float(self.query("sum(count_over_time(up[1h]))")[0]["value"][1])
                if first is None:
                    first = c
                elif c - first >= n * len(up):
                    return
            time.sleep(0.2)
        raise AssertionError(f"targets not scraped in time: {self.http.get('/api/v1/targets').json()}")

    def close(self) -> None:
        self.http.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
