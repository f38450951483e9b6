"""SFT workload model: turns a GPU-count trace job (submit time, run time, GPUs) into a Shoal SFT
job spec (base model, method, batch shape, per-GPU memory need, shareability), drawn from a
configurable mix with a seeded generator, so the same seed gives the same jobs.

For each trace job, the classes whose `gpus` list contains its GPU count (or that list none)
are candidates; one is drawn with probability proportional to its `weight`. The trace's GPU
count and run time are kept; the class decides the model and method and so the memory need:

  memory per GPU (MiB) = (weights_and_states x 1.05 + activations + 1 GiB runtime) / 2^20
    weights_and_states = params x bytes/param: LoRA 2 (bf16 frozen weights), QLoRA 0.5 (4-bit),
                         full 16 / gpus (fp32 master weights, grads, AdamW moments, sharded FSDP)
    activations        = 34 x seq_len x batch x hidden x layers bytes (Korthikanti et al. 2022,
                         eq. 2, no recomputation)
  a simplified form of scheduler/estimate.py's rule as it stood when the simulator's figures were
  measured (estimate.py reads a real model directory and was since calibrated on a GPU: its
  figures are higher, see docs/policy.md; the workload keeps this rule so replays stay comparable;
  here the shapes come from the presets below, taken from each model's published config.json).

The user's run-time estimate: non-oracle policies see `expected_duration_s` = true run time x
exp(N(0, sigma)) (log-normal, median exact), like a Slurm `--time` a person writes; sigma =
`estimate_sigma` (default 0.5: half the jobs are off by more than a factor ~1.4). Oracle
baselines (SJF, SRTF) see the exact run time. sigma 0 gives every policy the truth. Jobs replayed
from a Shoal store keep the estimate their spec gave (none if it gave none), so a replay of your own
history shows the policy what it saw then.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from scheduler.sim.traces import TraceJob

MIB = 2**20


@dataclass(frozen=True)
class ModelShape:
    params: float
    hidden: int
    layers: int


# From each model's config.json (hidden_size, num_hidden_layers) and its parameter count.
PRESETS: dict[str, ModelShape] = {
    "qwen2.5-0.5b": ModelShape(0.494e9, 896, 24),
    "llama-3.2-1b": ModelShape(1.236e9, 2048, 16),
    "qwen2.5-1.5b": ModelShape(1.544e9, 1536, 28),
    "llama-3.2-3b": ModelShape(3.213e9, 3072, 28),
    "mistral-7b": ModelShape(7.242e9, 4096, 32),
    "llama-3-8b": ModelShape(8.030e9, 4096, 32),
    "llama-2-13b": ModelShape(13.016e9, 5120, 40),
    "qwen2.5-32b": ModelShape(32.764e9, 5120, 64),
    "llama-3-70b": ModelShape(70.554e9, 8192, 80),
}

_BYTES_PER_PARAM = {"lora": 2.0, "qlora": 0.5}


def memory_per_gpu_mib(model: str, method: str, gpus: int, batch_size: int, seq_len: int) -> int:
    m = PRESETS[model]
    per_param = 16.0 / gpus if method == "full" else _BYTES_PER_PARAM[method]
    activations = 34 * seq_len * batch_size * m.hidden * m.layers
    return math.ceil((m.params * per_param * 1.05 + activations + 1024 * MIB) / MIB)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class JobClass(_Strict):
    name: str = Field(min_length=1)
    weight: float = Field(gt=0, description="relative frequency among the classes that match a job")
    gpus: list[int] | None = Field(default=None, description="trace GPU counts this class applies to; none = any")
    model: str
    method: Literal["lora", "qlora", "full"] = "lora"
    batch_size: int = Field(default=4, ge=1)
    seq_len: int = Field(default=1024, ge=8)
    shareable: bool = Field(default=False, description="may share a GPU with other shareable jobs")

    @model_validator(mode="after")
    def _known_model(self) -> JobClass:
        if self.model not in PRESETS:
            raise ValueError(f"model {self.model!r} is not a preset (known: {', '.join(PRESETS)})")
        return self


def _default_classes() -> list[JobClass]:
    return [
        JobClass(name="small-lora", weight=0.35, gpus=[1], model="qwen2.5-0.5b", method="lora", shareable=True),
        JobClass(name="1b-lora", weight=0.15, gpus=[1], model="llama-3.2-1b", method="lora", shareable=True),
        JobClass(name="8b-lora", weight=0.35, gpus=[1, 2], model="llama-3-8b", method="lora", batch_size=2),
        JobClass(name="8b-qlora", weight=0.15, gpus=[1], model="llama-3-8b", method="qlora", batch_size=2),
        JobClass(name="3b-full", weight=0.5, gpus=[2, 4], model="llama-3.2-3b", method="full", batch_size=2),
        JobClass(name="8b-full", weight=0.6, gpus=[4, 8], model="llama-3-8b", method="full", batch_size=1),
        JobClass(name="70b-qlora", weight=0.4, gpus=[8], model="llama-3-70b", method="qlora", batch_size=1,
                 seq_len=512),
        JobClass(name="32b-full", weight=1.0, gpus=[12, 16, 24, 32, 64, 128], model="qwen2.5-32b",
                 method="full", batch_size=1, seq_len=512),
    ]


class WorkloadConfig(_Strict):
    classes: list[JobClass] = Field(default_factory=_default_classes)
    estimate_sigma: float = Field(default=0.5, ge=0, le=5, description="log-normal noise of users' run-time estimates")
    checkpoint_every_s: float = Field(default=1800.0, gt=0, description="jobs checkpoint this often")
    cpus_per_gpu: int = Field(default=1, ge=1, le=64)


@dataclass(frozen=True)
class SimJob:
    """One trace job made into a Shoal job: what goes into the store, and the truth the simulated
    executor runs by."""

    index: int  # position in the trace (submit order)
    submit_s: float
    team: str
    user: str
    gpus: int
    memory_per_gpu_mib: int
    duration_s: float  # true run time on exclusive GPUs
    estimate_s: float | None  # what a user would write (None: no estimate, as in a history job without one)
    shareable: bool
    job_class: str
    priority: int
    spec: dict  # the job spec (without the per-policy expected_duration_s)

    def spec_for(self, oracle: bool) -> dict:
        """The spec a policy's run stores: oracles get the true run time as the estimate."""
        res = {**self.spec["resources"], "expected_duration_s": self.duration_s if oracle else self.estimate_s}
        return {**self.spec, "resources": res}


