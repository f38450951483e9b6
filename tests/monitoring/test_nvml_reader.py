"""NvmlReader's full path without a GPU: the real nvidia-ml-py module with its C calls replaced by
a small in-memory NVML (two GPUs, one in MIG mode, processes, an XID event). Checks what the reader
asks NVML for and how it maps the answers (units, lastSeenTs, XID draining, MIG instances). The
no-driver path is tested for real in test_telemetry.py."""
import sys
import types
from types import SimpleNamespace as NS

import pynvml as real
import pytest

from monitoring.gpu import NvmlReader

MiB = 2**20


class FakeNvml:
    def __init__(self):
        self.inited = 0
        self.events: list = []
        self.util_calls: list = []
        self.gpus = [
            NS(uuid="GPU-aaa", name="NVIDIA H100 80GB HBM3", total=81559 * MiB, used=30000 * MiB, util=87,
               procs=[NS(pid=11, usedGpuMemory=29000 * MiB), NS(pid=12, usedGpuMemory=None)], mig=False,
               remap=(0, 0, 0, 0), dbe=0),
            NS(uuid="GPU-bbb", name="NVIDIA A100-SXM4-80GB", total=81920 * MiB, used=1000 * MiB, util=0,
               procs=[], mig=True, remap=(2, 1, 1, 0), dbe=0),
        ]
        self.mig = {1: [NS(uuid="MIG-m0", name="NVIDIA A100-SXM4-80GB MIG 3g.40gb", total=40192 * MiB,
                           used=500 * MiB, gi=1, ci=0), None]}

    def module(self) -> types.ModuleType:
        m = types.ModuleType("pynvml")
        for k in dir(real):  # constants and the error classes are the real ones
            if k.startswith(("NVML", "nvmlEventType")):
                setattr(m, k, getattr(real, k))
        g = self.gpus
        err = real.NVMLError_NotSupported

        def h(i):
            return ("gpu", i)

        def dev(handle):
            return g[handle[1]] if handle[0] == "gpu" else self.mig[handle[1]][handle[2]]

        def process_util(handle, last_seen):
            self.util_calls.append((handle[1], last_seen))
            if handle[1] != 0:
                raise real.NVMLError_NotFound()
            return [NS(pid=11, smUtil=71, memUtil=40, timeStamp=last_seen + 1000)]

        def wait(evset, timeout_ms):
            assert timeout_ms == 0  # the reader must never block
            if not self.events:
                raise real.NVMLError_Timeout()
            return self.events.pop(0)

        def mig_handle(handle, i):
            if self.mig[handle[1]][i] is None:
                raise real.NVMLError_NotFound()
            return ("mig", handle[1], i)

        def unsupported(*_):
            raise err()

        m.nvmlInit = lambda: setattr(self, "inited", self.inited + 1)
        m.nvmlShutdown = lambda: setattr(self, "inited", self.inited - 1)
        m.nvmlDeviceGetCount = lambda: len(g)
        m.nvmlDeviceGetHandleByIndex = h
        m.nvmlDeviceGetUUID = lambda d: dev(d).uuid
        m.nvmlDeviceGetName = lambda d: dev(d).name
        m.nvmlDeviceGetMemoryInfo = lambda d: NS(total=dev(d).total, used=dev(d).used, free=dev(d).total - dev(d).used)
        m.nvmlDeviceGetUtilizationRates = lambda d: NS(gpu=dev(d).util, memory=10)
        m.nvmlDeviceGetComputeRunningProcesses = lambda d: dev(d).procs
        m.nvmlDeviceGetProcessUtilization = process_util
        m.nvmlDeviceGetTemperature = lambda d, s: 61
        m.nvmlDeviceGetPowerUsage = lambda d: 412_345  # mW
        m.nvmlDeviceGetTotalEnergyConsumption = lambda d: 9_876_543  # mJ
        m.nvmlDeviceGetTotalEccErrors = lambda d, kind, counter: dev(d).dbe if kind == real.NVML_MEMORY_ERROR_TYPE_UNCORRECTED else 5
        m.nvmlDeviceGetRemappedRows = lambda d: dev(d).remap
        m.nvmlDeviceGetClockInfo = lambda d, c: 1980 if c == real.NVML_CLOCK_SM else 2619
        m.nvmlEventSetCreate = lambda: "evset"
        m.nvmlDeviceRegisterEvents = lambda d, types_, s: None if d[1] == 0 else unsupported()
        m.nvmlEventSetWait_v2 = wait
        m.nvmlEventSetFree = lambda s: None
        m.nvmlDeviceGetMigMode = lambda d: (real.NVML_DEVICE_MIG_ENABLE if dev(d).mig else 0, 0)
        m.nvmlDeviceGetMaxMigDeviceCount = lambda d: len(self.mig.get(d[1], []))
        m.nvmlDeviceGetMigDeviceHandleByIndex = mig_handle
        m.nvmlDeviceGetGpuInstanceId = lambda d: dev(d).gi
        m.nvmlDeviceGetComputeInstanceId = lambda d: dev(d).ci
        return m


