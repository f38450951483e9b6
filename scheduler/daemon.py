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
    memory and 90 % utilization, as NVML would show on real hardware. `reader` is one node's
    reader, or a {node_id: reader} dict for a multi-node cluster."""

    def __init__(self, reader, on_change=None):
        self.reader = reader
        self.on_change = on_change  # e.g. the node agent's poll, so readings show the change at once

    def _parts(self, job):
        """(reader, GPU indices) for every node of the job (a multi-node gang has several)."""
        from scheduler.placement import parts

        for node_id, idx in parts(job.placement):
            reader = self.reader.get(node_id) if isinstance(self.reader, dict) else self.reader
            if reader is not None:
                yield reader, idx

    def placed(self, job) -> None:
        for reader, idx in self._parts(job):
            reader.detach_job(job.id)
            reader.attach_job(job.id, idx, job.memory_per_gpu_mib)
        if self.on_change:
            self.on_change()

    def released(self, job) -> None:
        readers = self.reader.values() if isinstance(self.reader, dict) else [self.reader]
        for reader in readers:
            reader.detach_job(job.id)
        if self.on_change:
            self.on_change()


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


def reader_spec(config: ClusterConfig) -> dict:
    """What each node agent of a Ray cluster reads: NVML, or the config's fake GPU model (the
    count comes from each node's GPU resource)."""
    local = config.local
    if local.reader == "nvml":
        return {"kind": "nvml"}
    return {"kind": "fake", "model": local.gpu_model,
            "memory_mib": int(config.gpu_models[local.gpu_model].memory_gib * 1024)}


def scenario_reader(config: ClusterConfig, path: Path, **scenario_kw):
    """`shoal up --scenario FILE`: the embedded node's GPUs from a fake-GPU scenario
    (monitoring.scenario: models, foreign processes, timed XID/ECC/disappearing-GPU faults, played
    as the node agent polls). The embedded cluster is one Ray node, so the scenario has one node,
    and its models must be in the cluster config's gpu_models (memory, price)."""
    from monitoring.scenario import ScenarioNodeReader, Scenario, parse_scenario

    try:
        text = Path(path).read_text()
    except OSError as e:
        raise RuntimeError(f"--scenario: cannot read {path}: {e.strerror}") from None
    spec = parse_scenario(text, str(path))
    if len(spec.nodes) != 1:
        raise RuntimeError(f"{path}: nodes: `shoal up` runs one Ray node, so its scenario has one node "
                           f"(this one has {len(spec.nodes)}: {', '.join(n.name for n in spec.nodes)})")
    for i, n in enumerate(spec.nodes):
        if n.model not in config.gpu_models:
            raise RuntimeError(f"{path}: nodes.{i}.model: {n.model!r} is not in the cluster config's gpu_models "
                               f"({', '.join(sorted(config.gpu_models))}); add it there with its memory_gib")
    memory = {k: int(m.memory_gib * 1024) for k, m in config.gpu_models.items()}
    return ScenarioNodeReader(Scenario(spec, memory_by_model=memory, **scenario_kw), spec.nodes[0].name)


def make_reader(config: ClusterConfig, scenario: Path | None = None) -> GpuReader:
    if scenario is not None:
        return scenario_reader(config, scenario)
    local = config.local
    if local.reader == "nvml":
        return NvmlReader()
    memory_mib = int(config.gpu_models[local.gpu_model].memory_gib * 1024)
    return FakeGpuReader(local.gpus, local.gpu_model, memory_mib, host=socket.gethostname())


