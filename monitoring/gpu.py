"""GpuReader: live per-GPU readings. `NvmlReader` reads real GPUs through nvidia-ml-py;
`FakeGpuReader` presents GPUs of a chosen model whose memory, utilization, processes and faults a
test, the demo or the simulator sets. Everything above the reader (packing, quotas, metrics) runs
the same on both. Memory in MiB, utilization in percent (0..100) as NVML reports it."""
from __future__ import annotations

import threading
import uuid as uuidlib
from dataclasses import dataclass, field, replace
from typing import Protocol


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_memory_mib: int | None  # NVML may not know (None), e.g. without permissions
    name: str = ""
    job_id: int | None = None  # the Shoal job owning it, when known; None = foreign


@dataclass(frozen=True)
class GpuReading:
    index: int
    uuid: str
    model: str
    memory_total_mib: int
    memory_used_mib: int
    utilization_pct: float
    processes: tuple[GpuProcess, ...] = ()
    temperature_c: float | None = None
    power_w: float | None = None
    xid_errors: int = 0  # count of XID events seen
    healthy: bool = True

    @property
    def memory_free_mib(self) -> int:
        return max(self.memory_total_mib - self.memory_used_mib, 0)


class GpuReader(Protocol):
    def read(self) -> list[GpuReading]: ...

    def close(self) -> None: ...


class NvmlUnavailable(RuntimeError):
    """No usable NVIDIA driver/NVML on this machine (typed so agents can report, not crash)."""


# ---------------------------------------------------------------------------------------------


class NvmlReader:
    """Real GPUs via NVML. nvmlInit is process-wide and costly, so it runs once per process
    (reference counted across readers); a sample then costs ~0.1 ms per GPU."""

    _lock = threading.Lock()
    _refs = 0

    def __init__(self) -> None:
        try:
            import pynvml
        except ImportError as e:  # pragma: no cover - nvidia-ml-py is a dependency
            raise NvmlUnavailable("nvidia-ml-py is not installed") from e
        self._nvml = pynvml
        with NvmlReader._lock:
            if NvmlReader._refs == 0:
                try:
                    pynvml.nvmlInit()
                except pynvml.NVMLError as e:
                    raise NvmlUnavailable(
                        f"NVML unavailable ({e}); is an NVIDIA driver installed? "
                        "Use the fake reader (local.reader: fake) on machines without GPUs"
                    ) from None
            NvmlReader._refs += 1
        self._closed = False

    def close(self) -> None:
        with NvmlReader._lock:
            if self._closed:
                return
            self._closed = True
            NvmlReader._refs -= 1
            if NvmlReader._refs == 0:
                self._nvml.nvmlShutdown()

    def _opt(self, fn, *args):  # optional fields: not every GPU/driver supports every query
        try:
            return fn(*args)
        except self._nvml.NVMLError:
            return None

    def read(self) -> list[GpuReading]:
        n = self._nvml
        out = []
        for i in range(n.nvmlDeviceGetCount()):
            h = n.nvmlDeviceGetHandleByIndex(i)
            mem = n.nvmlDeviceGetMemoryInfo(h)
            util = self._opt(n.nvmlDeviceGetUtilizationRates, h)
            procs = self._opt(n.nvmlDeviceGetComputeRunningProcesses, h) or []
            temp = self._opt(n.nvmlDeviceGetTemperature, h, n.NVML_TEMPERATURE_GPU)
            power = self._opt(n.nvmlDeviceGetPowerUsage, h)
            name = n.nvmlDeviceGetName(h)
            out.append(GpuReading(
                index=i,
                uuid=n.nvmlDeviceGetUUID(h),
                model=name.decode() if isinstance(name, bytes) else name,
                memory_total_mib=mem.total // 2**20,
                memory_used_mib=mem.used // 2**20,
                utilization_pct=float(util.gpu) if util else 0.0,
                processes=tuple(
                    GpuProcess(p.pid, None if p.usedGpuMemory is None else p.usedGpuMemory // 2**20)
                    for p in procs
                ),
                temperature_c=None if temp is None else float(temp),
                power_w=None if power is None else power / 1000.0,
            ))
        return out


# ---------------------------------------------------------------------------------------------


@dataclass
class _FakeGpu:
    reading: GpuReading
    processes: dict[int, GpuProcess] = field(default_factory=dict)
    base_util: float = 0.0
    present: bool = True


class FakeGpuReader:
    """N GPUs of one model. Memory used = sum of the processes placed on a GPU; utilization is
    the highest set for it (by the scenario, or by `attach_job` while a Shoal job runs there).
    Thread-safe: the service writes, the metrics endpoint reads."""

    def __init__(self, count: int, model: str = "H100 80GB", memory_mib: int = 81559, host: str = "local"):
        self._lock = threading.Lock()
        ns = uuidlib.uuid5(uuidlib.NAMESPACE_DNS, f"shoal-fake-{host}")
        self._gpus = [
            _FakeGpu(GpuReading(i, f"GPU-{uuidlib.uuid5(ns, str(i))}", model, memory_mib, 0, 0.0))
            for i in range(count)
        ]
        self._next_pid = 100_000

    # -- scenario controls --------------------------------------------------------------------
    def add_process(self, index: int, memory_mib: int, *, name: str = "foreign", job_id: int | None = None,
                    utilization_pct: float = 0.0) -> int:
        """Put a process on GPU `index`; returns its fake pid."""
        with self._lock:
            gpu = self._gpus[index]
            self._next_pid += 1
            gpu.processes[self._next_pid] = GpuProcess(self._next_pid, memory_mib, name, job_id)
            gpu.base_util = max(gpu.base_util, utilization_pct)
            return self._next_pid

    def remove_process(self, pid: int) -> None:
        with self._lock:
            for gpu in self._gpus:
                gpu.processes.pop(pid, None)
                if not gpu.processes:
                    gpu.base_util = 0.0

    def attach_job(self, job_id: int, indices: tuple[int, ...], memory_mib: int,
                   utilization_pct: float = 90.0) -> list[int]:
        """What a Shoal job looks like to NVML while it runs: a process per GPU."""
        return [self.add_process(i, memory_mib, name=f"shoal-job-{job_id}", job_id=job_id,
                                 utilization_pct=utilization_pct) for i in indices]

    def detach_job(self, job_id: int) -> None:
        with self._lock:
            for gpu in self._gpus:
                for pid in [p for p, proc in gpu.processes.items() if proc.job_id == job_id]:
                    del gpu.processes[pid]
                if not gpu.processes:
                    gpu.base_util = 0.0

    def inject_xid(self, index: int, count: int = 1) -> None:
        with self._lock:
            r = self._gpus[index].reading
            self._gpus[index].reading = replace(r, xid_errors=r.xid_errors + count, healthy=False)

    def remove_gpu(self, index: int) -> None:
        """The GPU falls off the bus: it is no longer listed."""
        with self._lock:
            self._gpus[index].present = False

    # -- GpuReader ----------------------------------------------------------------------------
    def read(self) -> list[GpuReading]:
        with self._lock:
            out = []
            for gpu in self._gpus:
                if not gpu.present:
                    continue
                used = sum(p.used_memory_mib or 0 for p in gpu.processes.values())
                out.append(replace(
                    gpu.reading,
                    memory_used_mib=min(used, gpu.reading.memory_total_mib),
                    utilization_pct=gpu.base_util,
                    processes=tuple(gpu.processes.values()),
                ))
            return out

    def close(self) -> None:
        pass
