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
