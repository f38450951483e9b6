"""The fast renderer writes what prometheus-client's generate_latest writes (parsed sample by
sample), including escaping, counters, histograms and special values."""
import math

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from monitoring.exposition import counter, gauge, render


class Fams(Collector):
    def collect(self):
        g = gauge("shoal_x", "help with \\ backslash\nand newline", ["a", "b"])
        g.add_metric(["1", 'q"uote'], 1.5)
        g.add_metric(["2", "back\\slash\nnl"], float("nan"))
        g.add_metric(["3", ""], float("inf"))
        c = counter("shoal_y_total", "a counter", ["t"])
        c.add_metric(["a"], 3)
        n = gauge("shoal_z", "no labels")
        n.add_metric([], -2.0)
        yield from (g, c, n)


def _parse(text: str):
    out = {}
    for f in text_string_to_metric_families(text):
        for s in f.samples:
            v = "nan" if math.isnan(s.value) else s.value
            out[(s.name, tuple(sorted(s.labels.items())))] = (f.type, f.documentation, v)
    return out


def test_render_matches_generate_latest():
    reg = CollectorRegistry()
    reg.register(Fams())
    Counter("shoal_events_total", "events", ["k"], registry=reg).labels("x").inc(2)
    Histogram("shoal_h_seconds", "h", registry=reg, buckets=(1, 5)).observe(3)
    fast, slow = render(reg).decode(), generate_latest(reg).decode()
    assert _parse(fast) == _parse(slow)
    assert len(_parse(fast)) >= 10
    assert 'shoal_y_total{t="a"} 3.0' in fast and "shoal_z -2.0" in fast
    # the lazily built samples agree too (registry.get_sample_value reads them)
    assert reg.get_sample_value("shoal_x", {"a": "1", "b": 'q"uote'}) == 1.5
    assert reg.get_sample_value("shoal_y_total", {"t": "a"}) == 3


def _samples(chunks: dict) -> dict:
    from monitoring.dcgm import NODE_FAMILIES
    from monitoring.exposition import TextFamily

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for name, help_, typ in NODE_FAMILIES for s in TextFamily(name, help_, typ, [chunks[name]]).samples}


def test_agent_renders_node_text_once_per_poll_with_the_holders_it_was_given():
    from monitoring.agent import NodeAgent
    from monitoring.gpu import FakeGpuReader

    reader = FakeGpuReader(2, "H100 80GB", 81920, host="h")
    agent = NodeAgent(reader, interval_s=1.0, registry=CollectorRegistry(), max_age_s=1e9)
    agent.poll()
    first = agent.exposition("node-x", ())
    assert agent.exposition("node-x", ()) is first  # cached until the next poll
    s = _samples(first)
    assert ("DCGM_FI_DEV_FB_USED", (("Hostname", "node-x"), ("UUID", reader.read()[0].uuid), ("device", "nvidia0"),
                                    ("gpu", "0"), ("modelName", "H100 80GB"))) in s
    assert s[("shoal_gpus", (("flavor", "H100 80GB"), ("node", "node-x"), ("state", "free")))] == 2
    reader.attach_job(7, (0,), 1000)
    agent.poll()  # renders with the last holders it was told: none yet
    assert not any(dict(k[1]).get("job_id") for k in _samples(agent.exposition("node-x", ())))
    held = ((0, ((7, "a"),)),)
    s = _samples(agent.exposition("node-x", held))  # new holders: rendered again, at once
    fb = {k: v for k, v in s.items() if k[0] == "DCGM_FI_DEV_FB_USED" and dict(k[1]).get("job_id") == "7"}
    assert list(fb.values()) == [1000.0] and dict(next(iter(fb))[1])["team"] == "a"
    assert s[("shoal_gpus", (("flavor", "H100 80GB"), ("node", "node-x"), ("state", "allocated")))] == 1
    agent.poll()  # the next poll keeps those holders
    assert any(dict(k[1]).get("job_id") == "7" for k in _samples(agent.exposition("node-x", held)))
