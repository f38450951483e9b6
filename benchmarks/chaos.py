"""Seeded chaos run: the scheduler is SIGKILLed at random points while it runs >= 200 short jobs
on a real Ray cluster, and restarted each time. Afterwards every job must be terminal, none lost,
none run twice, and no GPU held for a job that is not running.

Standard setting (no arguments): 200 jobs of 1 fake GPU on a one-node Ray cluster with 8 fake
GPUs (ray.cluster_utils.Cluster, started here and outliving the scheduler, which connects to it
with --ray-address), 10 kills at seeded random moments, seed 7. The jobs use the executor's
`probe` workload: the real path (API, store, policy, named detached runner actors that hold the
job's GPUs on the chosen node, progress hub, adoption after a crash) without loading a model, so
200 jobs fit in a few minutes on 2 cores; each steps `--steps` x 0.1 s and checkpoints halfway.

What is counted (from the store, the jobs' probe ledgers and Ray's resource view):
  lost        acknowledged submissions missing from the store or not terminal at the end;
  double runs jobs with two executions overlapping in time, an attempt executed twice, or work
              completed more than once;
  orphan GPUs GPUs Ray still has allocated once every job is terminal, plus GPU placements the
              store keeps for jobs that are not active.

Run from the repo root: .venv/bin/python benchmarks/chaos.py [--jobs N --kills K --seed S]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scheduler.client import Client  # noqa: E402


@dataclass
class ChaosResult:
    jobs: int
    kills: int
    lost: int
    double_runs: int
    orphan_gpus: int
    states: dict[str, int]
    orphan_runners: int = 0
    completed_twice: int = 0
    restarts_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    details: list[str] = field(default_factory=list)


def job_spec(i: int, steps: int) -> dict:
    ex = REPO / "examples"
    return {
        "name": f"chaos-{i}", "team": "default", "model": str(ex / "models" / "tiny-llama"),
        "dataset": {"train": str(ex / "data/tiny-sft/train.jsonl"), "validation": str(ex / "data/tiny-sft/val.jsonl")},
        "hyperparameters": {"max_steps": steps}, "checkpoint_every_steps": max(1, steps // 2),
        "resources": {"gpus": 1}, "max_retries": 3,
    }


class Scheduler:
    """The Shoal daemon as a process we can SIGKILL."""

    def __init__(self, home: Path, ray_address: str | None, config: Path, db: str | None = None,
                 extra: list[str] | None = None, secret: str | None = None):
        """`secret`: the server secret (SHOAL_SECRET); replicas sharing a database need the same.
        `ray_address` None: the daemon starts its own local Ray node (the embedded cluster)."""
        self.home, self.ray_address, self.config, self.db = home, ray_address, config, db
        self.extra = extra or []
        self.env = {**os.environ, **({"SHOAL_SECRET": secret} if secret else {})}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> Client:
        (self.home / "daemon.json").unlink(missing_ok=True)
        args = [sys.executable, "-m", "scheduler.daemon", "--home", str(self.home), "--port", "0",
                *(["--ray-address", self.ray_address] if self.ray_address else []),
                "--workload", "probe", "--config", str(self.config),
                *(["--db", self.db] if self.db else []), *self.extra]
        log = (self.home / "shoal.log").open("ab")
        self.proc = subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"scheduler exited ({self.proc.returncode}) during start-up:\n{self.log()[-3000:]}")
            try:
                info = json.loads((self.home / "daemon.json").read_text())
                if info["pid"] == self.proc.pid:
                    token = (self.home / "admin.token").read_text().strip()
                    client = Client(info["url"], token=token, timeout=60)
                    if client.health():
                        return client
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"scheduler did not come up in {timeout} s:\n{self.log()[-3000:]}")

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self, timeout: float = 60) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        p = self.home / "shoal.log"
        return p.read_text(errors="replace") if p.exists() else ""


def private_ray_tmpdir() -> str:
    """Ray records 'the current cluster' in <tmp>/ray/ray_current_cluster, and a plain
    `ray.init()` anywhere on the machine then connects to it: keep ours out of the shared /tmp."""
    if "RAY_TMPDIR" not in os.environ:
        os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="shoalray-", dir="/tmp")
    return os.environ["RAY_TMPDIR"]


def start_cluster(gpus: int, nodes: int = 1):
    """A Ray cluster of `nodes` nodes with `gpus` fake GPUs each (the head included)."""
    from ray.cluster_utils import Cluster

    private_ray_tmpdir()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": gpus, "num_gpus": gpus,
                                                            "include_dashboard": False})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=gpus, num_gpus=gpus)
    cluster.wait_for_nodes()
    return cluster


def write_config(path: Path, gpus: int) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"teams": {"default": {"gpus": gpus}},
                                    "scheduler": {"stop_grace_s": 10}}))
    return path


def ledger_check(homes: Path | list[Path], ids: list[int]) -> tuple[int, int, list[str]]:
    """(jobs run twice concurrently or per attempt, jobs whose work completed twice, details).
    `homes`: the SHOAL_HOME of every scheduler replica that may have launched the jobs."""
    double, twice, details = 0, 0, []
    homes = [homes] if isinstance(homes, Path) else homes
    for jid in ids:
        lines = []
        for home in homes:
            path = home / "jobs" / str(jid) / "probe-ledger.jsonl"
            if path.exists():
                lines += path.read_text().splitlines()
        lines.sort(key=lambda line: json.loads(line)["t"])
        spans: dict[tuple[int, int], list] = {}  # (attempt, n-th start) -> [start, end]
        starts = Counter()
        ends = 0
        for line in lines:
            e = json.loads(line)
            a = e["attempt"]
            if e["event"] == "start":
                starts[a] += 1
                spans[(a, starts[a])] = [e["t"], float("inf")]
            else:
                spans[(a, starts[a])][1] = e["t"]
                ends += e["event"] == "end"
        overlapping = any(s1[0] < s2[1] and s2[0] < s1[1]
                          for k1, s1 in spans.items() for k2, s2 in spans.items() if k1 < k2)
        if overlapping or any(n > 1 for n in starts.values()):
            double += 1
            details.append(f"job {jid}: executions {spans}")
        if ends > 1:
            twice += 1
            details.append(f"job {jid}: completed {ends} times")
    return double, twice, details


def orphan_gpus(store, total_gpus: int, settle_s: float = 15.0) -> tuple[int, int, list[str]]:
    """GPUs Ray holds beyond those of the jobs the store says are active (after letting the last
    finished runners end), plus GPUs the store still assigns to jobs that are not active; and
    runner actors alive for an attempt that is not active."""
    import ray

    from scheduler.lifecycle import ACTIVE
    from scheduler.placement import gpu_count  # every node of a multi-node gang

    deadline = time.monotonic() + settle_s
    while True:
        active = {(j.id, j.attempt): gpu_count(j.placement) for j in store.active_jobs()}
        held = total_gpus - int(ray.available_resources().get("GPU", 0)) - sum(active.values())
        runners = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                   if a["name"].startswith("shoal-job-")
                   and tuple(int(x) for x in a["name"][len("shoal-job-"):].split("-a")) not in active]
        if (held <= 0 and not runners) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    held = max(held, 0)
    details = [f"Ray holds {held} GPU(s) beyond the active jobs' {sum(active.values())}"] if held else []
    stale = [j for j in store.jobs() if j.state not in ACTIVE and j.placement]
    details += [f"job {j.id} {j.state.value} keeps placement {j.placement}" for j in stale]
    details += [f"runner {name} alive for an attempt that is not active" for name in runners]
    return held + sum(gpu_count(j.placement) for j in stale), len(runners), details


def run_chaos(jobs: int = 200, kills: int = 10, seed: int = 7, gpus: int = 8, steps: int = 10,
              timeout_s: float = 1200, workdir: Path | None = None, say=print) -> ChaosResult:
    import ray

    from scheduler.store import Store

    rng = random.Random(seed)
    t_start = time.monotonic()
    workdir = Path(workdir or tempfile.mkdtemp(prefix="shoal-chaos-"))
    home = workdir / "home"
    home.mkdir(parents=True, exist_ok=True)
    config = write_config(workdir / "cluster.yaml", gpus)
    cluster = start_cluster(gpus)
    ray.init(address=cluster.address, namespace="shoal", log_to_driver=False)
    sched = Scheduler(home, cluster.address, config)
    acked: list[int] = []
    restarts: list[float] = []
    try:
        client = sched.start()
        batches = [jobs // (kills + 1) + (1 if k < jobs % (kills + 1) else 0) for k in range(kills + 1)]
        for k, batch in enumerate(batches):
            for _ in range(batch):
                acked.append(client.submit(job_spec(len(acked), steps), source=f"chaos-{len(acked)}").id)
            if k == kills:
                break
            # Kill at a random moment: while jobs start, run, finish, and the loop commits.
            time.sleep(rng.uniform(0.2, 4.0))
            say(f"kill {k + 1}/{kills}: SIGKILL scheduler pid {sched.proc.pid} "
                f"({len(acked)} jobs submitted, {time.monotonic() - t_start:.0f} s)")
            sched.kill()
            time.sleep(rng.uniform(0.0, 1.0))
            t0 = time.monotonic()
            client = sched.start()
            restarts.append(time.monotonic() - t0)
        say(f"all {len(acked)} jobs submitted; waiting for them to finish")
        deadline = t_start + timeout_s
        store = Store(f"sqlite:///{home / 'shoal.db'}")
        try:
            while time.monotonic() < deadline:
                known = {j.id: j for j in store.jobs()}
                if all(i in known and known[i].state.terminal for i in acked):
                    break
                time.sleep(1.0)
            known = {j.id: j for j in store.jobs()}
            lost_ids = [i for i in acked if i not in known or not known[i].state.terminal]
            states = Counter(known[i].state.value for i in acked if i in known)
            orphans, runners, orphan_details = orphan_gpus(store, gpus)
        finally:
            store.close()
        double, twice, details = ledger_check(home, acked)
        details = [f"lost job {i}: {known[i].state.value if i in known else 'missing'}" for i in lost_ids] \
            + details + orphan_details
        if lost_ids or double or orphans:
            details.append("scheduler log tail:\n" + sched.log()[-4000:])
        return ChaosResult(len(acked), kills, len(lost_ids), double + twice, orphans, dict(states),
                           orphan_runners=runners, completed_twice=twice, restarts_s=restarts,
                           wall_s=time.monotonic() - t_start, details=details)
    finally:
        sched.stop()
        ray.shutdown()
        cluster.shutdown()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="probe steps per job (0.1 s each)")
    ap.add_argument("--timeout", type=float, default=3600,
                    help="seconds for the whole run; jobs not terminal by then count as lost")
    args = ap.parse_args(argv)
    # Ray's driver swallows SIGINT in places; both signals end the run through its clean-up.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: sys.exit(130))
    r = run_chaos(args.jobs, args.kills, args.seed, args.gpus, args.steps, args.timeout)
    print(f"jobs {r.jobs}, kills {r.kills}, states {r.states}, wall {r.wall_s:.0f} s, "
          f"restart to API up {min(r.restarts_s or [0]):.1f}-{max(r.restarts_s or [0]):.1f} s")
    print(f"lost {r.lost}, double runs {r.double_runs} (work completed twice: {r.completed_twice}), "
          f"orphan GPUs {r.orphan_gpus}, runner actors left {r.orphan_runners}")
    for d in r.details:
        print("  " + d)
    print(f"RESULT chaos_jobs {r.jobs}")
    print(f"RESULT chaos_lost_jobs {r.lost}")
    print(f"RESULT chaos_double_runs {r.double_runs}")
    print(f"RESULT chaos_orphan_gpus {r.orphan_gpus}")
    return 0 if not (r.lost or r.double_runs or r.orphan_gpus) else 1


if __name__ == "__main__":
    raise SystemExit(main())
