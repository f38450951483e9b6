"""Runs jobs on Ray. Each attempt is a `JobRunner` actor (no resources of its own) that drives a
Ray Train `TorchTrainer` whose workers run `trainer.ray_worker.train_loop_per_worker`. Killing the
runner kills what it owns (the Train controller, its workers and their placement group).

Trainers talk back through one `ProgressHub` actor: per-step progress and log lines (pushed,
fire-and-forget, so a step never waits on the scheduler) and the stop flag for preemption.
`ray.train.report` is used only at checkpoints: it can block for the controller's poll interval.

Placement: the workers are pinned to the chosen node with a label selector and get the chosen
GPU indices in their config (`gpu_indices`); on real GPUs the trainer uses `cuda:<index>`.
A multi-node gang (`LaunchRequest.parts`) is ONE TorchTrainer with a worker per GPU of every
node: `label_selector` is a list with one `ray.io/node-id` selector per worker (so each node gets
exactly its part's workers) and the placement group is PACK (STRICT_PACK cannot span nodes). Ray
Train orders ranks its own way, so the config carries `gpu_indices_by_node` and each worker
picks its GPU from its own node's list (trainer.ray_worker). The runner stays on the first node.
Checkpoints live in `<job_dir>/ray/job-<id>`; a later attempt with the same run name resumes
from the newest one (Ray Train's run snapshot).

Crash safety: each attempt's runner is a *detached* actor named `shoal-job-<id>-a<attempt>` (the
natural key of a launch) that starts its run in its constructor, so creating it is the launch.
A scheduler that dies after launching but before recording it finds the actor by name on restart
and adopts it instead of launching again; a finished runner keeps its result until a scheduler
has read it (it is ended one poll later, after the service recorded the outcome).

`workload="probe"` replaces the trainer by a light stand-in for failure drills (benchmarks/chaos.py):
the runner itself holds the job's GPUs on the chosen node (a gang's other nodes: one `GpuHolder`
actor each, owned by the runner, checked every step so a lost node fails the attempt), steps `max_steps` x PROBE_STEP_S,
checkpoints every `checkpoint_every_steps`, honours stop requests, and appends every start and end
to `<job_dir>/probe-ledger.jsonl` so a checker can prove no job ran twice.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import traceback
from typing import Callable

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from scheduler.executor import LaunchRequest, Outcome, ProgressEvent
from scheduler.inventory import NodeInfo

PROBE_STEP_S = 0.1

log = logging.getLogger("shoal.executor")


@ray.remote(num_cpus=0)
class ProgressHub:
    def __init__(self) -> None:
        self._events: list[tuple[int, int, dict]] = []
        self._stop: set[tuple[int, int]] = set()

    def push(self, job_id: int, attempt: int, event: dict) -> None:
        self._events.append((job_id, attempt, event))

    def drain(self) -> list[tuple[int, int, dict]]:
        out, self._events = self._events, []
        return out

    def request_stop(self, job_id: int, attempt: int) -> None:
        self._stop.add((job_id, attempt))

    def forget(self, job_id: int, attempt: int) -> None:
        self._stop.discard((job_id, attempt))

    def should_stop(self, job_id: int, attempt: int) -> bool:
        return (job_id, attempt) in self._stop


def train_config(req: LaunchRequest) -> dict:
    """JobSpec (as submitted) + placement -> trainer.config.TrainConfig fields."""
    s = req.spec
    hp, lora, ds, res = s.get("hyperparameters", {}), s.get("lora", {}), s["dataset"], s.get("resources", {})
    cfg = {
        "job_id": req.job_id, "attempt": req.attempt, "model_path": s["model"],
        "train_path": ds["train"], "val_path": ds.get("validation"),
        "method": s.get("method", "lora"), "output_dir": req.output_dir,
        "checkpoint_every_steps": s.get("checkpoint_every_steps", 50),
        "gpu_indices": list(req.gpu_indices), "torch_threads": res.get("cpus_per_gpu", 1),
        # Staged checkpoints of a killed worker stay with the job, not in the system temp dir.
        "scratch_dir": f"{req.job_dir}/scratch",
    }
    if req.parts:  # a multi-node gang: each worker takes its GPU from its own node's list
        cfg["gpu_indices_by_node"] = {node_id: list(ix) for node_id, ix in req.all_parts()}
    if "validation_fraction" in ds:
        cfg["val_fraction"] = ds["validation_fraction"]
    for key in ("r", "alpha", "dropout", "target_modules"):
        if key in lora:
            cfg[f"lora_{key}"] = lora[key]
    cfg.update(hp)
    # data format, length policy, evaluation, export, target, cost (trainer issue #5)
    cfg["data_format"] = ds.get("format", "auto")
    cfg["max_length_policy"] = ds.get("max_length_policy", "error")
    ev = s.get("eval", {})
    for key, name in (("every_steps", "eval_every_steps"), ("generate_examples", "eval_generate_examples"),
                      ("max_new_tokens", "eval_max_new_tokens"), ("metric", "eval_metric"),
                      ("early_stopping_patience", "early_stopping_patience"),
                      ("early_stopping_min_delta", "early_stopping_min_delta"),
                      ("restore_best", "restore_best")):
        if ev.get(key) is not None:
            cfg[name] = ev[key]
    cfg["merge"] = bool(s.get("export", {}).get("merge", False))
    cfg["target"] = dict(s.get("target") or {})
    cfg["job_name"] = s.get("name")
    cfg["price_per_gpu_hour"] = req.price_per_gpu_hour
    cfg["storage_root"] = req.storage_root  # the trainer refuses an output_dir outside it
    return cfg


@ray.remote(num_cpus=0, max_concurrency=64)
class JobRunner:
    """Threaded actor: the constructor starts the run in a thread (so the actor's creation is the
    launch: there is no window where it exists but was never started); `result` waits for it and
    can be called again by a restarted scheduler (adoption)."""

    def __init__(self, req: LaunchRequest, hub_name: str, namespace: str, backend: str, storage: str,
                 workload: str = "train") -> None:
        self._done = threading.Event()
        self._result: dict | None = None
        self._thread = threading.Thread(target=self._fit, args=(req, hub_name, namespace, backend, storage, workload),
                                        daemon=True)
        self._thread.start()

    def result(self) -> dict:
        self._done.wait()
        return self._result or {"status": "failed", "error": "runner ended without a result"}

    def _fit(self, req, hub_name, namespace, backend, storage, workload) -> None:
        try:
            if workload == "probe":
                self._result = _probe(req, ray.get_actor(hub_name, namespace=namespace))
            else:
                self._result = self._run(req, hub_name, namespace, backend, storage)
        except BaseException:  # noqa: BLE001 - reported to the scheduler as the cause
            self._result = {"status": "failed", "error": traceback.format_exc()}
        finally:
            self._done.set()

    @staticmethod
    def _run(req, hub_name, namespace, backend, storage) -> dict:
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        from trainer.ray_worker import train_loop_per_worker

        cpus = int(req.spec.get("resources", {}).get("cpus_per_gpu", 1))
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"train": train_config(req), "progress_actor": hub_name, "namespace": namespace},
            scaling_config=ScalingConfig(
                num_workers=req.gpus, use_gpu=True, resources_per_worker={"CPU": cpus, "GPU": 1},
                **worker_placement(req),
            ),
            torch_config=TorchConfig(backend=backend),
            run_config=RunConfig(
                name=f"job-{req.job_id}", storage_path=storage,
                failure_config=FailureConfig(max_failures=0),  # retries are Shoal's (counted, visible)
                checkpoint_config=CheckpointConfig(num_to_keep=2),
            ),
        )
        result = trainer.fit()
        if result.error is not None:
            return {"status": "failed", "error": "".join(traceback.format_exception(result.error))}
        metrics = dict(result.metrics or {})
        status = metrics.pop("status", "succeeded")
        return {"status": "preempted" if status == "preempted" else "succeeded", "metrics": metrics}


def worker_placement(req: LaunchRequest) -> dict:
    """ScalingConfig placement of the job's workers: all on its node (one node), or one
    `ray.io/node-id` selector per worker, a node's selector repeated once per GPU of its part."""
    if not req.parts:
        return {"placement_strategy": "STRICT_PACK", "label_selector": {"ray.io/node-id": req.node_id}}
    return {"placement_strategy": "PACK",
            "label_selector": [{"ray.io/node-id": node_id} for node_id, ix in req.all_parts() for _ in ix]}


