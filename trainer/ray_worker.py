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
from trainer.loop import Hooks, train

STOP_POLL_INTERVAL_S = 0.5  # ask the actor at most this often
STOP_TIMEOUT_S = 5.0  # an unanswered should_stop counts as "no"


class ProgressChannel:
    """Events to, and stop requests from, the scheduler's progress actor (if any)."""

    def __init__(self, actor_name: str | None, namespace: str | None, job_id: int, attempt: int):
        self.actor_name, self.namespace = actor_name, namespace
        self.job_id, self.attempt = job_id, attempt
        self._actor = None
        self._last_poll = -float("inf")  # time.monotonic() of the last should_stop call
        self._stop = False

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
            except Exception as e:
                print(f"[shoal trainer] progress push failed: {e}")
                self._actor = None

    def should_stop(self) -> bool:
        now = time.monotonic()
        if self._stop or now - self._last_poll < STOP_POLL_INTERVAL_S:
            return self._stop
        self._last_poll = now
        actor = self._get_actor()
        if actor is None:
            return False
        try:
            self._stop = bool(ray.get(actor.should_stop.remote(self.job_id, self.attempt),
                                      timeout=STOP_TIMEOUT_S))
        except Exception:
            self._stop = False
        return self._stop


def _report(rank: int):
    """save_checkpoint hook: every rank reports; only rank 0 attaches the checkpoint."""
    def save(path: str | None, metrics: dict) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(path) if rank == 0 and path else None
        ray.train.report(metrics, checkpoint=checkpoint)
    return save


def train_loop_per_worker(config: dict) -> dict:
    cfg = TrainConfig.model_validate(config["train"])
    hf_logging.disable_progress_bar()  # no "Loading weights" bars in the job log
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    channel = ProgressChannel(config.get("progress_actor"), config.get("namespace"),
                              cfg.job_id, cfg.attempt)
    hooks = Hooks(progress=channel.push, should_stop=channel.should_stop,
                  save_checkpoint=_report(rank), rank=rank,
                  world_size=ctx.get_world_size(), local_rank=ctx.get_local_rank())
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return train(cfg, hooks)
    with checkpoint.as_directory() as resume_dir:  # alive for the whole run
        hooks.resume_dir = resume_dir
        return train(cfg, hooks)
