"""The executor carries the policy's decisions out. The service calls it; it never blocks on
training. `RayExecutor` (scheduler/ray_executor.py) runs jobs as Ray Train workers;
`InMemoryExecutor` here runs them on a clock, for the service tests and the simulator.

Contract, for every implementation:
  - `launch` is idempotent per (job_id, attempt): launching the same attempt twice adopts the
    existing run instead of starting a second one.
  - `poll` returns each finished attempt's Outcome exactly once.
  - `request_stop` asks a run to checkpoint and exit (Outcome status "preempted");
    `kill` ends it at once (Outcome status "killed").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

from scheduler.clock import Clock

OutcomeStatus = Literal["succeeded", "failed", "preempted", "killed"]


@dataclass(frozen=True)
class LaunchRequest:
    job_id: int
    attempt: int
    spec: dict  # JobSpec.model_dump(mode="json"), paths absolute
    node_id: str
    gpu_indices: tuple[int, ...]
    memory_per_gpu_mib: int
    job_dir: str  # per-job folder: checkpoints (Ray storage), logs
    output_dir: str  # where the final adapter / model goes
    price_per_gpu_hour: float | None = None  # USD, from the placed GPU model; for the model card
    # A gang spanning nodes: every (node_id, gpu_indices), the first equal to node_id/gpu_indices.
    # () = one node (node_id, gpu_indices), so single-node callers need not set it.
    parts: tuple[tuple[str, tuple[int, ...]], ...] = ()
    storage_root: str | None = None  # a user-chosen output_dir must lie under it (the trainer checks)

    def all_parts(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        return self.parts or ((self.node_id, tuple(self.gpu_indices)),)

    @property
    def gpus(self) -> int:
        """GPUs of the whole gang, on every node (= Ray Train workers)."""
        return sum(len(ix) for _, ix in self.all_parts())


@dataclass(frozen=True)
class Outcome:
    job_id: int
    attempt: int
    status: OutcomeStatus
    metrics: dict = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class ProgressEvent:
    job_id: int
    attempt: int
    event: dict  # {"type": "step"|"eval"|"checkpoint"|"log", ...} as the trainer sends it


class Executor(Protocol):
    def launch(self, req: LaunchRequest) -> None: ...

    def request_stop(self, job_id: int, attempt: int) -> None: ...

    def kill(self, job_id: int, attempt: int) -> None: ...

    def is_active(self, job_id: int, attempt: int) -> bool: ...

    def poll(self) -> list[Outcome]: ...

    def drain_progress(self) -> list[ProgressEvent]: ...

    def close(self) -> None: ...


@dataclass
class _FakeRun:
    req: LaunchRequest
    started: float
    duration: float
    stop_requested: bool = False
    steps_reported: int = 0


class InMemoryExecutor:
    """Jobs 'run' for `duration_s(spec)` seconds of the injected clock, report one step event per
    elapsed second, and finish. `fail_next` makes the next finishing attempt of a job fail."""

    def __init__(self, clock: Clock, duration_s=lambda spec: 10.0):
        self.clock = clock
        self.duration_s = duration_s
        self.runs: dict[tuple[int, int], _FakeRun] = {}
        self.launches: list[tuple[int, int]] = []  # every launch call that started a run
        self.fail_next: dict[int, str] = {}
        self._done: list[Outcome] = []
        self._progress: list[ProgressEvent] = []

    def launch(self, req: LaunchRequest) -> None:
        key = (req.job_id, req.attempt)
        if key in self.runs:
            return  # idempotent: adopt
        self.runs[key] = _FakeRun(req, self.clock.now(), float(self.duration_s(req.spec)))
        self.launches.append(key)

    def request_stop(self, job_id: int, attempt: int) -> None:
        if (run := self.runs.get((job_id, attempt))) is not None:
            run.stop_requested = True

    def kill(self, job_id: int, attempt: int) -> None:
        if self.runs.pop((job_id, attempt), None) is not None:
            self._done.append(Outcome(job_id, attempt, "killed"))

    def fail(self, job_id: int, attempt: int, error: str) -> None:
        """The run dies now with `error` (e.g. its node went away under it)."""
        if self.runs.pop((job_id, attempt), None) is not None:
            self._done.append(Outcome(job_id, attempt, "failed", error=error))

    def is_active(self, job_id: int, attempt: int) -> bool:
        return (job_id, attempt) in self.runs

    def active(self) -> set[tuple[int, int]]:
        return set(self.runs)

    def poll(self) -> list[Outcome]:
        now = self.clock.now()
        for key, run in list(self.runs.items()):
            elapsed = now - run.started
            while run.steps_reported < min(int(elapsed), int(run.duration)):
                run.steps_reported += 1
                self._progress.append(ProgressEvent(*key, {"type": "step", "step": run.steps_reported,
                                                           "total_steps": int(run.duration), "loss": 1.0}))
            if run.stop_requested:
                del self.runs[key]
                self._done.append(Outcome(*key, "preempted", {"step": run.steps_reported}))
            elif elapsed >= run.duration:
                del self.runs[key]
                if (err := self.fail_next.pop(key[0], None)) is not None:
                    self._done.append(Outcome(*key, "failed", error=err))
                else:
                    self._done.append(Outcome(*key, "succeeded", {"train_loss": 0.5, "eval_loss": 0.6}))
        done, self._done = self._done, []
        return done

    def drain_progress(self) -> list[ProgressEvent]:
        out, self._progress = self._progress, []
        return out

    def close(self) -> None:
        self.runs.clear()
