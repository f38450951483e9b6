"""GpuReader: live per-GPU readings. `NvmlReader` reads real GPUs through nvidia-ml-py;
`FakeGpuReader` presents GPUs of chosen models whose memory, utilization, processes and faults a
test, the demo or the simulator sets (in code or from a scenario, see `monitoring.scenario`).
Everything above the reader (packing, quotas, metrics) runs the same on both.

Units: memory in MiB, utilization in percent (0..100) as NVML reports it, power in W, energy in
mJ since the driver loaded (NVML's and DCGM's unit), temperature in °C, clocks in MHz."""
from __future__ import annotations

import threading
import time
import uuid as uuidlib
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol

from scheduler.copying import with_fields


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_memory_mib: int | None  # NVML may not know (None), e.g. without permissions
    name: str = ""
    job_id: int | None = None  # the Shoal job owning it, when known; None = foreign
    sm_util_pct: float | None = None  # per-process SM utilization over the last sample window


@dataclass(frozen=True)
class MigDevice:
    """One MIG instance of a GPU in MIG mode (labels GPU_I_ID / GPU_I_PROFILE in DCGM's series)."""

    gpu_instance_id: int
    compute_instance_id: int
    uuid: str
    profile: str  # e.g. "1g.10gb"
    memory_total_mib: int
    memory_used_mib: int


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
    xid_errors: int = 0  # count of XID events seen since the reader started
    healthy: bool = True
    last_xid: int = 0  # code of the most recent XID event (DCGM_FI_DEV_XID_ERRORS), 0 = none
    energy_mj: float | None = None  # total energy since the driver loaded, mJ
    sm_clock_mhz: float | None = None
    mem_clock_mhz: float | None = None
    memory_temperature_c: float | None = None
    ecc_sbe_volatile: int | None = None  # corrected (single-bit) ECC errors since the last reset
    ecc_dbe_volatile: int | None = None  # uncorrected (double-bit) ECC errors since the last reset
    remapped_rows_correctable: int | None = None
    remapped_rows_uncorrectable: int | None = None
    row_remap_pending: bool | None = None
    row_remap_failure: bool | None = None
    mig_devices: tuple[MigDevice, ...] = ()  # non-empty only when MIG mode is enabled

    @property
    def memory_free_mib(self) -> int:
        return max(self.memory_total_mib - self.memory_used_mib, 0)


class GpuReader(Protocol):
    def read(self) -> list[GpuReading]: ...

    def close(self) -> None: ...


class NvmlUnavailable(RuntimeError):
    """No usable NVIDIA driver/NVML on this machine (typed so agents can report, not crash)."""


# ---------------------------------------------------------------------------------------------

# XIDs that mean the GPU needs attention (driver docs: 48 DBE, 63/64 row remap, 74 NVLink,
# 79 fell off the bus, 92/94/95 ECC, 119/120 GSP). Others (e.g. 13, 31, 43: an application's
# own fault) are counted but do not mark the GPU unhealthy.
CRITICAL_XIDS = frozenset({48, 61, 62, 63, 64, 68, 69, 74, 79, 92, 94, 95, 119, 120})


