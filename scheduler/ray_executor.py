"""Runs jobs on Ray. Each attempt is a `JobRunner` actor (no resources of its own) that drives a
Ray Train `TorchTrainer` whose workers run `trainer.ray_worker.train_loop_per_worker`. Killing the
runner kills what it owns (the Train controller, its workers and their placement group).

Trainers talk back through one `ProgressHub` actor: per-step progress and log lines (pushed,
fire-and-forget, so a step never waits on the scheduler) and the stop flag for preemption.
`ray.train.report` is used only at checkpoints: it can block for the controller's poll interval.

Placement: the workers are pinned to the chosen node with a label selector and get the chosen
GPU indices in their config (`gpu_indices`); on real GPUs the trainer uses `cuda:<index>`.
Checkpoints live in `<job_dir>/ray/job-<id>`; a later attempt with the same run name resumes
from the newest one (Ray Train's run snapshot).
"""
from __future__ import annotations

import logging
import threading
import traceback

import ray

from scheduler.executor import LaunchRequest, Outcome, ProgressEvent

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
                      ("early_stopping_min_delta", "early_stopping_min_delta")):
        if ev.get(key) is not None:
            cfg[name] = ev[key]
    cfg["merge"] = bool(s.get("export", {}).get("merge", False))
    cfg["target"] = dict(s.get("target") or {})
    cfg["job_name"] = s.get("name")
    cfg["price_per_gpu_hour"] = getattr(req, "price_per_gpu_hour", None)
    return cfg


@ray.remote(num_cpus=0, max_concurrency=4)
class JobRunner:
    """Threaded actor: `start` kicks off fit() in a thread; `result` waits for it (callable again
    after the scheduler restarts, so a live run can be adopted)."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._result: dict | None = None
        self._thread: threading.Thread | None = None

    def start(self, req: LaunchRequest, hub_name: str, namespace: str, backend: str, storage: str) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._fit, args=(req, hub_name, namespace, backend, storage),
                                            daemon=True)
            self._thread.start()

    def result(self) -> dict:
        self._done.wait()
        return self._result or {"status": "failed", "error": "runner ended without a result"}

    def _fit(self, req, hub_name, namespace, backend, storage) -> None:
        try:
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
                num_workers=len(req.gpu_indices), use_gpu=True,
                resources_per_worker={"CPU": cpus, "GPU": 1}, placement_strategy="STRICT_PACK",
                label_selector={"ray.io/node-id": req.node_id},
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


class RayExecutor:
    """`backend` is "gloo" on CPU / fake GPUs and "nccl" on real NVIDIA GPUs."""

    HUB = "shoal-progress"

    def __init__(self, namespace: str = "shoal", backend: str = "gloo"):
        self.namespace = namespace
        self.backend = backend
        self.hub = ProgressHub.options(name=self.HUB, namespace=namespace, get_if_exists=True).remote()
        self._runs: dict[tuple[int, int], tuple[ray.actor.ActorHandle, ray.ObjectRef]] = {}
        self._killed: set[tuple[int, int]] = set()

    @staticmethod
    def _name(job_id: int, attempt: int) -> str:
        return f"shoal-job-{job_id}-a{attempt}"

    def _existing(self, job_id: int, attempt: int):
        try:
            return ray.get_actor(self._name(job_id, attempt), namespace=self.namespace)
        except ValueError:
            return None

    def launch(self, req: LaunchRequest) -> None:
        key = (req.job_id, req.attempt)
        if key in self._runs:
            return
        actor = self._existing(*key)  # adopt a run launched before a crash
        if actor is None:
            actor = JobRunner.options(name=self._name(*key), namespace=self.namespace).remote()
            actor.start.remote(req, self.HUB, self.namespace, self.backend, f"{req.job_dir}/ray")
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
            ray.kill(actor, no_restart=True)  # the attempt is over: free the runner's process
            self.hub.forget.remote(*key)
            self._killed.discard(key)
            out.append(Outcome(key[0], key[1], res["status"], res.get("metrics", {}), res.get("error")))
        return out

    def drain_progress(self) -> list[ProgressEvent]:
        return [ProgressEvent(j, a, e) for j, a, e in ray.get(self.hub.drain.remote(), timeout=30)]

    def close(self) -> None:
        for actor, _ in self._runs.values():
            ray.kill(actor, no_restart=True)
        self._runs.clear()