class Daemon:
    """`ray_address`: connect to an existing Ray cluster (every node with GPUs is used, read by a
    node agent actor on that node: monitoring.ray_agents) instead of starting a local one. `replica_id`:
    this replica's name in the leader lease (replicas sharing a PostgreSQL store: one leads,
    the others serve the API and take over when it dies)."""

    def __init__(self, home: Path, config: ClusterConfig, db_url: str | None, host: str, port: int,
                 ray_address: str | None = None, workload: str = "train", replica_id: str | None = None,
                 lease_ttl_s: float = 8.0, rotate_secret: bool = False, scenario: Path | None = None):
        self.home, self.config, self.host, self.port = home, config, host, port
        self.scenario = scenario
        self.rotate_secret = rotate_secret
        self.db_url = db_url or f"sqlite:///{home / 'shoal.db'}"
        self.ray_address, self.workload, self.lease_ttl_s = ray_address, workload, lease_ttl_s
        self.replica_id = replica_id
        self.stop = threading.Event()
        self.lost_lease = False

    def start(self) -> None:
        import ray
        import uvicorn

        from monitoring.agent import NodeAgent
        from monitoring.fault_file import FaultFile
        from monitoring.metrics import ShoalMetrics
        from scheduler.api import create_app
        from scheduler.auth import TokenAuthority, load_or_create_secret
        from scheduler.inventory import Inventory, NodeInfo
        from scheduler.ha import LeaderElector, default_replica_id
        from scheduler.ray_executor import RayExecutor, RayNodes
        from scheduler.service import Service, check_launchable
        from scheduler.store import Store

        self.home.mkdir(parents=True, exist_ok=True)
        _check_port(self.host, self.port)  # fail before the slow part (Ray) starts
        os.environ.update(_RAY_ENV)
        local = self.config.local
        hostname = socket.gethostname()
        agent_interval_s = float(os.environ.get("SHOAL_AGENT_INTERVAL_S", "1"))
        if self.ray_address and self.scenario is not None:
            raise RuntimeError("--scenario works with the embedded cluster only (one Ray node), not with "
                               "--ray-address: there each node's agent reads the config's local.reader")
        if self.ray_address:
            from monitoring.ray_agents import RayNodeAgents

            # The cluster's processes do not inherit this process's environment: send it along.
            ray.init(address=self.ray_address, namespace="shoal", logging_level=logging.WARNING,
                     log_to_driver=False, configure_logging=False, runtime_env={"env_vars": dict(_RAY_ENV)})
            # One node agent actor per Ray node with GPUs (NVML, or the config's fake GPUs sized by
            # the node's GPU resource), started as nodes join; the inventory reads their proxies.
            self.agents = RayNodeAgents(reader_spec(self.config), agent_interval_s)
            nodes = RayNodes(self.agents.reader_for)
            nodes()
            readers = nodes.readers
            self.agents.start(nodes)
            self.reader = None
            node_id = ray.get_runtime_context().get_node_id()
        else:
            self.reader = make_reader(self.config, self.scenario)
            gpus = len(self.reader.read())
            cpus = max(os.cpu_count() or 1, gpus)  # every fake GPU can hold a 1-CPU worker
            ray.init(num_cpus=cpus, num_gpus=gpus, namespace="shoal",
                     include_dashboard=True, logging_level=logging.WARNING, log_to_driver=False,
                     configure_logging=False)
            node_id = ray.get_runtime_context().get_node_id()

            def nodes() -> list[NodeInfo]:
                return [NodeInfo(node_id, hostname, alive=True, cpus=cpus)]

            readers = {node_id: self.reader}

        self.store = Store(self.db_url)
        self.auth = TokenAuthority(self.store, load_or_create_secret(self.home))
        if self.rotate_secret:
            log.warning("--rotate-secret: this server's secret is now the database's; %d old tokens revoked",
                        self.auth.rotate_secret())
        self.auth.check_secret()  # before taking the lease: a replica with another secret must not lead
        self.elector = LeaderElector(self.store, self.replica_id or default_replica_id(str(self.home)), WallClock(),
                                     ttl_s=self.lease_ttl_s, renew_s=min(2.0, self.lease_ttl_s / 4))
        metrics = ShoalMetrics()
        fake = local.reader == "fake" or self.scenario is not None
        if fake:  # failure drills: faults appended to this file hit the fake GPUs (monitoring/fault_file.py);
            # with --ray-address the readers are the node agents' proxies, which pass them on
            FaultFile(self.home / "fake-faults.jsonl").watch(readers, self.stop)
        if self.reader is not None:
            # The node agent polls this node's GPUs (SHOAL_AGENT_INTERVAL_S, default 1 s) and is the
            # inventory's reader for it; its health series join /metrics.
            self.agent = NodeAgent(self.reader, interval_s=agent_interval_s,
                                   hostname=hostname, registry=metrics.registry).start()
            inventory = Inventory(nodes, {node_id: self.agent})
            listeners = [FakeGpuLoad(self.reader, self.agent.poll)] if fake else []
        else:  # --ray-address: one node agent per Ray node, kept current by RayNodes and RayNodeAgents
            inventory = Inventory(nodes, readers)
            listeners = [FakeGpuLoad(readers)] if fake else []  # the fake load goes to each node's agent
            metrics.registry.register(self.agents.collector())
        executor = RayExecutor(backend="gloo" if fake else "nccl", workload=self.workload)
        self.service = Service(self.store, executor, inventory, self.config, WallClock(), self.home,
                               listeners=[*listeners, metrics.events], on_cycle=metrics.cycle.observe,
                               preflight=check_launchable)
        metrics.attach(self.service)
        if self.elector.try_acquire():  # else a follower: serves the API, takes over in run()
            self.service.recover()
        self.admin_token = self.home / "admin.token"
        if self.auth.ensure_admin_token(self.admin_token):
            log.info("created the admin API token in %s (mode 0600)", self.admin_token)
        app = create_app(self.service, metrics.registry, auth=self.auth)
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
            "ray_address": self.ray_address, "replica_id": self.elector.replica_id,
            "admin_token": str(self.admin_token),
        }))
        log.info("shoal up: API %s, metrics %s/metrics, store %s, %d %s GPU(s) (%s reader), %s",
                 self.url, self.url, self.db_url, sum(len(r.read()) for r in readers.values()),
                 local.gpu_model if self.scenario is None else "fake",
                 local.reader if self.scenario is None else f"scenario {self.scenario.name}", "leader" if self.elector.leading else "follower (waiting for the lease)")

    def run(self) -> None:
        if not self.elector.leading:
            if not self.elector.wait_for_leadership(self.stop):
                return
            log.info("took over as leader; reconciling with what runs")
            self.service.recover()

        def lost() -> None:
            self.lost_lease = True
            self.stop.set()

        self.elector.keep_renewing(self.stop, lost)
        self.service.run(self.stop)
        if not self.stop.is_set():  # the loop was fenced: another replica leads; leave its jobs alone
            self.lost_lease = True

    def shutdown(self) -> None:
        """Stops whatever `start` got to start (it may have failed half-way)."""
        import ray

        leading = hasattr(self, "elector") and self.elector.leading and not self.lost_lease
        try:
            if hasattr(self, "service") and leading:
                log.info("stopping: checkpointing running jobs (grace %.0f s)", self.config.scheduler.stop_grace_s)
                self.service.shutdown(self.config.scheduler.stop_grace_s)
        finally:
            if hasattr(self, "server"):
                self.server.should_exit = True
                self.api_thread.join(timeout=10)
            if hasattr(self, "service") and leading:
                self.service.executor.close()
            if leading:
                self.elector.release()
            if hasattr(self, "agents"):
                self.agents.close()  # the node agent actors (they would die with this driver anyway)
            ray.shutdown()
            if hasattr(self, "store"):
                self.store.close()
            if hasattr(self, "agent"):
                self.agent.close()  # closes the reader too
            elif getattr(self, "reader", None) is not None:
                self.reader.close()
            (self.home / "daemon.json").unlink(missing_ok=True)
            log.info("stopped")


