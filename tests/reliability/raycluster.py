"""A real multi-node Ray cluster on this machine for the reliability tests: a head without GPUs
and two worker nodes with 2 CPUs and 2 (fake) GPUs each (`ray.cluster_utils.Cluster`)."""
from __future__ import annotations

import socket
import time

from benchmarks.chaos import private_ray_tmpdir


def wait_for(pred, timeout: float, what: str, log=lambda: ""):
    """`pred()`'s first truthy value, polled every 0.5 s; fails naming `what` (and the log's tail)."""
    deadline = time.monotonic() + timeout
    while not (value := pred()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{log()[-5000:]}"
        time.sleep(0.5)
    return value


def two_node_cluster():
    """Generator for a module fixture: yields the Cluster (its worker nodes in `.workers`),
    connected as the driver; shuts both down after."""
    import ray
    from ray.cluster_utils import Cluster

    private_ray_tmpdir()
    with socket.socket() as sock:  # Ray Train needs the dashboard; 8265 may be another cluster's
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": True,
                                                      "dashboard_port": port})
    workers = [c.add_node(num_cpus=2, num_gpus=2) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, namespace="shoal-test", log_to_driver=False)
    c.workers = workers
    yield c
    ray.shutdown()
    c.shutdown()
