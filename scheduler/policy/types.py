"""Plain, frozen data in and out of the policy. Memory in MiB; utilization as a 0..1 ratio."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class GpuView:
    index: int  # device index on its node (what CUDA_VISIBLE_DEVICES names)
    model: str  # flavor, e.g. "H100 80GB"
    memory_total_mib: int
    memory_used_mib: int  # LIVE reading (NVML): includes processes Shoal does not own
    utilization: float = 0.0  # LIVE SM utilization, 0..1
    healthy: bool = True  # no XID/ECC fault, still present
    reserved_mib: int = 0  # what Shoal's running jobs are estimated to hold here
    allocated_to: tuple[int, ...] = ()  # Shoal jobs placed on this GPU

    def free_mib(self, headroom_mib: int) -> int:
        """Total minus the larger of Shoal's reservation and the live reading, minus headroom:
        memory taken by foreign processes is respected even though Shoal never reserved it."""
        return self.memory_total_mib - max(self.reserved_mib, self.memory_used_mib) - headroom_mib


@dataclass(frozen=True)
class NodeView:
    node_id: str
    name: str
    gpus: tuple[GpuView, ...]
    schedulable: bool = True  # alive and not drained
    cpus: int | None = None  # CPUs the node offers to jobs; None = not limited
    cpus_held: int = 0  # CPUs Shoal's active jobs hold there

    def cpus_free(self) -> float:
        return float("inf") if self.cpus is None else self.cpus - self.cpus_held


@dataclass(frozen=True)
class JobRequest:
    job_id: int
    team: str
    priority: int
    submitted_at: float
    gpus: int
    memory_per_gpu_mib: int
    gpu_model: str | None = None  # required flavor, or any
    cpus_per_gpu: int = 1  # each GPU's worker holds this many CPUs on the same node

    @property
    def cpus(self) -> int:
        return self.gpus * self.cpus_per_gpu


@dataclass(frozen=True)
class RunningJob:
    job_id: int
    team: str
    priority: int
    node_id: str
    gpu_indices: tuple[int, ...]
    memory_per_gpu_mib: int
    cpus: int = 0


@dataclass(frozen=True)
class TeamQuota:
    team: str
    nominal_gpus: int


@dataclass(frozen=True)
class Snapshot:
    nodes: tuple[NodeView, ...]
    running: tuple[RunningJob, ...]
    pending: tuple[JobRequest, ...]
    quotas: tuple[TeamQuota, ...]
    memory_headroom_mib: int = 1024


@dataclass(frozen=True)
class Placement:
    node_id: str
    gpu_indices: tuple[int, ...]


@dataclass(frozen=True)
class Start:
    job_id: int
    placement: Placement


@dataclass(frozen=True)
class Preempt:
    job_id: int
    reason: str


@dataclass(frozen=True)
class Decision:
    to_start: tuple[Start, ...] = ()
    to_preempt: tuple[Preempt, ...] = ()
    pending: dict[int, str] = field(default_factory=dict)  # job id -> why it waits