@pytest.fixture
def nvml(monkeypatch):
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake.module())
    monkeypatch.setattr(NvmlReader, "_refs", 0)
    return fake


def test_full_reading_units_processes_and_health(nvml):
    r = NvmlReader()
    a, b = r.read()
    assert (a.index, a.uuid, a.model) == (0, "GPU-aaa", "NVIDIA H100 80GB HBM3")
    assert (a.memory_total_mib, a.memory_used_mib, a.utilization_pct) == (81559, 30000, 87.0)
    assert a.power_w == pytest.approx(412.345) and a.energy_mj == 9_876_543 and a.temperature_c == 61
    assert (a.sm_clock_mhz, a.mem_clock_mhz, a.ecc_sbe_volatile, a.ecc_dbe_volatile) == (1980, 2619, 5, 0)
    assert [(p.pid, p.used_memory_mib, p.sm_util_pct) for p in a.processes] == [(11, 29000, 71.0), (12, None, None)]
    assert a.healthy and a.mig_devices == ()
    # GPU b: MIG mode with one instance in two slots; a pending (not failed) row remap stays healthy
    assert [(m.uuid, m.profile, m.gpu_instance_id, m.memory_total_mib, m.memory_used_mib) for m in b.mig_devices] == [
        ("MIG-m0", "3g.40gb", 1, 40192, 500)]
    assert (b.remapped_rows_correctable, b.remapped_rows_uncorrectable, b.row_remap_pending) == (2, 1, True)
    assert b.healthy
    r.close()
    assert nvml.inited == 0


def test_process_utilization_remembers_last_seen_timestamp(nvml):
    r = NvmlReader()
    r.read()
    r.read()
    r.read()
    assert [ts for gpu, ts in nvml.util_calls if gpu == 0] == [0, 1000, 2000]
    r.close()


def test_xid_events_are_drained_without_blocking_and_counted_per_gpu(nvml):
    r = NvmlReader()
    assert r.read()[0].xid_errors == 0
    nvml.events += [NS(device=("gpu", 0), eventData=13, eventType=real.nvmlEventTypeXidCriticalError),
                    NS(device=("gpu", 0), eventData=79, eventType=real.nvmlEventTypeXidCriticalError)]
    a, b = r.read()
    assert (a.xid_errors, a.last_xid, a.healthy) == (2, 79, False)  # 79: fell off the bus
    assert (b.xid_errors, b.healthy) == (0, True)
    assert r.read()[0].xid_errors == 2  # counts persist; nothing new
    r.close()


def test_init_once_per_process_and_shutdown_with_the_last_reader(nvml):
    r1, r2 = NvmlReader(), NvmlReader()
    assert nvml.inited == 1
    r1.close()
    r1.close()  # idempotent
    assert nvml.inited == 1
    r2.close()
    assert nvml.inited == 0


def test_uncorrected_ecc_or_failed_remap_marks_unhealthy(nvml):
    nvml.gpus[0].dbe = 1
    nvml.gpus[1].remap = (0, 4, 0, 1)
    r = NvmlReader()
    a, b = r.read()
    assert not a.healthy and not b.healthy and b.row_remap_failure
    r.close()
