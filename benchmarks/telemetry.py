"""Telemetry cost: (1) CPU time of one node agent poll + update for 8 GPUs (fake reader; NVML
when a driver is present and SHOAL_BENCH_NVML=1), including the rendering of the node's GPU
series text that the agent does after each poll (with job labels for 6 jobs), (2) the time to
render the scheduler's /metrics exposition for 1,000 nodes x 8 GPUs, in CPU time of the rendering
thread (DCGM series with job labels, allocation, attribution and quota series). Each node's GPU
series come from its node agent (rendered after its poll, as in a cluster), so the scrape
concatenates them and renders Shoal's own series. Targets (issue #6): <= 2 ms CPU per 8-GPU
poll, <= 100 ms per scrape.

    python benchmarks/telemetry.py          # from the repo root
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import CollectorRegistry  # noqa: E402

from monitoring.agent import NodeAgent  # noqa: E402
from monitoring.exposition import render  # noqa: E402
from monitoring.gpu import FakeGpuReader  # noqa: E402
from monitoring.metrics import ShoalCollector  # noqa: E402
from scheduler.spec import ClusterConfig  # noqa: E402

NODES, GPUS = 1000, 8


def bench_poll(polls: int = 3000) -> float:
    reader = None
    if os.environ.get("SHOAL_BENCH_NVML") == "1":
        from monitoring.gpu import NvmlReader

        reader = NvmlReader()
    if reader is None:
        reader = FakeGpuReader(GPUS)
        reader.add_process(0, 2048)
        for j in range(6):
            reader.attach_job(j, (j + 1,), 20000)
    agent = NodeAgent(reader, interval_s=1.0, registry=CollectorRegistry())
    # the scheduler told the agent which jobs hold its GPUs: each poll renders them into the text
    agent.exposition("node-0000", tuple((j + 1, ((j, f"team-{j}"),)) for j in range(6)))
    for _ in range(100):  # warm up
        agent.poll()
    runs = []
    for _ in range(5):
        t0 = time.thread_time()
        for _ in range(polls):
            agent.poll()
        runs.append((time.thread_time() - t0) / polls * 1000)
    agent.close()
    print(f"poll+update, {GPUS} GPUs ({type(reader).__name__}): median {statistics.median(runs):.4f} ms CPU "
          f"(runs: {', '.join(f'{r:.4f}' for r in runs)})")
    return statistics.median(runs)


def bench_scrape(repeats: int = 5, gpu_series: bool = True) -> float:
    readers = {f"n{i}": (f"node-{i:04d}", FakeGpuReader(GPUS, host=f"node-{i:04d}")) for i in range(NODES)}
    jobs = []
    for i, (nid, (host, r)) in enumerate(readers.items()):  # 3 of 4 nodes busy: one 4-GPU + 2 single jobs
        if i % 4 == 3:
            continue
        for k, idxs in enumerate(((0, 1, 2, 3), (4,), (5,))):
            jid = i * 10 + k
            r.attach_job(jid, idxs, 30000)
            jobs.append(SimpleNamespace(
                id=jid, team=f"team-{jid % 20}", placement={"node_id": nid, "node": host, "gpu_indices": list(idxs),
                                                             "gpu_model": "H100 80GB"},
                memory_per_gpu_mib=30000, progress={"loss": 1.5, "tokens_per_s": 5000.0, "step": 10}))
    # one node agent per node; each has polled (and rendered its text) once, as between two scrapes
    agents = {nid: NodeAgent(r, interval_s=1.0, hostname=host, registry=CollectorRegistry(), max_age_s=1e9)
              for nid, (host, r) in readers.items()}
    names = {nid: host for nid, (host, _) in readers.items()}

    def node_text(nid, host, held):
        return agents[nid].exposition(host, held)

    config = ClusterConfig.model_validate({"teams": {f"team-{t}": {"gpus": 400} for t in range(20)}})
    registry = CollectorRegistry()
    registry.register(ShoalCollector(
        job_counts=lambda: {("RUNNING", f"team-{t}"): 37 for t in range(20)},
        gpu_readings=lambda: {nid: (names[nid], a.read()) for nid, a in agents.items()},
        running_jobs=lambda: jobs, queued_jobs=lambda: [], config=config,
        gpu_series=gpu_series, node_text=node_text))
    text = render(registry)  # the first scrape tells each agent its holders (it renders them)
    for a in agents.values():
        a.poll()  # the agents' next poll (re-renders each node's text with the same holders)
    series = sum(1 for line in text.splitlines() if line and not line.startswith(b"#"))
    times, walls = [], []
    for _ in range(repeats):  # CPU time of the rendering thread: wall time on a shared box is noise
        t0, w0 = time.thread_time(), time.perf_counter()
        render(registry)
        times.append((time.thread_time() - t0) * 1000)
        walls.append((time.perf_counter() - w0) * 1000)
    what = "with" if gpu_series else "without"
    print(f"scrape {what} per-GPU DCGM series: {NODES} nodes x {GPUS} GPUs, {len(jobs)} running jobs -> {series} series, "
          f"{len(text) / 1e6:.1f} MB; median {statistics.median(times):.1f} ms CPU "
          f"(runs: {', '.join(f'{t:.1f}' for t in times)}; wall median {statistics.median(walls):.1f} ms)")
    return statistics.median(times)


def bench_pull_decode(repeats: int = 5) -> float:
    """Scheduler-side CPU of one round of agent pulls on a Ray cluster of 1,000 8-GPU nodes,
    unpickling only (a node agent actor's reply: readings + rendered text); Ray's own transfer
    and bookkeeping are not included (not measurable here)."""
    import pickle

    reader = FakeGpuReader(GPUS, host="node-0000")
    for j in range(6):
        reader.attach_job(j, (j + 1,), 20000)
    agent = NodeAgent(reader, interval_s=1.0, registry=CollectorRegistry())
    agent.poll()
    held = tuple((j + 1, ((j, f"team-{j}"),)) for j in range(6))
    chunks = agent.exposition("node-0000:0123abcd", held)
    blob = pickle.dumps((agent.polls, agent.read(), chunks, ("node-0000:0123abcd", held), None))
    runs = []
    for _ in range(repeats):
        t0 = time.thread_time()
        for _ in range(NODES):
            pickle.loads(blob)
        runs.append((time.thread_time() - t0) * 1000)
    print(f"agent pull replies, {NODES} nodes x {len(blob)} bytes: unpickle median {statistics.median(runs):.1f} ms CPU "
          f"per round (runs: {', '.join(f'{r:.1f}' for r in runs)}; Ray transfer not included)")
    return statistics.median(runs)


def main() -> None:
    poll = bench_poll()
    full = bench_scrape(gpu_series=True)
    lean = bench_scrape(gpu_series=False)
    pull = bench_pull_decode()
    print(f"RESULT telemetry_poll_ms {poll:.4f}")
    print(f"RESULT telemetry_scrape_ms {full:.1f}")
    print(f"RESULT telemetry_scrape_no_gpu_series_ms {lean:.1f}")
    print(f"RESULT telemetry_pull_decode_1000_nodes_ms {pull:.1f}")


if __name__ == "__main__":
    main()