@ray.remote(num_cpus=0)
class GpuHolder:
    """Holds a probe gang's GPUs on one of its other nodes (created with num_gpus and a hard
    affinity to that node); dies with its node, or with the runner that owns it."""

    def where(self) -> str:
        return ray.get_runtime_context().get_node_id()


HOLDER_START_S = 60.0  # a gang's holders must be placed by then (their GPUs were free when committed)
HOLDER_ANSWER_S = 5.0  # a holder that does not answer a step's check this long is lost with its node


def _hold_other_nodes(req: LaunchRequest) -> list:
    """One GpuHolder per node of the gang but the first (the runner holds that one's GPUs);
    returns once every holder runs on its node (a TimeoutError if one cannot be placed)."""
    holders = [(node_id, GpuHolder.options(num_gpus=len(ix), scheduling_strategy=NodeAffinitySchedulingStrategy(
        node_id, soft=False)).remote()) for node_id, ix in req.all_parts()[1:]]
    for node_id, h in holders:
        got = ray.get(h.where.remote(), timeout=HOLDER_START_S)
        if got != node_id:  # a hard affinity makes this a Ray bug, not a job's
            raise RuntimeError(f"probe gang: the GPU holder for node {node_id} runs on {got}")
    return holders


def _probe(req: LaunchRequest, hub) -> dict:
    """The light workload: see the module docstring. Its checkpoint is a file with the step."""
    steps = int(req.spec.get("hyperparameters", {}).get("max_steps") or 10)
    every = int(req.spec.get("checkpoint_every_steps") or steps)
    ckpt, ledger = os.path.join(req.job_dir, "probe-checkpoint"), os.path.join(req.job_dir, "probe-ledger.jsonl")

    def note(event: str, **extra) -> None:  # one O_APPEND write per line: lines never interleave
        line = json.dumps({"attempt": req.attempt, "event": event, "t": time.time(), "pid": os.getpid(),
                           "host": socket.gethostname(), **extra}) + "\n"
        fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def save(step: int) -> None:
        tmp = f"{ckpt}.tmp-{req.attempt}"
        with open(tmp, "w") as f:
            f.write(str(step))
        os.replace(tmp, ckpt)
        hub.push.remote(req.job_id, req.attempt, {"type": "checkpoint", "step": step})

    holders = _hold_other_nodes(req)  # owned by this runner: they end with it
    resumed = int(open(ckpt).read()) if os.path.exists(ckpt) else 0
    note("start", resumed_from_step=resumed, nodes=[n for n, _ in req.all_parts()])
    for step in range(resumed + 1, steps + 1):
        for node_id, h in holders:  # a gang's node lost: the attempt fails (the service requeues it)
            try:
                ray.get(h.where.remote(), timeout=HOLDER_ANSWER_S)
            except (ray.exceptions.RayError, TimeoutError) as e:
                note("lost", step=step - 1, node=node_id)
                raise RuntimeError(f"probe gang: the GPUs on node {node_id} are gone ({type(e).__name__})") from None
        if ray.get(hub.should_stop.remote(req.job_id, req.attempt)):
            save(step - 1)
            note("stop", step=step - 1)
            return {"status": "preempted", "metrics": {"step": step - 1}}
        time.sleep(PROBE_STEP_S)
        hub.push.remote(req.job_id, req.attempt, {"type": "step", "step": step, "total_steps": steps,
                                                  "loss": 1.0 / step, "lr": 0.0, "tokens_per_s": 0.0})
        if step % every == 0 and step < steps:
            save(step)
    note("end", step=steps)
    return {"status": "succeeded", "metrics": {"steps": steps, "resumed_from_step": resumed, "probe": True}}


