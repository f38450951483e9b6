"""The node agent: polls one node's GpuReader at a fixed interval, keeps the latest readings for
the scheduler's Inventory, and serves them over HTTP.

Embedded (`shoal up`): the agent runs as a thread in the daemon and is the Inventory's reader for
the local node (`Inventory.readers[node_id] = agent`); its health series join the daemon's
/metrics. Cluster: run `python -m monitoring.agent` on every Ray node (the KubeRay manifest in
deploy/ starts it as a sidecar of each Ray pod). It serves
  GET /readings  the latest readings as JSON (the scheduler reads them through `HttpAgentReader`)
  GET /metrics   the node's DCGM-compatible GPU series (no job labels: the scheduler's /metrics has
                 the same series with job_id/team; scrape one or the other) and agent health
  GET /healthz
A machine without an NVIDIA driver does not crash the agent: it reports NvmlUnavailable in
`shoal_agent_reader_up 0` and the log, serves no GPUs, and retries every `retry_s`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.registry import Collector

from monitoring.dcgm import NodeHolders, NodeText
from monitoring.exposition import render
from monitoring.gpu import GpuProcess, GpuReader, GpuReading, MigDevice, NvmlUnavailable

log = logging.getLogger("shoal.agent")


class NodeAgent:
    """Polls `reader` every `interval_s` seconds on a daemon thread (`start`). `read()` returns
    the latest poll (so the agent is itself a GpuReader for the Inventory); before the first poll,
    or when `max_age_s` has passed since the last (thread not started, or stuck), it polls inline.
    `reader` may be a factory that raises NvmlUnavailable: the agent retries it every `retry_s`."""

    def __init__(self, reader: GpuReader | Callable[[], GpuReader], *, interval_s: float = 2.0,
                 hostname: str | None = None, registry: CollectorRegistry | None = None,
                 retry_s: float = 60.0, max_age_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if interval_s <= 0:
            raise ValueError(f"interval_s: must be > 0, got {interval_s}")
        self.interval_s = interval_s
        self.hostname = hostname or socket.gethostname()
        self.retry_s = retry_s
        self.max_age_s = max_age_s if max_age_s is not None else 2 * interval_s
        self._clock = clock
        is_factory = isinstance(reader, type) or (callable(reader) and not hasattr(reader, "read"))
        self._factory = reader if is_factory else None
        self._reader: GpuReader | None = None if self._factory else reader
        self._latest: list[GpuReading] = []
        self._polled_at: float | None = None
        self.polls = 0  # successful polls so far
        self._next_try = 0.0
        self.error: str | None = None
        self._lock = threading.Lock()
        # This node's GPU series as text, rendered after each poll with the host name and GPU
        # holders (job ids) the scheduler last asked for (`exposition`), so a scrape of a large
        # cluster only concatenates the nodes' texts.
        self._text = NodeText()
        self._text_for: tuple[str, NodeHolders] = (self.hostname, ())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        reg = registry if registry is not None else CollectorRegistry()
        self.registry = reg
        self._poll_cpu = Histogram("shoal_agent_poll_cpu_seconds", "CPU time of one GPU poll", registry=reg,
                                   buckets=(0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1))
        self._errors = Counter("shoal_agent_poll_errors_total", "GPU polls that failed", registry=reg)
        self._up = Gauge("shoal_agent_reader_up", "1 if the GPU reader works (e.g. NVML initialised)", registry=reg)
        self._gpus = Gauge("shoal_agent_gpus", "GPUs the last poll saw", registry=reg)
        self._last = Gauge("shoal_agent_last_poll_timestamp_seconds", "Unix time of the last successful poll",
                           registry=reg)

    @property
    def reader(self) -> GpuReader | None:
        """The GpuReader in use (None while a factory's reader is unavailable)."""
        return self._reader

    # -- polling ------------------------------------------------------------------------------
    def _get_reader(self) -> GpuReader | None:
        if self._reader is None and self._factory is not None and self._clock() >= self._next_try:
            try:
                self._reader = self._factory()
                self.error = None
            except NvmlUnavailable as e:
                if self.error != str(e):
                    log.warning("GPU reader unavailable: %s (retrying every %.0f s)", e, self.retry_s)
                self.error = str(e)
                self._next_try = self._clock() + self.retry_s
        return self._reader

    def poll(self) -> list[GpuReading]:
        """Read the GPUs now; keeps and returns the readings (the previous ones if the read fails)."""
        with self._lock:
            t0 = time.thread_time()
            reader = self._get_reader()
            if reader is None:
                self._up.set(0)
                self._polled_at = self._clock()
                return self._latest
            try:
                readings = reader.read()
            except Exception as e:  # noqa: BLE001 - a driver hiccup must not kill the agent
                self._errors.inc()
                self.error = f"{type(e).__name__}: {e}"
                log.warning("GPU poll failed: %s", self.error)
                self._up.set(0)
                return self._latest
            self._latest, self._polled_at, self.error = readings, self._clock(), None
            self.polls += 1
            host, held = self._text_for
            self._text.get(host, readings, held)
            self._up.set(1)
            self._gpus.set(len(readings))
            self._last.set(time.time())
            self._poll_cpu.observe(time.thread_time() - t0)
            return readings

    def read(self) -> list[GpuReading]:
        if self._polled_at is None or self._clock() - self._polled_at > self.max_age_s:
            return self.poll()
        return self._latest

    def exposition(self, host: str, held: NodeHolders) -> dict[str, str]:
        """The latest readings' GPU and allocation series as text (monitoring.dcgm.render_node),
        family -> lines, labelled with `host` and the job ids/teams in `held`; cached until the
        next poll (which renders it again with the same host and holders)."""
        readings = self.read()
        with self._lock:
            self._text_for = (host, held)
            return self._text.get(host, readings, held)

    def start(self) -> NodeAgent:
        if self._thread is None:
            self.poll()
            self._thread = threading.Thread(target=self._run, name="shoal-node-agent", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._reader is not None:
            self._reader.close()

    # -- serving ------------------------------------------------------------------------------
    def gpu_collector(self) -> Collector:
        agent = self

        class _Gpus(Collector):
            def describe(self):
                return []

            def collect(self):
                from monitoring.dcgm import gpu_families

                yield from gpu_families({agent.hostname: (agent.hostname, agent.read())}, {})

        return _Gpus()

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> tuple[ThreadingHTTPServer, int]:
        """Serve /readings, /metrics, /healthz on a daemon thread; returns (server, bound port)."""
        registry = CollectorRegistry()
        registry.register(self.gpu_collector())
        agent = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                if self.path.startswith("/metrics"):
                    body = render(registry) + render(agent.registry)
                    ctype = CONTENT_TYPE_LATEST
                elif self.path.startswith("/readings"):
                    body = json.dumps({"hostname": agent.hostname, "error": agent.error,
                                       "gpus": [dataclasses.asdict(r) for r in agent.read()]}).encode()
                    ctype = "application/json"
                elif self.path.startswith("/healthz"):
                    body, ctype = b'{"status": "ok"}', "application/json"
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_):  # quiet: Prometheus scrapes every few seconds
                pass

        server = ThreadingHTTPServer((host, port), Handler)
        threading.Thread(target=server.serve_forever, name="shoal-agent-http", daemon=True).start()
        return server, server.server_address[1]


def reading_from_json(d: dict) -> GpuReading:
    d = dict(d)
    d["processes"] = tuple(GpuProcess(**p) for p in d.get("processes", ()))
    d["mig_devices"] = tuple(MigDevice(**m) for m in d.get("mig_devices", ()))
    return GpuReading(**d)


class HttpAgentReader:
    """The scheduler's reader for a remote node: the latest readings of that node's agent. An
    unreachable agent reads as no GPUs (nothing is placed there) and is logged once per outage."""

    def __init__(self, url: str, timeout_s: float = 2.0):
        import httpx

        self.url = url.rstrip("/")
        self._client = httpx.Client(timeout=timeout_s)
        self._down = False

    def read(self) -> list[GpuReading]:
        import httpx

        try:
            resp = self._client.get(f"{self.url}/readings")
            resp.raise_for_status()
            gpus = [reading_from_json(g) for g in resp.json()["gpus"]]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
            if not self._down:
                log.warning("node agent %s unreachable: %s", self.url, e)
            self._down = True
            return []
        self._down = False
        return gpus

    def close(self) -> None:
        self._client.close()


def agent_readers(ray_nodes: list[dict], port: int = 9470, timeout_s: float = 2.0) -> dict[str, HttpAgentReader]:
    """One HttpAgentReader per alive Ray node, keyed by Ray node id, for `Inventory.readers`:
    every node runs its agent on the same `port` (as a KubeRay sidecar or a systemd unit), at the
    node's address as Ray reports it. `ray_nodes` is `ray.nodes()`."""
    return {
        n["NodeID"]: HttpAgentReader(f"http://{n['NodeManagerAddress']}:{port}", timeout_s)
        for n in ray_nodes if n.get("Alive")
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m monitoring.agent", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reader", choices=["nvml", "fake"], default="nvml")
    ap.add_argument("--gpus", type=int, default=8, help="fake reader: GPU count")
    ap.add_argument("--model", default="H100 80GB", help="fake reader: GPU model")
    ap.add_argument("--memory-mib", type=int, default=81559, help="fake reader: GPU memory")
    ap.add_argument("--interval", type=float, default=2.0, help="poll interval, seconds (default 2)")
    ap.add_argument("--host", default="127.0.0.1", help="listen address (0.0.0.0 in a pod)")
    ap.add_argument("--port", type=int, default=9470)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.reader == "nvml":
        from monitoring.gpu import NvmlReader

        factory: Callable[[], GpuReader] = NvmlReader
    else:
        from monitoring.gpu import FakeGpuReader

        factory = lambda: FakeGpuReader(args.gpus, args.model, args.memory_mib, host=socket.gethostname())  # noqa: E731
    agent = NodeAgent(factory, interval_s=args.interval).start()
    server, port = agent.serve(args.host, args.port)
    log.info("node agent on %s:%d (%s reader, every %.1f s)%s", args.host, port, args.reader, args.interval,
             f"; {agent.error}" if agent.error else "")
    stop = threading.Event()
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.shutdown()
    agent.close()


if __name__ == "__main__":
    main()
