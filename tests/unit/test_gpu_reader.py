import pytest

from monitoring.gpu import FakeGpuReader, NvmlReader, NvmlUnavailable


def test_fake_reader_memory_follows_processes():
    r = FakeGpuReader(4, "H100 80GB", 81559)
    assert [g.index for g in r.read()] == [0, 1, 2, 3]
    assert len({g.uuid for g in r.read()}) == 4
    pid = r.add_process(2, 30000, utilization_pct=40)
    g2 = r.read()[2]
    assert (g2.memory_used_mib, g2.memory_free_mib, g2.utilization_pct) == (30000, 51559, 40)
    assert g2.processes[0].job_id is None  # foreign
    r.attach_job(9, (2, 3), 10000)
    assert r.read()[2].memory_used_mib == 40000 and r.read()[3].utilization_pct == 90
    r.detach_job(9)
    assert r.read()[3].memory_used_mib == 0 and r.read()[2].memory_used_mib == 30000
    r.remove_process(pid)
    assert r.read()[2].memory_used_mib == 0 and r.read()[2].utilization_pct == 0


def test_fake_reader_faults():
    r = FakeGpuReader(2)
    r.inject_xid(1, 2)
    assert r.read()[1].healthy is False and r.read()[1].xid_errors == 2
    r.remove_gpu(0)
    assert [g.index for g in r.read()] == [1]


def test_fake_reading_copy_equals_dataclasses_replace():
    """read() copies each GPU's reading with a __dict__ copy instead of dataclasses.replace (the
    simulator reads changed nodes every cycle): the same frozen, hashable value, every field kept,
    the stored reading untouched."""
    from dataclasses import fields, replace

    from scheduler.copying import with_fields

    r = FakeGpuReader(2)
    r.attach_job(3, (1,), 5000, utilization_pct=40)
    r.inject_ecc(1, corrected=2)
    base = r._gpus[1].reading
    got = r.read()[1]
    want = replace(base, memory_used_mib=5000, utilization_pct=40.0, processes=tuple(r._gpus[1].processes.values()),
                   power_w=got.power_w, energy_mj=got.energy_mj, temperature_c=46.0)
    assert got == want and hash(got) == hash(want) and type(got) is type(want)
    assert {f.name for f in fields(got)} == set(vars(got)) and got.ecc_sbe_volatile == 2
    assert base.memory_used_mib == 0 and base.processes == ()  # the stored reading is not changed
    assert with_fields(base, memory_used_mib=7) == replace(base, memory_used_mib=7)
    with pytest.raises(AttributeError):
        got.memory_used_mib = 1  # still frozen


def test_nvml_reader_without_driver_is_a_typed_error():
    try:
        reader = NvmlReader()
    except NvmlUnavailable as e:
        assert "NVML unavailable" in str(e)
    else:  # a machine with a driver: the reader must produce readings
        try:
            readings = reader.read()
            assert all(g.memory_total_mib > 0 for g in readings)
        finally:
            reader.close()
