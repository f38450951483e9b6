"""Bad input never stops the service: corrupted job rows, a spec written by a newer Shoal, a
dataset that disappears after submit and a disk that fills each end that one job FAILED with a
reason saying what is wrong, while the other jobs keep running (SQLite and PostgreSQL)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sqlalchemy import text

from monitoring.gpu import FakeGpuReader
from scheduler.clock import FakeClock
from scheduler.executor import InMemoryExecutor
from scheduler.inventory import Inventory, NodeInfo
from scheduler.lifecycle import JobState as S
from scheduler.service import Service, check_launchable
from scheduler.spec import ClusterConfig, TeamConfig, load_job_spec
from scheduler.store import Store
from tests.reliability.db import db_url, pg_database  # noqa: F401 - fixtures

REPO = Path(__file__).resolve().parents[2]


class World:
    def __init__(self, tmp: Path, url: str):
        self.tmp, self.clock, self.store = tmp, FakeClock(), Store(url)
        self.executor = InMemoryExecutor(self.clock, duration_s=lambda spec: 3)
        self.service = Service(self.store, self.executor,
                               Inventory(lambda: [NodeInfo("n1", "n1")], {"n1": FakeGpuReader(4)}),
                               ClusterConfig(teams={"default": TeamConfig(gpus=4)}), self.clock, tmp,
                               preflight=check_launchable)

    def spec(self, **changes) -> dict:
        spec = load_job_spec(REPO / "examples" / "tiny-lora.yaml").model_dump(mode="json")
        spec.update(changes)
        return spec

    def submit(self, spec: dict):
        return self.store.submit(spec=spec, name=spec.get("name", "x"), team="default", user="u", priority=0,
                                 gpus=1, memory_per_gpu_mib=100, now=self.clock.now())

    def run(self, ticks: int = 6):
        for _ in range(ticks):
            self.service.tick()
            self.clock.advance(1)

    def reason(self, job) -> str:
        return self.store.events(job.id)[-1].reason


@pytest.fixture
def world(tmp_path, db_url):
    w = World(tmp_path, db_url)
    yield w
    w.store.close()


def test_corrupted_rows_fail_with_the_problem_and_the_rest_runs(world, db_url):
    good = world.submit(world.spec())
    bad_state = world.submit(world.spec(name="bad-state"))
    bad_spec = world.submit(world.spec(name="bad-spec"))
    with world.store.engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET state = 'BOGUS' WHERE id = :i"), {"i": bad_state.id})
        conn.execute(text("UPDATE jobs SET spec = '[1, 2]' WHERE id = :i"), {"i": bad_spec.id})
        if db_url.startswith("sqlite"):  # PostgreSQL refuses invalid JSON itself
            conn.execute(text("UPDATE jobs SET progress = '{not json' WHERE id = :i"), {"i": good.id})
    world.run()
    got = {j.id: j for j in world.store.jobs()}
    assert got[bad_state.id].state is S.FAILED
    assert got[bad_state.id].failure_reason == "corrupted row: state 'BOGUS' is not a job state"
    assert world.store.events(bad_state.id)[-1].from_state == "BOGUS"
    assert got[bad_spec.id].state is S.FAILED
    assert got[bad_spec.id].failure_reason == "corrupted row: spec: a JSON object was expected, not list"
    if db_url.startswith("sqlite"):
        assert got[good.id].state is S.FAILED and "progress: invalid JSON" in got[good.id].failure_reason
    else:
        assert got[good.id].state is S.SUCCEEDED
    after = world.submit(world.spec(name="after"))
    world.run()
    assert world.store.get(after.id).state is S.SUCCEEDED  # the service kept going


def test_spec_from_a_newer_shoal_fails_with_the_version(world):
    newer = world.submit(world.spec(name="newer", api_version="shoal/v2"))
    edited = world.submit(world.spec(name="edited", method="qlora-9000"))
    ok = world.submit(world.spec(name="ok"))
    world.run()
    assert world.store.get(newer.id).state is S.FAILED
    assert world.reason(newer) == ("cannot launch: api_version: the spec is 'shoal/v2', newer than this Shoal "
                                   "(it reads 'shoal/v1'); run it with a Shoal that knows that version")
    assert world.store.get(edited.id).state is S.FAILED
    assert world.reason(edited).startswith("cannot launch: stored spec no longer validates (corrupted row?): method")
    assert world.store.get(ok.id).state is S.SUCCEEDED


def test_dataset_removed_after_submit(world, tmp_path):
    data = tmp_path / "data.jsonl"
    shutil.copy(REPO / "examples/data/tiny-sft/train.jsonl", data)
    spec = world.spec(name="vanishing")
    spec["dataset"] = {**spec["dataset"], "train": str(data)}
    job = world.submit(spec)
    data.unlink()
    world.run()
    rec = world.store.get(job.id)
    assert rec.state is S.FAILED and rec.placement is None and rec.retries == 0
    assert world.reason(job) == (f"cannot launch: dataset.train: {data} no longer exists (it did at submit); "
                                 "restore it or resubmit")


def test_disk_full_fails_at_once_with_the_cause(world):
    job = world.submit(world.spec(name="full", max_retries=3))
    world.executor.fail_next[job.id] = ("Traceback (most recent call last):\n  ...\n"
                                        "OSError: [Errno 28] No space left on device: '/out/adapter_model.safetensors'")
    other = world.submit(world.spec(name="other"))
    world.run()
    rec = world.store.get(job.id)
    assert rec.state is S.FAILED and rec.retries == 0
    assert world.reason(job) == ("failed: disk full (ENOSPC) while writing checkpoints or the output (OSError: "
                                 "[Errno 28] No space left on device: '/out/adapter_model.safetensors'); free "
                                 "space, then resubmit")
    assert world.store.get(other.id).state is S.SUCCEEDED