class RayNodes:
    """The nodes of a Ray cluster Shoal connected to (`shoal up --ray-address`), as the Inventory's
    node source: every node that offers GPUs, alive or (once seen) dead, with a GpuReader each
    from `make_reader(node_id, gpu_count)` (fake GPUs sized by the node's GPU resource, until
    node agents report real readings). A dead node keeps no GPUs in the snapshot; a node that
    comes back is a new Ray node with its own id, so nothing is counted twice.

    `probe(node_id)` asks the node's raylet directly (a TCP connect to its port): Ray declares a
    node dead only after missed health checks (seconds), while its jobs' failures arrive at once.
    A node that does not answer is listed dead from then on (re-probed at each refresh, so one that
    answers again is alive again) until Ray itself declares it dead."""

    def __init__(self, make_reader: Callable[[str, int], object], cache_s: float = 0.5,
                 probe_timeout_s: float = 2.0):
        self.readers: dict[str, object] = {}
        self._make_reader = make_reader
        self._cache_s = cache_s
        self._cached: tuple[float, list[NodeInfo]] = (0.0, [])
        self._probe_timeout_s = probe_timeout_s
        self._raylets: dict[str, tuple[str, int]] = {}  # node id -> raylet (host, port)
        self.unreachable: set[str] = set()  # alive to Ray, but its raylet did not answer a probe

    def _answers(self, node_id: str) -> bool:
        addr = self._raylets.get(node_id)
        if addr is None:
            return True  # never seen alive: nothing to ask
        try:
            socket.create_connection(addr, timeout=self._probe_timeout_s).close()
            return True
        except OSError:
            return False

    def probe(self, node_id: str) -> bool:
        """Whether the node's raylet answers now; one that does not is listed dead from now on."""
        if self._answers(node_id):
            self.unreachable.discard(node_id)
            return True
        if node_id not in self.unreachable:
            log.warning("node %s: its raylet at %s:%s does not answer; treating the node as lost",
                        node_id[:8], *self._raylets[node_id])
            self.unreachable.add(node_id)
            self._cached = (0.0, [])
        return False

    def __call__(self) -> list[NodeInfo]:
        at, nodes = self._cached
        if time.monotonic() - at < self._cache_s:
            return nodes
        nodes = []
        for n in ray.nodes():
            node_id, alive = n["NodeID"], bool(n["Alive"])
            name = f"{n.get('NodeManagerHostname', 'node')}:{node_id[:8]}"
            if alive and n.get("NodeManagerPort"):
                self._raylets[node_id] = (n["NodeManagerAddress"], int(n["NodeManagerPort"]))
            if not alive:
                self.unreachable.discard(node_id)  # Ray agrees now
            elif node_id in self.unreachable and not self._answers(node_id):
                alive = False
            else:
                self.unreachable.discard(node_id)
            if not alive:
                if node_id in self.readers:
                    nodes.append(NodeInfo(node_id, name, alive=False, cpus=0))
                continue
            gpus = int(n.get("Resources", {}).get("GPU", 0))
            if gpus == 0:
                continue  # a head without GPUs runs no jobs
            if node_id not in self.readers:
                self.readers[node_id] = self._make_reader(node_id, gpus)
            nodes.append(NodeInfo(node_id, name, alive=True, cpus=int(n.get("Resources", {}).get("CPU", 0))))
        self._cached = (time.monotonic(), nodes)
        return nodes


