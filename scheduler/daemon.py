"""The embedded Shoal server: local Ray + scheduler loop + REST API + /metrics in one process.

`shoal up` starts it in the background (`python -m scheduler.daemon`); `shoal down` sends SIGTERM,
on which running jobs checkpoint and go back to the queue (they resume on the next `shoal up`).
State lives in SHOAL_HOME (default ~/.shoal): the SQLite store, job folders, daemon.json, shoal.log.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import threading
from pathlib import Path

from monitoring.gpu import FakeGpuReader, GpuReader, NvmlReader
from scheduler.clock import WallClock
from scheduler.spec import ClusterConfig, load_cluster_config

log = logging.getLogger("shoal.daemon")

# Ray Train V2's controller polls workers every 2 s by default; each checkpoint report waits for
# that poll. 0.1 s makes checkpoints ~20x cheaper for short jobs (see NOTES-stack).
_RAY_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


def default_home() -> Path:
    return Path(os.environ.get("SHOAL_HOME", "~/.shoal")).expanduser()


class FakeGpuLoad:
    """Makes a fake GPU look busy while a Shoal job holds it: a process with the job's estimated
    memory and 90 % utilization, as NVML would show on real hardware."""

    def __init__(self, reader: FakeGpuReader):
        self.reader = reader

    def placed(self, job) -> None:
        self.reader.detach_job(job.id)
        self.reader.attach_job(job.id, tuple(job.placement["gpu_indices"]), job.memory_per_gpu_mib)

    def released(self, job) -> None:
        self.reader.detach_job(job.id)


def _check_port(host: str, port: int) -> None:
    if port == 0:
        return
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            raise RuntimeError(f"cannot listen on {host}:{port} ({e.strerror}); another Shoal or program "
                               "uses it: pass --port N, or --port 0 for any free port") from None


def make_reader(config: ClusterConfig) -> GpuReader:
    local = config.local
    if local.reader == "nvml":
        return NvmlReader()
    memory_mib = int(config.gpu_models[local.gpu_model].memory_gib * 1024)
    return FakeGpuReader(local.gpus, local.gpu_model, memory_mib, host=socket.gethostname())


class Daemon:
    def __init__(self, home: Path, config: ClusterConfig, db_url: str | None, host: str, port: int):
        self.home, self.config, self.host, self.port = home, config, host, port
        self.db_url = db_url or f"sqlite:///{home / 'shoal.db'}"
        self.stop = threading.Event()

    def start(self) -> None:
        import ray
        import uvicorn

        from monitoring.metrics import ShoalCollector, build_registry
        from scheduler.api import create_app
        from scheduler.auth import TokenAuthority, load_or_create_secret
        from scheduler.inventory import Inventory, NodeInfo
        from scheduler.ray_executor import RayExecutor
        from scheduler.service import Service
        from scheduler.store import Store

        self.home.mkdir(parents=True, exist_ok=True)
        _check_port(self.host, self.port)  # fail before the slow part (Ray) starts
        os.environ.update(_RAY_ENV)
        local = self.config.local
        self.reader = make_reader(self.config)
        gpus = len(self.reader.read())
        cpus = max(os.cpu_count() or 1, gpus)  # every fake GPU can hold a 1-CPU worker
        ray.init(num_cpus=cpus, num_gpus=gpus, namespace="shoal",
                 include_dashboard=True, logging_level=logging.WARNING, log_to_driver=False,
                 configure_logging=False)
        node_id = ray.get_runtime_context().get_node_id()
        hostname = socket.gethostname()

        def nodes() -> list[NodeInfo]:
            return [NodeInfo(node_id, hostname, alive=True, cpus=cpus)]

        self.store = Store(self.db_url)
        inventory = Inventory(nodes, {node_id: self.reader})
        listeners = [FakeGpuLoad(self.reader)] if isinstance(self.reader, FakeGpuReader) else []
        executor = RayExecutor(backend="gloo" if local.reader == "fake" else "nccl")
        collector = ShoalCollector(
            job_counts=self.store.count_by_state_team,
            gpu_readings=lambda: {node_id: (hostname, self.reader.read())},
            running_jobs=self.store.active_jobs,
        )
        registry, cycle_hist = build_registry(collector)
        self.service = Service(self.store, executor, inventory, self.config, WallClock(), self.home,
                               listeners=listeners, on_cycle=cycle_hist.observe)
        self.service.recover()
        self.auth = TokenAuthority(self.store, load_or_create_secret(self.home))
        self.admin_token = self.home / "admin.token"
        if self.auth.ensure_admin_token(self.admin_token):
            log.info("created the admin API token in %s (mode 0600)", self.admin_token)
        app = create_app(self.service, registry, auth=self.auth)
        self.server = uvicorn.Server(uvicorn.Config(app, host=self.host, port=self.port, log_level="warning"))
        self.api_thread = threading.Thread(target=self.server.run, name="shoal-api", daemon=True)
        self.api_thread.start()
        while not self.server.started:
            if not self.api_thread.is_alive():
                raise RuntimeError(f"the API could not listen on {self.host}:{self.port} (see shoal.log)")
            self.stop.wait(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        local_host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        self.url = f"http://{local_host}:{port}"
        (self.home / "daemon.json").write_text(json.dumps({
            "pid": os.getpid(), "url": self.url, "db": self.db_url, "ray_node_id": node_id,
            "admin_token": str(self.admin_token),
        }))
        log.info("shoal up: API %s, metrics %s/metrics, store %s, %d %s GPU(s) (%s reader)",
                 self.url, self.url, self.db_url, gpus, local.gpu_model, local.reader)

    def run(self) -> None:
        self.service.run(self.stop)

    def shutdown(self) -> None:
        """Stops whatever `start` got to start (it may have failed half-way)."""
        import ray

        try:
            if hasattr(self, "service"):
                log.info("stopping: checkpointing running jobs (grace %.0f s)", self.config.scheduler.stop_grace_s)
                self.service.shutdown(self.config.scheduler.stop_grace_s)
        finally:
            if hasattr(self, "server"):
                self.server.should_exit = True
                self.api_thread.join(timeout=10)
            if hasattr(self, "service"):
                self.service.executor.close()
            ray.shutdown()
            if hasattr(self, "store"):
                self.store.close()
            if hasattr(self, "reader"):
                self.reader.close()
            (self.home / "daemon.json").unlink(missing_ok=True)
            log.info("stopped")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m scheduler.daemon", description=__doc__)
    ap.add_argument("--home", type=Path, default=default_home())
    ap.add_argument("--config", type=Path, default=None, help="cluster config YAML")
    ap.add_argument("--db", default=None, help="SQLAlchemy URL (default: sqlite in --home)")
    ap.add_argument("--host", default="127.0.0.1", help="API bind address (default loopback only)")
    ap.add_argument("--port", type=int, default=8470, help="API port (0: any free port)")
    args = ap.parse_args(argv)
    args.home.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    daemon = Daemon(args.home.resolve(), load_cluster_config(args.config), args.db, args.host, args.port)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: daemon.stop.set())
    try:
        daemon.start()
        daemon.run()
    except Exception as e:  # noqa: BLE001 - reported in the log `shoal up` prints
        log.error("Shoal failed: %s", e, exc_info=not isinstance(e, RuntimeError))
        raise SystemExit(1) from None
    finally:
        daemon.shutdown()


if __name__ == "__main__":
    main()
