"""Ray Train (V2) entry point: `TorchTrainer(train_loop_per_worker, train_loop_config=...)`.

train_loop_config = {"train": TrainConfig.model_dump(mode="json"),
                     "progress_actor": actor name or None, "namespace": Ray namespace}

The progress actor belongs to the scheduler; this module only calls
`push(job_id, attempt, event)` (fire and forget) and `should_stop(job_id, attempt)`.
"""

from __future__ import annotations

import time

import ray
import ray.train
import torch
from transformers.utils import logging as hf_logging

from trainer.config import TrainConfig
from trainer.loop import Hooks, pick_device, train

STOP_POLL_INTERVAL_S = 0.5  # a new question to the actor at most this often
STOP_WAIT_S = 0.05  # the longest a step waits for an answer already asked for
STOP_TIMEOUT_S = 5.0  # a question unanswered this long counts as "no" and is asked again


class ProgressChannel:
    """Events to, and stop requests from, the scheduler's progress actor (if any).

    Neither stalls training: events are fire-and-forget, and `should_stop` keeps one question in
    flight - asked when the channel is made (while the model loads) and again at most every
    STOP_POLL_INTERVAL_S - and at each step waits at most STOP_WAIT_S for its answer. A slow or
    hung actor costs a step <= 50 ms, never the 5 s a blocking call could."""

    def __init__(self, actor_name: str | None, namespace: str | None, job_id: int, attempt: int,
                 polls: bool = True):
        self.actor_name, self.namespace = actor_name, namespace
        self.job_id, self.attempt = job_id, attempt
        self._actor = None
        self._stop = False
        self._pending = None  # the ObjectRef of the question in flight
        self._asked = -float("inf")  # time.monotonic() when it was asked
        if polls:  # only rank 0 asks (the loop shares its answer); others never need one
            self._ask()

    def _get_actor(self):
        if self._actor is None and self.actor_name:
            try:
                self._actor = ray.get_actor(self.actor_name, namespace=self.namespace)
            except Exception as e:  # actor not (yet) there: drop the event
                print(f"[shoal trainer] progress actor {self.actor_name!r} unavailable: {e}")
        return self._actor

    def push(self, event: dict) -> None:
        actor = self._get_actor()
        if actor is not None:
            try:
                actor.push.remote(self.job_id, self.attempt, event)
            except Exception as e:  # the scheduler may be restarting: training goes on
                print(f"[shoal trainer] progress push failed: {e}")
                self._actor = None

    def _ask(self) -> None:
        actor = self._get_actor()
        if actor is None:
            return
        try:
            self._pending, self._asked = actor.should_stop.remote(self.job_id, self.attempt), time.monotonic()
        except Exception:  # noqa: BLE001 - the actor is gone: ask again later
            self._actor, self._pending = None, None

    def should_stop(self) -> bool:
        if self._stop:
            return True
        if self._pending is not None:
            ready, _ = ray.wait([self._pending], timeout=STOP_WAIT_S)
            if ready:
                try:
                    self._stop = bool(ray.get(ready[0]))
                except Exception:  # noqa: BLE001 - actor died: counts as "no"
                    self._actor = None
                self._pending = None
            elif time.monotonic() - self._asked > STOP_TIMEOUT_S:
                self._pending = None  # unanswered: "no"; ask again below
        if not self._stop and self._pending is None and time.monotonic() - self._asked >= STOP_POLL_INTERVAL_S:
            self._ask()
        return self._stop


def _report(rank: int):
    """save_checkpoint hook: every rank reports; only rank 0 attaches the checkpoint."""
    def save(path: str | None, metrics: dict) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(path) if rank == 0 and path else None
        ray.train.report(metrics, checkpoint=checkpoint)
    return save


def gang_gpu(cfg: TrainConfig, rank: int, world: int) -> tuple[str, int]:
    """(Ray node id, physical GPU index) of this worker of a multi-node gang: its node's entry of
    `gpu_indices_by_node`, at its position among the gang's workers on that node in world-rank
    order. (Ray Train's local_rank groups workers by node IP, which nodes sharing a host share.)"""
    import torch.distributed as dist

    node_id = ray.get_runtime_context().get_node_id()
    nodes: list = [None] * world
    # over gloo (CPU) even under NCCL: before set_device every local rank would be on cuda:0
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    dist.all_gather_object(nodes, node_id, group=group)
    if group is not None:
        dist.destroy_process_group(group)
    mine = cfg.gpu_indices_by_node.get(node_id, [])
    local = nodes[:rank].count(node_id)
    if local >= len(mine):
        raise RuntimeError(f"worker {rank} runs on node {node_id}, which the placement gives "
                           f"{len(mine)} GPU(s) ({nodes.count(node_id)} workers there): Ray placed it elsewhere")
    return node_id, mine[local]


def train_loop_per_worker(config: dict) -> dict:
    cfg = TrainConfig.model_validate(config["train"])
    hf_logging.disable_progress_bar()  # no "Loading weights" bars in the job log
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    channel = ProgressChannel(config.get("progress_actor"), config.get("namespace"),
                              cfg.job_id, cfg.attempt, polls=rank == 0)
    if cfg.gpu_indices_by_node:  # a multi-node gang: this worker's own GPU on its own node
        node_id, gpu = gang_gpu(cfg, rank, ctx.get_world_size())
        cfg = cfg.model_copy(update={"gpu_indices": [gpu]})
        channel.push({"type": "log", "line": f"[shoal trainer] worker {rank}/{ctx.get_world_size()} on node "
                      f"{node_id}: GPU {gpu} ({pick_device(cfg.gpu_indices, ctx.get_local_rank())})"})
    hooks = Hooks(progress=channel.push, should_stop=channel.should_stop,
                  save_checkpoint=_report(rank), rank=rank,
                  world_size=ctx.get_world_size(), local_rank=ctx.get_local_rank())
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return train(cfg, hooks)
    with checkpoint.as_directory() as resume_dir:  # alive for the whole run
        hooks.resume_dir = resume_dir
        return train(cfg, hooks)