class NvmlReader:
    """Real GPUs via NVML. nvmlInit is process-wide and costly, so it runs once per process
    (reference counted across readers); a sample then costs ~0.1 ms per GPU. XID events arrive
    through an NVML event set that `read()` drains without waiting; per-process SM utilization
    uses nvmlDeviceGetProcessUtilization with the last sample's timestamp remembered per GPU."""

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
        self._last_seen_ts: dict[str, int] = {}  # uuid -> newest process-utilization sample (µs)
        self._xid_count: dict[str, int] = {}
        self._last_xid: dict[str, int] = {}
        self._critical: set[str] = set()
        self._events = None
        self._register_xid_events()

    def _register_xid_events(self) -> None:
        n = self._nvml
        try:
            self._events = n.nvmlEventSetCreate()
        except n.NVMLError:
            return  # not supported (e.g. some vGPU setups): XIDs stay at 0
        for i in range(n.nvmlDeviceGetCount()):
            try:
                h = n.nvmlDeviceGetHandleByIndex(i)
                n.nvmlDeviceRegisterEvents(h, n.nvmlEventTypeXidCriticalError, self._events)
            except n.NVMLError:
                continue  # this GPU does not support XID events

    def close(self) -> None:
        with NvmlReader._lock:
            if self._closed:
                return
            self._closed = True
            if self._events is not None:
                self._opt(self._nvml.nvmlEventSetFree, self._events)
            NvmlReader._refs -= 1
            if NvmlReader._refs == 0:
                self._nvml.nvmlShutdown()

    def _opt(self, fn, *args):  # optional fields: not every GPU/driver supports every query
        try:
            return fn(*args)
        except self._nvml.NVMLError:
            return None

    def _drain_xids(self) -> None:
        n = self._nvml
        if self._events is None:
            return
        while True:
            try:
                ev = n.nvmlEventSetWait_v2(self._events, 0)
            except n.NVMLError:  # NVML_ERROR_TIMEOUT: no event pending
                return
            uuid = _text(self._opt(n.nvmlDeviceGetUUID, ev.device) or "unknown")
            self._xid_count[uuid] = self._xid_count.get(uuid, 0) + 1
            self._last_xid[uuid] = int(ev.eventData)
            if int(ev.eventData) in CRITICAL_XIDS:
                self._critical.add(uuid)

    def _process_util(self, h, uuid: str) -> dict[int, float]:
        samples = self._opt(self._nvml.nvmlDeviceGetProcessUtilization, h, self._last_seen_ts.get(uuid, 0))
        if not samples:  # NVML_ERROR_NOT_FOUND: no sample since lastSeenTs
            return {}
        self._last_seen_ts[uuid] = max(s.timeStamp for s in samples)
        return {s.pid: float(s.smUtil) for s in samples}

    def _mig(self, h) -> tuple[MigDevice, ...]:
        n = self._nvml
        mode = self._opt(n.nvmlDeviceGetMigMode, h)
        if not mode or mode[0] != n.NVML_DEVICE_MIG_ENABLE:
            return ()
        out = []
        for i in range(self._opt(n.nvmlDeviceGetMaxMigDeviceCount, h) or 0):
            mh = self._opt(n.nvmlDeviceGetMigDeviceHandleByIndex, h, i)
            if mh is None:
                continue  # empty slot
            mem = n.nvmlDeviceGetMemoryInfo(mh)
            name = _text(self._opt(n.nvmlDeviceGetName, mh) or "")
            out.append(MigDevice(
                gpu_instance_id=self._opt(n.nvmlDeviceGetGpuInstanceId, mh) or 0,
                compute_instance_id=self._opt(n.nvmlDeviceGetComputeInstanceId, mh) or 0,
                uuid=_text(n.nvmlDeviceGetUUID(mh)),
                profile=name.split("MIG ")[-1] if "MIG " in name else name,
                memory_total_mib=mem.total // 2**20, memory_used_mib=mem.used // 2**20,
            ))
        return tuple(out)

    def read(self) -> list[GpuReading]:
        n = self._nvml
        self._drain_xids()
        out = []
        for i in range(n.nvmlDeviceGetCount()):
            h = n.nvmlDeviceGetHandleByIndex(i)
            uuid = _text(n.nvmlDeviceGetUUID(h))
            mem = n.nvmlDeviceGetMemoryInfo(h)
            util = self._opt(n.nvmlDeviceGetUtilizationRates, h)
            procs = self._opt(n.nvmlDeviceGetComputeRunningProcesses, h) or []
            sm = self._process_util(h, uuid)
            temp = self._opt(n.nvmlDeviceGetTemperature, h, n.NVML_TEMPERATURE_GPU)
            power = self._opt(n.nvmlDeviceGetPowerUsage, h)
            energy = self._opt(n.nvmlDeviceGetTotalEnergyConsumption, h)
            sbe = self._opt(n.nvmlDeviceGetTotalEccErrors, h, n.NVML_MEMORY_ERROR_TYPE_CORRECTED, n.NVML_VOLATILE_ECC)
            dbe = self._opt(n.nvmlDeviceGetTotalEccErrors, h, n.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, n.NVML_VOLATILE_ECC)
            remap = self._opt(n.nvmlDeviceGetRemappedRows, h)  # (correctable, uncorrectable, pending, failure)
            sm_clock = self._opt(n.nvmlDeviceGetClockInfo, h, n.NVML_CLOCK_SM)
            mem_clock = self._opt(n.nvmlDeviceGetClockInfo, h, n.NVML_CLOCK_MEM)
            failed_remap = bool(remap and remap[3])
            out.append(GpuReading(
                index=i, uuid=uuid, model=_text(n.nvmlDeviceGetName(h)),
                memory_total_mib=mem.total // 2**20, memory_used_mib=mem.used // 2**20,
                utilization_pct=float(util.gpu) if util else 0.0,
                processes=tuple(
                    GpuProcess(p.pid, None if p.usedGpuMemory is None else p.usedGpuMemory // 2**20,
                               sm_util_pct=sm.get(p.pid))
                    for p in procs
                ),
                temperature_c=None if temp is None else float(temp),
                power_w=None if power is None else power / 1000.0,
                energy_mj=None if energy is None else float(energy),
                sm_clock_mhz=None if sm_clock is None else float(sm_clock),
                mem_clock_mhz=None if mem_clock is None else float(mem_clock),
                ecc_sbe_volatile=sbe, ecc_dbe_volatile=dbe,
                remapped_rows_correctable=remap[0] if remap else None,
                remapped_rows_uncorrectable=remap[1] if remap else None,
                row_remap_pending=bool(remap[2]) if remap else None,
                row_remap_failure=failed_remap if remap else None,
                xid_errors=self._xid_count.get(uuid, 0), last_xid=self._last_xid.get(uuid, 0),
                healthy=uuid not in self._critical and not failed_remap and not dbe,
                mig_devices=self._mig(h),
            ))
        return out


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


