"""Stopping the service mid-run loses nothing: running jobs checkpoint and are requeued, the
queue and the history survive in the store, and after the restart both jobs resume from their
checkpoints and finish; no job ever has two attempts running at once."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from scheduler.cli import _pid_alive
from scheduler.lifecycle import JobState
from scheduler.store import Store
from tests.integration.harness import ShoalServer, write_spec

# ~6 min together on 2 cores: slow (CI runs them in `make test-slow`); the crash-point and chaos
# suites in tests/reliability cover the same guarantees faster and more thoroughly.
pytestmark = [pytest.mark.ray, pytest.mark.slow]
STEPS = 600


def _wait(pred, timeout: float, what: str, log=lambda: ""):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{log()[-4000:]}"
        time.sleep(0.5)


def test_stop_mid_run_and_restart_resumes_both_jobs(tmp_path, tiny_model_dir):
    server = ShoalServer(tmp_path / "home", config={"teams": {"default": {"gpus": 2}}})
    client = server.up()
    try:
        ids = [client.submit_file(write_spec(tmp_path / f"j{i}.yaml", name=f"job-{i}",
                                             checkpoint_every_steps=25,
                                             **{"hyperparameters.max_steps": STEPS})).id for i in range(2)]
        _wait(lambda: all((client.job(i).progress or {}).get("step", 0) >= 60 for i in ids), 240,
              "both jobs past step 60", server.log)
    finally:
        server.down()

    # Service stopped: the store still knows both jobs, back in the queue after a checkpoint.
    store = Store(f"sqlite:///{server.home / 'shoal.db'}")
    try:
        for i in ids:
            job = store.get(i)
            assert job.state is JobState.QUEUED, (job, server.log()[-3000:])
            assert job.last_checkpoint_step and job.last_checkpoint_step >= 25
            assert [e.to_state for e in store.events(i)][-2:] == ["PREEMPTING", "QUEUED"]
            stopped_at = {i: store.get(i).last_checkpoint_step for i in ids}
    finally:
        store.close()

    client = server.up()
    try:
        _wait(lambda: all(client.job(i).state.terminal for i in ids), 400, "both jobs to finish", server.log)
        for i in ids:
            job = client.job(i)
            assert job.state is JobState.SUCCEEDED, (job, server.log()[-3000:])
            assert job.attempt == 2 and job.result["steps"] == STEPS
            assert job.result["resumed_from_step"] == stopped_at[i]
            # Attempts never overlap: attempt 2 starts only after attempt 1 was back in the queue.
            ev = client.events(i)
            spans, open_at = [], {}
            for e in ev:
                if e.to_state == "STARTING":
                    open_at[e.attempt] = e.ts
                elif e.from_state in ("STARTING", "RUNNING", "PREEMPTING") and e.to_state in (
                        "QUEUED", "SUCCEEDED", "FAILED", "CANCELLED"):
                    spans.append((open_at.pop(e.attempt), e.ts))
            assert len(spans) == 2 and spans[0][1] <= spans[1][0]
        logs = "".join(client.follow_logs(ids[0]))
        assert "resum" in logs.lower()
    finally:
        server.down()


def test_killed_service_requeues_and_resumes_on_restart(tmp_path, tiny_model_dir):
    """SIGKILL, no chance to checkpoint: the local Ray cluster dies with the server; on restart
    the job is found not running, requeued, and resumes from its last periodic checkpoint."""
    server = ShoalServer(tmp_path / "home")
    client = server.up()
    try:
        jid = client.submit_file(write_spec(tmp_path / "j.yaml", name="crash", checkpoint_every_steps=20,
                                            **{"hyperparameters.max_steps": STEPS})).id
        _wait(lambda: (client.job(jid).progress or {}).get("checkpoint_step", 0) >= 40, 240,
              "two checkpoints", server.log)
        pid = json.loads((server.home / "daemon.json").read_text())["pid"]
        os.kill(pid, signal.SIGKILL)
        _wait(lambda: not _pid_alive(pid), 30, "the server to die")
        client = server.up()  # the stale daemon.json of the dead server is replaced
        final = client.wait(jid, timeout=300)
        assert final.state is JobState.SUCCEEDED, server.log()[-3000:]
        assert final.attempt == 2 and final.result["steps"] == STEPS
        assert final.result["resumed_from_step"] >= 20
        reasons = [e.reason for e in client.events(jid)]
        assert any("not running after a service restart" in r for r in reasons)
    finally:
        server.down()