class WorkloadError(ValueError):
    pass


def make_jobs(trace: list[TraceJob], cfg: WorkloadConfig, team_of, seed: int) -> list[SimJob]:
    """`team_of(trace_job) -> team`. Deterministic in (trace, cfg, seed)."""
    rng = random.Random(seed)
    by_gpus: dict[int, tuple[list[JobClass], list[float]]] = {}
    out = []
    for i, tj in enumerate(trace):
        cands = by_gpus.get(tj.gpus)
        if cands is None:
            matching = [c for c in cfg.classes if c.gpus is None or tj.gpus in c.gpus]
            cands = by_gpus[tj.gpus] = (matching, [c.weight for c in matching])
        u1, u2, z = rng.random(), rng.random(), rng.gauss(0.0, 1.0)  # always 3 draws: stable streams
        if tj.memory_per_gpu_mib is not None:  # a real job (store history): keep what it was
            cls_name, mem, shareable, model, method = "history", tj.memory_per_gpu_mib, bool(tj.shareable), None, None
        else:
            if not cands[0]:
                raise WorkloadError(f"workload: no job class covers {tj.gpus}-GPU jobs (trace line {tj.line}); "
                                    "add one (gpus: [..]) or a class without `gpus`")
            cls = _pick(cands, u1)
            cls_name, model, method, shareable = cls.name, cls.model, cls.method, cls.shareable
            mem = memory_per_gpu_mib(cls.model, cls.method, tj.gpus, cls.batch_size, cls.seq_len)
        del u2
        if tj.history:  # a real job (store history): the policy sees the estimate it saw then
            estimate = tj.estimate_s
        else:
            estimate = tj.duration_s * (math.exp(cfg.estimate_sigma * z) if cfg.estimate_sigma else 1.0)
        team = team_of(tj)
        spec = {
            "api_version": "shoal/v1", "name": tj.name or f"sim-{i}", "team": team, "user": tj.user,
            "priority": tj.priority, "model": model or "history", "method": method or "lora",
            "dataset": {"train": "sim"},
            "resources": {"gpus": tj.gpus, "cpus_per_gpu": cfg.cpus_per_gpu, "shareable": shareable},
            "checkpoint_every_steps": 1, "max_retries": 0,
            "sim": {"duration_s": tj.duration_s, "checkpoint_every_s": cfg.checkpoint_every_s, "class": cls_name,
                    "trace_line": tj.line},
        }
        out.append(SimJob(i, tj.submit_s, team, tj.user, tj.gpus, mem, tj.duration_s, estimate, shareable,
                          cls_name, tj.priority, spec))
    return out


def _pick(cands: tuple[list[JobClass], list[float]], u: float) -> JobClass:
    classes, weights = cands
    x = u * sum(weights)
    for c, w in zip(classes, weights):
        x -= w
        if x < 0:
            return c
    return classes[-1]
