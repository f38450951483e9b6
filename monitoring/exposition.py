"""A fast /metrics renderer for large scrape-time families.

prometheus-client's `generate_latest` validates and escapes every label of every sample (~10-30 µs
a sample here): 1,000 nodes x 8 GPUs of DCGM series took seconds. `Family` renders each sample's
line when it is added (label strings can be built once per GPU and reused for all its fields), and
`render(registry)` writes those lines directly; other metrics (histograms, counters of
prometheus-client) go through `generate_latest` unchanged. The output is the same text format
(0.0.4) as generate_latest's. `Family.samples` still works (built lazily), so
`registry.get_sample_value` and the prometheus-client parsers see the same data.
"""
from __future__ import annotations

import gc
from typing import Iterable, Sequence

from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample


def fmt(v: float) -> str:
    """Go-style float text: repr, with Prometheus' spelling of NaN and infinities."""
    s = repr(float(v))
    return s if s[-1].isdigit() else {"nan": "NaN", "inf": "+Inf", "-inf": "-Inf"}[s]


def esc(v: str) -> str:
    """A label value escaped for the text format (backslash, double quote, newline)."""
    if "\\" in v or '"' in v or "\n" in v:
        return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return v


def label_string(names: Sequence[str], values: Sequence[str]) -> str:
    """`a="x",b="y"` in the given order (Prometheus does not care; generate_latest sorts, which
    costs more than the rest of the line). Names must be valid label names."""
    return ",".join([f'{n}="{esc(v)}"' for n, v in zip(names, values)])


def _parse_samples(sample_name: str, typ: str, text: str) -> list[Sample]:
    from prometheus_client.parser import text_string_to_metric_families

    return [s for f in text_string_to_metric_families(f"# TYPE {sample_name} {typ}\n{text}") for s in f.samples]


class Family(Metric):
    """A gauge or counter family (drop-in for GaugeMetricFamily / CounterMetricFamily with
    `labels=`) whose sample lines are rendered as they are added. `samples` (for
    prometheus-client's registry helpers and generate_latest) parses those lines, lazily: a
    scrape through `render` builds no Sample objects."""

    def __init__(self, name: str, documentation: str, typ: str = "gauge", labels: Sequence[str] = ()):
        if typ == "counter" and name.endswith("_total"):
            name = name[:-6]  # as CounterMetricFamily: the family is `x`, its sample `x_total`
        super().__init__(name, documentation, typ)
        self._label_names = tuple(labels)
        self._sample_name = self.name + ("_total" if typ == "counter" else "")
        self.lines: list[str] = []

    @property
    def samples(self) -> list[Sample]:  # type: ignore[override]
        return _parse_samples(self._sample_name, self.type, "".join(self.lines))

    @samples.setter
    def samples(self, _value) -> None:  # Metric.__init__ assigns []; the samples live in `lines`
        pass

    def add_metric(self, labels: Sequence[str], value: float) -> None:
        self.add_rendered(label_string(self._label_names, labels) if labels else "", value)

    def add_rendered(self, label_str: str, value: float) -> None:
        """Add a sample whose label string (`label_string(names, labels)`) was built already."""
        if label_str:
            self.lines.append(f"{self._sample_name}{{{label_str}}} {fmt(value)}\n")  # hot: 100k+ a scrape
        else:
            self.lines.append(f"{self._sample_name} {fmt(value)}\n")


class TextFamily(Metric):
    """A family whose sample lines are already rendered, as UTF-8 chunks (e.g. one per node,
    cached by the node agent between polls): a scrape writes them as they are. `samples` parses
    the text, lazily."""

    def __init__(self, name: str, documentation: str, typ: str, chunks: Sequence[bytes]):
        super().__init__(name, documentation, typ)
        self._sample_name = self.name + ("_total" if typ == "counter" else "")
        self.chunks = chunks

    @property
    def samples(self) -> list[Sample]:  # type: ignore[override]
        return _parse_samples(self._sample_name, self.type, b"".join(self.chunks).decode())

    @samples.setter
    def samples(self, _value) -> None:
        pass


class _One:
    def __init__(self, metric: Metric):
        self.metric = metric

    def collect(self) -> Iterable[Metric]:
        return [self.metric]


def render(registry) -> bytes:
    """The registry's exposition in the Prometheus text format (as generate_latest, faster).

    Python's cyclic garbage collector is paused while it runs: a scrape of a large cluster
    allocates ~10^5 short-lived containers (no cycles), which triggers full collections that walk
    the whole heap (every node's readings) and made one scrape in four 2x slower. Nothing is lost:
    the collector runs at the next allocation threshold after the scrape."""
    paused = gc.isenabled()
    if paused:
        gc.disable()
    try:
        return _render(registry)
    finally:
        if paused:
            gc.enable()


def _render(registry) -> bytes:
    out: list[bytes] = []
    for metric in registry.collect():
        if isinstance(metric, (Family, TextFamily)):
            name = metric._sample_name
            doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
            out.append(f"# HELP {name} {doc}\n# TYPE {name} {metric.type}\n".encode())
            if isinstance(metric, Family):
                out.append("".join(metric.lines).encode())
            else:
                out.extend(metric.chunks)
        else:
            out.append(generate_latest(_One(metric)))
    return b"".join(out)


def gauge(name: str, documentation: str, labels: Sequence[str] = ()) -> Family:
    return Family(name, documentation, "gauge", labels)


def counter(name: str, documentation: str, labels: Sequence[str] = ()) -> Family:
    return Family(name, documentation, "counter", labels)