_RUNNER_NAME = re.compile(r"^shoal-job-(\d+)-a(\d+)$")


class RayExecutor:
    """`backend` is "gloo" on CPU / fake GPUs and "nccl" on real NVIDIA GPUs; `workload` is
    "train" (Ray Train + trainer/) or "probe" (failure drills, see the module docstring)."""

    HUB = "shoal-progress"

    def __init__(self, namespace: str = "shoal", backend: str = "gloo", workload: str = "train"):
        if workload not in ("train", "probe"):
            raise ValueError(f"workload: {workload!r} is not one of train, probe")
        self.namespace = namespace
        self.backend = backend
        self.workload = workload
        # Detached: the hub and the runners outlive a scheduler process that dies (adoption).
        # Created on the scheduler's own node when it can be (soft): on a worker node, a node
        # loss would also take the hub away until Ray declares the node dead, and each cycle's
        # drain would wait for it. It restarts elsewhere if its node dies (its queued events and
        # stop flags are lost: progress resumes with the next report, stops are re-sent by recover()).
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        self.hub = ProgressHub.options(name=self.HUB, namespace=namespace, get_if_exists=True,
                                       lifetime="detached", max_restarts=-1, max_task_retries=-1,
                                       scheduling_strategy=here).remote()
        self._runs: dict[tuple[int, int], tuple[ray.actor.ActorHandle, ray.ObjectRef]] = {}
        self._killed: set[tuple[int, int]] = set()
        self._finished: list[ray.actor.ActorHandle] = []  # ended at the next poll (see docstring)

    @staticmethod
    def _name(job_id: int, attempt: int) -> str:
        return f"shoal-job-{job_id}-a{attempt}"  # _RUNNER_NAME parses it back

    def _existing(self, job_id: int, attempt: int):
        try:
            return ray.get_actor(self._name(job_id, attempt), namespace=self.namespace)
        except ValueError:
            return None

    def reap(self, keep: set[tuple[int, int]]) -> list[str]:
        """End every runner of this namespace whose (job, attempt) is not in `keep` (the attempts
        the store says are active) and not tracked here. A finished runner is ended at the poll
        after its outcome was recorded; a scheduler killed in between leaves it holding its GPUs
        for a job that is already over, and only a restart can find it. Returns their names."""
        ended = []
        for entry in ray.util.list_named_actors(all_namespaces=True):
            if entry.get("namespace") != self.namespace or not (m := _RUNNER_NAME.match(entry.get("name", ""))):
                continue
            key = (int(m.group(1)), int(m.group(2)))
            if key in keep or key in self._runs:
                continue
            try:
                ray.kill(ray.get_actor(entry["name"], namespace=self.namespace), no_restart=True)
                ended.append(entry["name"])
            except ValueError:  # gone meanwhile
                pass
        return ended

    def launch(self, req: LaunchRequest) -> None:
        key = (req.job_id, req.attempt)
        if key in self._runs:
            return
        actor = self._existing(*key)  # adopt a run launched before a crash
        if actor is None:
            # The runner lives on the job's node: it shares the fate of the job's workers (a node
            # loss ends both, and is told apart from a job failure by probing that node), and it
            # never lands on a node Ray still lists but Shoal already knows to be lost.
            opts = {"scheduling_strategy": NodeAffinitySchedulingStrategy(req.node_id, soft=False)}
            if self.workload == "probe":  # the runner itself holds the job's GPUs on its (first) node
                opts["num_gpus"] = len(req.gpu_indices)
            try:
                actor = JobRunner.options(name=self._name(*key), namespace=self.namespace, lifetime="detached",
                                          **opts).remote(req, self.HUB, self.namespace, self.backend,
                                                         f"{req.job_dir}/ray", self.workload)
            except ValueError:  # created by another scheduler process a moment ago: adopt it
                actor = self._existing(*key)
                if actor is None:
                    raise
        self._runs[key] = (actor, actor.result.remote())

    def is_active(self, job_id: int, attempt: int) -> bool:
        if (job_id, attempt) in self._runs:
            return True
        actor = self._existing(job_id, attempt)
        if actor is not None:  # adopt
            self._runs[(job_id, attempt)] = (actor, actor.result.remote())
            return True
        return False

    def request_stop(self, job_id: int, attempt: int) -> None:
        self.hub.request_stop.remote(job_id, attempt)

    def kill(self, job_id: int, attempt: int) -> None:
        run = self._runs.get((job_id, attempt))
        if run is not None:
            self._killed.add((job_id, attempt))
            ray.kill(run[0], no_restart=True)

    def poll(self) -> list[Outcome]:
        for actor in self._finished:  # their outcomes were returned by the previous poll
            ray.kill(actor, no_restart=True)
        self._finished.clear()
        if not self._runs:
            return []
        refs = {ref: key for key, (_, ref) in self._runs.items()}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
        out = []
        for ref in ready:
            key = refs[ref]
            actor, _ = self._runs.pop(key)
            try:
                res = ray.get(ref)
            except ray.exceptions.RayError as e:
                status = "killed" if key in self._killed else "failed"
                res = {"status": status, "error": None if status == "killed" else f"job runner died: {e}"}
            # The attempt is over; its runner (and its process) ends at the next poll, once the
            # service has recorded this outcome, so a crash in between loses no result.
            self._finished.append(actor)
            self.hub.forget.remote(*key)
            self._killed.discard(key)
            out.append(Outcome(key[0], key[1], res["status"], res.get("metrics", {}), res.get("error")))
        return out

    def drain_progress(self) -> list[ProgressEvent]:
        try:
            events = ray.get(self.hub.drain.remote(), timeout=30)
        except (ray.exceptions.RayError, TimeoutError) as e:  # the hub's node died: the cycle goes on
            log.warning("progress hub unavailable (%s); no progress this cycle", type(e).__name__)
            return []
        return [ProgressEvent(j, a, e) for j, a, e in events]

    def close(self) -> None:
        for actor in [a for a, _ in self._runs.values()] + self._finished:
            ray.kill(actor, no_restart=True)
        self._runs.clear()
        self._finished.clear()
