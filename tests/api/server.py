"""The embedded server for CLI tests, without Ray: the real API, store, policy and service loop on
the wall clock, with fake GPUs and the in-memory executor (a job "runs" for its spec's
`resources.expected_duration_s`, default one hour). Like `shoal up`, it writes daemon.json,
server.secret and admin.token into --home, so the CLI finds it exactly as it finds a real one.

    python -m tests.api.server --home DIR [--config cluster.yaml]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import threading
from pathlib import Path

from prometheus_client import CollectorRegistry

from monitoring.gpu import FakeGpuReader
from scheduler.api import create_app
from scheduler.auth import TokenAuthority, load_or_create_secret
from scheduler.clock import WallClock
from scheduler.daemon import FakeGpuLoad, tune_gc
from scheduler.executor import InMemoryExecutor
from scheduler.inventory import Inventory, NodeInfo
from scheduler.service import Service
from scheduler.spec import load_cluster_config
from scheduler.store import Store
from tests.api.conftest import LiveServer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--config", type=Path)
    ap.add_argument("--db", default=None, help="SQLAlchemy URL (default: SQLite in --home)")
    ap.add_argument("--no-scheduler", action="store_true", help="API only: do not run the scheduling loop")
    args = ap.parse_args()
    home = args.home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    config = load_cluster_config(args.config)
    clock = WallClock()
    reader = FakeGpuReader(config.local.gpus, config.local.gpu_model)
    store = Store(args.db or f"sqlite:///{home / 'shoal.db'}")
    executor = InMemoryExecutor(clock, duration_s=lambda spec: float(
        (spec.get("resources") or {}).get("expected_duration_s") or 3600))
    inventory = Inventory(lambda: [NodeInfo("n1", "node-1", cpus=16)], {"n1": reader})
    service = Service(store, executor, inventory, config, clock, home, listeners=[FakeGpuLoad(reader)])
    auth = TokenAuthority(store, load_or_create_secret(home))
    auth.ensure_admin_token(home / "admin.token")
    server = LiveServer(create_app(service, CollectorRegistry(), auth=auth))
    (home / "daemon.json").write_text(json.dumps({"pid": os.getpid(), "url": server.url, "db": store.url,
                                                  "admin_token": str(home / "admin.token")}))
    tune_gc()  # as the daemon does
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        if args.no_scheduler:
            stop.wait()
        else:
            service.run(stop)
    finally:
        server.stop()
        store.close()
        (home / "daemon.json").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
