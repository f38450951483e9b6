"""GPU readers, scenarios and the node agent (no Prometheus)."""
import time
from types import SimpleNamespace

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from monitoring.agent import HttpAgentReader, NodeAgent, agent_readers
from monitoring.gpu import FakeGpuReader, NvmlReader, NvmlUnavailable
from monitoring.scenario import Scenario, parse_scenario
from scheduler.spec import ClusterConfig, SpecError


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_fake_power_follows_utilization_and_energy_integrates_it():
    clock = Clock()
    r = FakeGpuReader(1, tdp_w=700.0, clock=clock)
    r.read()
    clock.t = 10.0
    assert r.read()[0].energy_mj == pytest.approx(70.0 * 10 * 1000)  # idle: 70 W for 10 s
    r.attach_job(5, (0,), 1000, utilization_pct=50)
    clock.t = 20.0
    g = r.read()[0]
    assert g.power_w == pytest.approx(385.0)  # 70 + (700-70) * 0.5
    assert g.energy_mj == pytest.approx((700.0 + 3850.0) * 1000)
    assert g.processes[0].sm_util_pct == 50 and g.temperature_c > 30


def test_fake_faults_xid_code_ecc_and_unknown_index():
    r = FakeGpuReader(3)
    r.inject_xid(0, code=13)  # an application fault: counted, GPU stays healthy
    r.inject_xid(1, 2, code=48)  # double-bit ECC: critical
    r.inject_ecc(2, corrected=4)
    g = r.read()
    assert (g[0].xid_errors, g[0].last_xid, g[0].healthy) == (1, 13, True)
    assert (g[1].xid_errors, g[1].last_xid, g[1].healthy) == (2, 48, False)
    assert (g[2].ecc_sbe_volatile, g[2].healthy) == (4, True)
    r.inject_ecc(2, uncorrected=1)
    assert r.read()[2].healthy is False and r.read()[2].ecc_dbe_volatile == 1
    with pytest.raises(IndexError, match="gpu index 7 out of range: this fake node has 3 GPU"):
        r.attach_job(1, (7,), 100)


def test_scenario_builds_nodes_and_injects_faults_on_time():
    clock = Clock()
    sc = Scenario(parse_scenario("""
nodes:
  - {name: a, gpus: 2, model: A100 80GB, memory_mib: 81920, foreign: [{gpu: 1, memory_mib: 3000}]}
  - {name: b, gpus: 1}
faults:
  - {at_s: 5, node: a, gpu: 0, xid: 79}
  - {at_s: 9, node: b, gpu: 0, disappear: true}
"""), clock=clock)
    a, b = sc.readers["a"], sc.readers["b"]
    assert [g.model for g in a.read()] == ["A100 80GB"] * 2 and a.read()[1].memory_used_mib == 3000
    assert sc.advance() == [] and a.read()[0].healthy
    clock.t = 6
    assert [f.xid for f in sc.advance()] == [79] and not a.read()[0].healthy
    clock.t = 10
    sc.advance()
    assert b.read() == []


def test_scenario_errors_name_line_and_field():
    with pytest.raises(SpecError) as e:
        parse_scenario("nodes:\n  - name: a\n    gpus: 2\n    gpu_count: 3\nfaults:\n  - {node: zz, gpu: 0, xid: 1}\n",
                       "sc.yaml")
    text = str(e.value)
    assert "sc.yaml:4: nodes.0.gpu_count: unknown field" in text
    with pytest.raises(SpecError, match="faults.0.node: unknown node 'zz'"):
        parse_scenario("nodes: [{name: a, gpus: 1}]\nfaults: [{node: zz, gpu: 0, xid: 1}]\n")
    with pytest.raises(SpecError, match="a fault needs one of xid"):
        parse_scenario("nodes: [{name: a, gpus: 1}]\nfaults: [{node: a, gpu: 0}]\n")


def test_nvml_reader_without_driver_is_a_typed_error_for_real():
    try:
        reader = NvmlReader()
    except NvmlUnavailable as e:
        assert "NVML unavailable" in str(e) and "reader: fake" in str(e)
    else:  # a machine with a driver: the full path must produce readings
        try:
            gpus = reader.read()
            assert gpus and all(g.memory_total_mib > 0 and g.uuid.startswith(("GPU-", "MIG-")) for g in gpus)
        finally:
            reader.close()


def test_agent_survives_a_missing_driver_and_retries(monkeypatch):
    clock = Clock()
    calls = []

    def factory():
        calls.append(clock.t)
        if len(calls) < 3:
            return NvmlReader()  # really no driver here: raises NvmlUnavailable
        return FakeGpuReader(2)

    try:  # on a GPU machine this test is about the fake path only
        NvmlReader().close()
        pytest.skip("an NVIDIA driver is present")
    except NvmlUnavailable:
        pass
    reg = CollectorRegistry()
    agent = NodeAgent(factory, interval_s=1, registry=reg, retry_s=60, clock=clock)
    assert agent.read() == [] and "NVML unavailable" in agent.error
    assert reg.get_sample_value("shoal_agent_reader_up") == 0
    clock.t = 30
    agent.poll()
    assert len(calls) == 1  # not retried before retry_s
    clock.t = 61
    agent.poll()
    clock.t = 122
    assert len(agent.poll()) == 2 and agent.error is None and len(calls) == 3
    assert reg.get_sample_value("shoal_agent_reader_up") == 1 and reg.get_sample_value("shoal_agent_gpus") == 2