def tune_gc() -> None:
    """For a long-running server: move what start-up allocated (modules, the config, Ray's and
    torch's objects) out of the cyclic collector's sight, and run the young collection after
    100k allocations instead of 700. With a deep queue the process holds tens of thousands of
    long-lived records; with the defaults the collector re-scanned them many times a second
    under a submit burst (benchmarks/api_submit.py: ~7 % of the server's CPU per submit and a
    third of the p99 latency). Cycles are still collected, in larger batches."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m scheduler.daemon", description=__doc__)
    ap.add_argument("--home", type=Path, default=default_home())
    ap.add_argument("--config", type=Path, default=None, help="cluster config YAML")
    ap.add_argument("--db", default=None, help="SQLAlchemy URL (default: sqlite in --home)")
    ap.add_argument("--host", default="127.0.0.1", help="API bind address (default loopback only)")
    ap.add_argument("--port", type=int, default=8470, help="API port (0: any free port)")
    ap.add_argument("--ray-address", default=None, help="connect to this Ray cluster instead of starting one")
    ap.add_argument("--workload", choices=["train", "probe"], default="train",
                    help="probe: a light stand-in for the trainer, for failure drills (benchmarks/chaos.py)")
    ap.add_argument("--replica-id", default=None, help="this replica's name in the leader lease "
                    "(default host:home; replicas sharing a database need distinct ones)")
    ap.add_argument("--scenario", type=Path, default=None, help="fake-GPU scenario YAML for this node (demos): "
                    "GPU models, foreign processes, timed faults; replaces local.gpus/gpu_model/reader")
    ap.add_argument("--lease-ttl", type=float, default=8.0, help="seconds a leader lease lasts without renewal")
    ap.add_argument("--rotate-secret", action="store_true", help="adopt this server's secret for the database "
                    "and revoke every token made with another (after a lost server.secret)")
    args = ap.parse_args(argv)
    args.home.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    daemon = Daemon(args.home.resolve(), load_cluster_config(args.config), args.db, args.host, args.port,
                    ray_address=args.ray_address, workload=args.workload, replica_id=args.replica_id,
                    lease_ttl_s=args.lease_ttl, rotate_secret=args.rotate_secret,
                    scenario=args.scenario.resolve() if args.scenario else None)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: daemon.stop.set())
    try:
        daemon.start()
        tune_gc()
        daemon.run()
    except Exception as e:  # noqa: BLE001 - reported in the log `shoal up` prints
        log.error("Shoal failed: %s", e, exc_info=not isinstance(e, RuntimeError))
        raise SystemExit(1) from None
    finally:
        daemon.shutdown()
    if daemon.lost_lease:  # exit non-zero so a supervisor restarts it (as a follower)
        log.error("exiting: another replica took the leader lease")
        raise SystemExit(4)


if __name__ == "__main__":
    main()
