"""Fake-GPU scenarios as data: nodes of chosen GPU models, foreign processes taking memory, and
faults (XID, ECC, a GPU that disappears) injected at given times. Used by the demo, the tests and
the simulator; YAML errors name the file, line and field like the job spec does.

    nodes:
      - name: node-a
        gpus: 8
        model: H100 80GB
        memory_mib: 81559          # optional; default from the cluster's gpu_models or 81559
        foreign:                   # processes Shoal does not own
          - {gpu: 0, memory_mib: 4096, utilization_pct: 15}
    faults:
      - {at_s: 30, node: node-a, gpu: 3, xid: 79}
      - {at_s: 60, node: node-a, gpu: 2, ecc_uncorrected: 1}
      - {at_s: 90, node: node-a, gpu: 5, disappear: true}
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from pydantic import BaseModel, ConfigDict, Field, model_validator

from monitoring.gpu import FakeGpuReader


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ForeignProcess(_Strict):
    gpu: int = Field(ge=0)
    memory_mib: int = Field(ge=0)
    utilization_pct: float = Field(default=0.0, ge=0, le=100)
    name: str = "foreign"


class FakeNode(_Strict):
    name: str = Field(min_length=1)
    gpus: int = Field(ge=0, le=64)
    model: str = "H100 80GB"
    memory_mib: int | None = Field(default=None, gt=0)
    tdp_w: float = Field(default=700.0, gt=0)
    foreign: list[ForeignProcess] = []

    @model_validator(mode="after")
    def _gpus_exist(self) -> FakeNode:
        bad = [p.gpu for p in self.foreign if p.gpu >= self.gpus]
        if bad:
            raise ValueError(f"foreign: gpu {bad[0]} does not exist on {self.name} ({self.gpus} GPU(s))")
        return self


class Fault(_Strict):
    at_s: float = Field(default=0.0, ge=0, description="seconds after the scenario starts")
    node: str
    gpu: int = Field(ge=0)
    xid: int | None = Field(default=None, ge=1)
    ecc_corrected: int = Field(default=0, ge=0)
    ecc_uncorrected: int = Field(default=0, ge=0)
    remapped_rows: int = Field(default=0, ge=0)
    disappear: bool = False

    @model_validator(mode="after")
    def _does_something(self) -> Fault:
        if self.xid is None and not (self.ecc_corrected or self.ecc_uncorrected or self.remapped_rows
                                     or self.disappear):
            raise ValueError("a fault needs one of xid, ecc_corrected, ecc_uncorrected, remapped_rows, disappear")
        return self


class ScenarioSpec(_Strict):
    nodes: list[FakeNode] = Field(min_length=1)
    faults: list[Fault] = []

    @model_validator(mode="after")
    def _refs(self) -> ScenarioSpec:
        nodes = {n.name: n for n in self.nodes}
        if len(nodes) != len(self.nodes):
            raise ValueError("nodes: node names must be unique")
        for i, f in enumerate(self.faults):
            if f.node not in nodes:
                raise ValueError(f"faults.{i}.node: unknown node {f.node!r} (nodes: {', '.join(nodes)})")
            if f.gpu >= nodes[f.node].gpus:
                raise ValueError(f"faults.{i}.gpu: {f.node} has {nodes[f.node].gpus} GPU(s), no index {f.gpu}")
        return self


class Scenario:
    """The running scenario: one FakeGpuReader per node; `advance()` injects the faults that are
    due by the clock (seconds since the scenario started)."""

    def __init__(self, spec: ScenarioSpec, *, memory_by_model: dict[str, int] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.spec = spec
        self._clock = clock
        self._t0 = clock()
        self._pending = sorted(spec.faults, key=lambda f: f.at_s)
        mem = memory_by_model or {}
        self.readers: dict[str, FakeGpuReader] = {}
        for n in spec.nodes:
            reader = FakeGpuReader(n.gpus, n.model, n.memory_mib or mem.get(n.model, 81559), host=n.name,
                                   tdp_w=n.tdp_w, clock=clock)
            for p in n.foreign:
                reader.add_process(p.gpu, p.memory_mib, name=p.name, utilization_pct=p.utilization_pct)
            self.readers[n.name] = reader
        self.advance()

    def advance(self) -> list[Fault]:
        """Inject every fault whose time has come; returns them."""
        elapsed = self._clock() - self._t0
        due = [f for f in self._pending if f.at_s <= elapsed]
        self._pending = self._pending[len(due):]
        for f in due:
            inject(self.readers[f.node], f)
        return due


def inject(reader: FakeGpuReader, fault: Fault) -> None:
    """Play one fault on a fake GPU reader (or anything with its inject_* methods: a node agent's
    proxy passes them on); the scenario's timeline and the fault file both use it."""
    if fault.xid is not None:
        reader.inject_xid(fault.gpu, 1, code=fault.xid)
    if fault.ecc_corrected or fault.ecc_uncorrected or fault.remapped_rows:
        reader.inject_ecc(fault.gpu, corrected=fault.ecc_corrected, uncorrected=fault.ecc_uncorrected,
                          remapped_rows=fault.remapped_rows)
    if fault.disappear:
        reader.remove_gpu(fault.gpu)


def parse_scenario(text: str, source: str = "<scenario>") -> ScenarioSpec:
    from scheduler.spec import _parse_yaml, _validate  # one YAML error format for every file

    return _validate(ScenarioSpec, _parse_yaml(text, source), source, text)


def load_scenario(path: str | Path, **kw) -> Scenario:
    p = Path(path)
    return Scenario(parse_scenario(p.read_text(), str(p)), **kw)


class ScenarioNodeReader:
    """One scenario node's FakeGpuReader whose `read()` first injects the scenario's due faults,
    so a node agent polling it plays the scenario in time. attach_job/detach_job (FakeGpuLoad)
    go to the fake reader."""

    def __init__(self, scenario: Scenario, node: str):
        if node not in scenario.readers:
            raise KeyError(f"node {node!r} is not in the scenario ({', '.join(scenario.readers)})")
        self.scenario = scenario
        self.fake = scenario.readers[node]

    def read(self):
        self.scenario.advance()
        return self.fake.read()

    def attach_job(self, *args, **kw) -> None:
        self.fake.attach_job(*args, **kw)

    def detach_job(self, job_id: int) -> None:
        self.fake.detach_job(job_id)

    def close(self) -> None:
        self.fake.close()