def test_agent_keeps_last_readings_when_a_poll_fails():
    class Flaky(FakeGpuReader):
        fail = False

        def read(self):
            if self.fail:
                raise RuntimeError("NVML_ERROR_GPU_IS_LOST")
            return super().read()

    r = Flaky(2)
    reg = CollectorRegistry()
    agent = NodeAgent(r, interval_s=1, registry=reg)
    assert len(agent.poll()) == 2
    r.fail = True
    assert len(agent.poll()) == 2 and "GPU_IS_LOST" in agent.error
    assert reg.get_sample_value("shoal_agent_poll_errors_total") == 1


def test_agent_polls_in_background_and_serves_readings_and_metrics_over_http():
    fake = FakeGpuReader(3, host="n1")
    agent = NodeAgent(fake, interval_s=0.05, hostname="n1").start()
    server, port = agent.serve("127.0.0.1", 0)
    remote = HttpAgentReader(f"http://127.0.0.1:{port}")
    try:
        fake.attach_job(7, (1,), 12345, utilization_pct=80)
        deadline = time.monotonic() + 5
        while agent._latest[1].memory_used_mib != 12345:  # the poll thread picks the change up
            assert time.monotonic() < deadline
            time.sleep(0.02)
        got, want = remote.read(), fake.read()
        key = lambda g: (g.index, g.uuid, g.model, g.memory_used_mib, g.processes, g.mig_devices, g.healthy)  # noqa: E731
        assert [key(g) for g in got] == [key(g) for g in want]  # readings survive JSON intact
        assert got[1].processes[0].job_id == 7 and got[1].utilization_pct == 80
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        samples = {(s.name, s.labels.get("gpu")): s for f in text_string_to_metric_families(text) for s in f.samples}
        assert samples[("DCGM_FI_DEV_FB_USED", "1")].value == 12345
        assert samples[("DCGM_FI_DEV_FB_USED", "1")].labels["Hostname"] == "n1"
        assert samples[("shoal_agent_reader_up", None)].value == 1
    finally:
        server.shutdown()
        remote.close()
        agent.close()
    assert HttpAgentReader(f"http://127.0.0.1:{port}", timeout_s=0.5).read() == []  # agent gone: no GPUs


def test_agent_readers_for_ray_nodes_read_each_nodes_agent():
    agent = NodeAgent(FakeGpuReader(2, host="w1"), interval_s=1, hostname="w1")
    server, port = agent.serve("127.0.0.1", 0)
    try:
        nodes = [  # the shape of ray.nodes()
            {"NodeID": "abc", "Alive": True, "NodeManagerAddress": "127.0.0.1", "Resources": {"GPU": 2.0}},
            {"NodeID": "dead", "Alive": False, "NodeManagerAddress": "127.0.0.9"},
        ]
        readers = agent_readers(nodes, port=port)
        assert list(readers) == ["abc"]
        assert [g.index for g in readers["abc"].read()] == [0, 1]
        readers["abc"].close()
    finally:
        server.shutdown()
        agent.close()


def test_shoal_up_scenario_reader_plays_the_example_and_names_bad_fields(tmp_path):
    from pathlib import Path

    from scheduler.daemon import FakeGpuLoad, scenario_reader

    example = Path(__file__).resolve().parents[2] / "examples" / "scenario.yaml"
    config = ClusterConfig()
    clock = Clock()
    reader = scenario_reader(config, example, clock=clock)
    agent = NodeAgent(reader, interval_s=1.0, registry=CollectorRegistry(), clock=clock)
    g = agent.poll()
    assert [r.model for r in g] == ["H100 80GB"] * 4 and g[0].memory_used_mib == 6144
    assert g[0].memory_total_mib == 80 * 1024  # the cluster config's memory for the model
    FakeGpuLoad(reader, agent.poll).placed(SimpleNamespace(id=3, placement={"gpu_indices": [2]},
                                                           memory_per_gpu_mib=20000))
    assert agent.read()[2].memory_used_mib == 20000
    clock.t = 61  # faults are played as the agent polls
    g = agent.poll()
    assert (g[1].last_xid, g[1].healthy, g[3].xid_errors) == (13, True, 0)
    clock.t = 301
    assert agent.poll()[3].healthy is False

    two = tmp_path / "two.yaml"
    two.write_text("nodes:\n  - {name: a, gpus: 1}\n  - {name: b, gpus: 1}\n")
    with pytest.raises(RuntimeError, match=r"two.yaml: nodes: .* one node \(this one has 2: a, b\)"):
        scenario_reader(config, two)
    a100 = tmp_path / "a100.yaml"
    a100.write_text("nodes:\n  - {name: a, gpus: 1, model: A100 40GB}\n")
    with pytest.raises(RuntimeError, match=r"a100.yaml: nodes.0.model: 'A100 40GB' is not in the cluster config's "
                                           r"gpu_models \(H100 80GB\)"):
        scenario_reader(config, a100)
    with pytest.raises(RuntimeError, match="--scenario: cannot read .*missing.yaml"):
        scenario_reader(config, tmp_path / "missing.yaml")