# ---------------------------------------------------------------------------------------------

IDLE_POWER_W = 70.0  # a fake GPU's draw at 0 % utilization; it scales linearly to its TDP at 100 %


@dataclass
class _FakeGpu:
    reading: GpuReading
    tdp_w: float
    processes: dict[int, GpuProcess] = field(default_factory=dict)
    base_util: float = 0.0
    present: bool = True
    energy_mj: float = 0.0
    last_t: float | None = None


class FakeGpuReader:
    """N GPUs (of one model, or mixed via `add_gpu`). Memory used = sum of the processes placed
    on a GPU; utilization is the highest set for it (by the scenario, or by `attach_job` while a
    Shoal job runs there); power follows utilization and energy integrates power over the
    injected clock (`clock`, seconds; wall time by default). Thread-safe: the service writes, the
    metrics endpoint reads."""

    def __init__(self, count: int, model: str = "H100 80GB", memory_mib: int = 81559, host: str = "local",
                 *, tdp_w: float = 700.0, clock: Callable[[], float] = time.monotonic):
        self._lock = threading.Lock()
        self._ns = uuidlib.uuid5(uuidlib.NAMESPACE_DNS, f"shoal-fake-{host}")
        self._clock = clock
        self._gpus: list[_FakeGpu] = []
        self._next_pid = 100_000
        for _ in range(count):
            self.add_gpu(model, memory_mib, tdp_w=tdp_w)

    # -- scenario controls --------------------------------------------------------------------
    def add_gpu(self, model: str, memory_mib: int, *, tdp_w: float = 700.0) -> int:
        """Add one GPU (next index); returns its index."""
        with self._lock:
            i = len(self._gpus)
            reading = GpuReading(i, f"GPU-{uuidlib.uuid5(self._ns, str(i))}", model, memory_mib, 0, 0.0,
                                 temperature_c=30.0, power_w=IDLE_POWER_W, energy_mj=0.0,
                                 sm_clock_mhz=1980.0, mem_clock_mhz=2619.0, memory_temperature_c=35.0,
                                 ecc_sbe_volatile=0, ecc_dbe_volatile=0, remapped_rows_correctable=0,
                                 remapped_rows_uncorrectable=0, row_remap_pending=False, row_remap_failure=False)
            self._gpus.append(_FakeGpu(reading, tdp_w))
            return i

    def _gpu(self, index: int) -> _FakeGpu:
        if not 0 <= index < len(self._gpus):
            raise IndexError(f"gpu index {index} out of range: this fake node has {len(self._gpus)} GPU(s)")
        return self._gpus[index]

    def add_process(self, index: int, memory_mib: int, *, name: str = "foreign", job_id: int | None = None,
                    utilization_pct: float = 0.0) -> int:
        """Put a process on GPU `index`; returns its fake pid."""
        with self._lock:
            gpu = self._gpu(index)
            self._accrue(gpu)
            self._next_pid += 1
            gpu.processes[self._next_pid] = GpuProcess(self._next_pid, memory_mib, name, job_id,
                                                       sm_util_pct=float(utilization_pct))
            gpu.base_util = max(gpu.base_util, utilization_pct)
            return self._next_pid

    def remove_process(self, pid: int) -> None:
        with self._lock:
            for gpu in self._gpus:
                if pid in gpu.processes:
                    self._accrue(gpu)
                    del gpu.processes[pid]
                    self._recompute_util(gpu)

    def attach_job(self, job_id: int, indices: tuple[int, ...], memory_mib: int,
                   utilization_pct: float = 90.0) -> list[int]:
        """What a Shoal job looks like to NVML while it runs: a process per GPU."""
        return [self.add_process(i, memory_mib, name=f"shoal-job-{job_id}", job_id=job_id,
                                 utilization_pct=utilization_pct) for i in indices]

    def detach_job(self, job_id: int) -> None:
        with self._lock:
            for gpu in self._gpus:
                pids = [p for p, proc in gpu.processes.items() if proc.job_id == job_id]
                if pids:
                    self._accrue(gpu)
                for pid in pids:
                    del gpu.processes[pid]
                self._recompute_util(gpu)

    def set_utilization(self, index: int, utilization_pct: float, *, job_id: int | None = None) -> None:
        """Set a GPU's utilization (e.g. a job that holds its GPU but idles: 0 %). With `job_id`,
        that job's processes on the GPU report it as their SM utilization too."""
        with self._lock:
            gpu = self._gpu(index)
            self._accrue(gpu)
            gpu.base_util = float(utilization_pct)
            if job_id is not None:
                for pid, p in gpu.processes.items():
                    if p.job_id == job_id:
                        gpu.processes[pid] = replace(p, sm_util_pct=float(utilization_pct))

    def set_temperature(self, index: int, celsius: float) -> None:
        with self._lock:
            g = self._gpu(index)
            g.reading = replace(g.reading, temperature_c=float(celsius))

    def inject_xid(self, index: int, count: int = 1, code: int = 79) -> None:
        """`count` XID events of `code` (default 79: fallen off the bus) on GPU `index`."""
        with self._lock:
            g = self._gpu(index)
            r = g.reading
            g.reading = replace(r, xid_errors=r.xid_errors + count, last_xid=code,
                                healthy=r.healthy and code not in CRITICAL_XIDS)

    def inject_ecc(self, index: int, *, corrected: int = 0, uncorrected: int = 0, remapped_rows: int = 0) -> None:
        """Memory errors: an uncorrected error (or a row remap) marks the GPU unhealthy."""
        with self._lock:
            g = self._gpu(index)
            r = g.reading
            g.reading = replace(
                r, ecc_sbe_volatile=(r.ecc_sbe_volatile or 0) + corrected,
                ecc_dbe_volatile=(r.ecc_dbe_volatile or 0) + uncorrected,
                remapped_rows_uncorrectable=(r.remapped_rows_uncorrectable or 0) + remapped_rows,
                row_remap_pending=bool(remapped_rows) or bool(r.row_remap_pending),
                healthy=r.healthy and not uncorrected and not remapped_rows,
            )

    def remove_gpu(self, index: int) -> None:
        """The GPU falls off the bus: it is no longer listed."""
        with self._lock:
            self._gpu(index).present = False

    # -- GpuReader ----------------------------------------------------------------------------
    def _recompute_util(self, gpu: _FakeGpu) -> None:
        if not gpu.processes:
            gpu.base_util = 0.0

    def _accrue(self, gpu: _FakeGpu) -> None:
        """Energy += power × elapsed time at the utilization that held until now."""
        now = self._clock()
        if gpu.last_t is not None:
            gpu.energy_mj += self._power(gpu) * max(0.0, now - gpu.last_t) * 1000.0
        gpu.last_t = now

    @staticmethod
    def _power(gpu: _FakeGpu) -> float:
        return IDLE_POWER_W + (gpu.tdp_w - IDLE_POWER_W) * gpu.base_util / 100.0

    def read(self) -> list[GpuReading]:
        with self._lock:
            out = []
            for gpu in self._gpus:
                if not gpu.present:
                    continue
                self._accrue(gpu)
                used = sum(p.used_memory_mib or 0 for p in gpu.processes.values())
                out.append(with_fields(  # the simulator reads every changed node each cycle
                    gpu.reading,
                    memory_used_mib=min(used, gpu.reading.memory_total_mib),
                    utilization_pct=gpu.base_util,
                    processes=tuple(gpu.processes.values()),
                    power_w=self._power(gpu),
                    energy_mj=gpu.energy_mj,
                    temperature_c=max(gpu.reading.temperature_c or 30.0, 30.0 + 0.4 * gpu.base_util),
                ))
            return out

    def close(self) -> None:
        pass
