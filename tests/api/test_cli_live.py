"""The `shoal` CLI as a user runs it: subprocesses talking HTTP to a server process on loopback
(tests/api/server.py: the real API, store, policy and scheduler loop; fake GPUs; no Ray)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from tests.api.conftest import REPO
from tests.integration.harness import write_spec

SHOAL = [sys.executable, "-m", "scheduler.cli"]
# Team a may not borrow (borrowing_limit 0), so its second job waits for quota with a reason.
CLUSTER = {"local": {"gpus": 4}, "teams": {"a": {"gpus": 2, "cohort": "lab", "borrowing_limit": 0},
                                            "b": {"gpus": 2, "cohort": "lab"}},
           "cohorts": {"lab": {}}}


class Cli:
    def __init__(self, home, proc):
        self.home, self.proc = home, proc
        self.env = {**os.environ, "SHOAL_HOME": str(home), "COLUMNS": "250"}

    def __call__(self, *args: str, code: int = 0, env: dict | None = None) -> subprocess.CompletedProcess:
        p = subprocess.run([*SHOAL, *args], env={**self.env, **(env or {})}, cwd=REPO, capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == code, f"shoal {' '.join(args)} exited {p.returncode}, expected {code}\n{p.stdout}\n{p.stderr}"
        return p

    def json(self, *args: str, **kw):
        return json.loads(self(*args, "-o", "json", **kw).stdout)

    def wait(self, job_id: int, until, timeout: float = 30):
        """Poll the job through the SDK (cheaper than a CLI process) until `until(job)` holds."""
        from scheduler.client import Client

        with Client(json.loads((self.home / "daemon.json").read_text())["url"],
                    token=(self.home / "admin.token").read_text().strip()) as c:
            deadline = time.monotonic() + timeout
            while not until(job := c.job(job_id), c):
                assert time.monotonic() < deadline, job
                time.sleep(0.2)


@pytest.fixture(scope="module")
def cli(tmp_path_factory, tiny_model_dir):
    base = tmp_path_factory.mktemp("cli")
    home, config = base / "home", base / "cluster.yaml"
    config.write_text(yaml.safe_dump(CLUSTER))
    proc = subprocess.Popen([sys.executable, "-m", "tests.api.server", "--home", str(home), "--config", str(config)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not (home / "daemon.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() is not None else "timeout"
        time.sleep(0.1)
    yield Cli(home, proc)
    proc.terminate()
    proc.wait(timeout=30)


def _spec(tmp_path, name="j", **changes):
    return str(write_spec(tmp_path / f"{name}.yaml", name=name, team="a", **changes))


def test_admin_token_is_found_without_setup_and_whoami(cli):
    me = cli.json("whoami")
    assert me["user"] == "admin" and me["role"] == "admin"
    assert oct((cli.home / "admin.token").stat().st_mode & 0o777) == "0o600"


def test_submit_dry_run_overrides_and_output_formats(cli, tmp_path):
    spec = _spec(tmp_path, "dry", **{"resources.expected_duration_s": 600})
    p = cli("submit", spec, "--dry-run")
    assert "Would start now" in p.stdout and "Nothing was queued" in p.stdout
    d = cli.json("submit", spec, "--dry-run", "--set", "resources.gpus=2")
    assert d["valid"] and d["gpus"] == 2
    # --set values are typed; a wrong type or an unknown key names the override.
    p = cli("submit", spec, "--set", "hyperparameters.batch_size=many", code=2)
    assert "--set hyperparameters.batch_size=many: hyperparameters.batch_size:" in p.stderr
    p = cli("submit", spec, "--set", "resources.gpu=2", code=2)
    assert "--set resources.gpu=2: resources.gpu: unknown field" in p.stderr
    p = cli("submit", spec, "--set", "oops", code=2)
    assert "--set oops: expected key.path=value" in p.stderr
    p = cli("submit", spec, "--dry-run", "--set", "resources.gpus=3", code=2)  # team a may hold 2 at most
    assert "would be refused" in p.stderr and "resources: can never run here" in p.stderr
    assert cli.json("queue", "--all") == []  # nothing was queued by any of that
    job = cli.json("submit", spec, "--set", "priority=7", "--set", "name=prio")
    assert job["priority"] == 7 and job["name"] == "prio" and job["user"] == "admin"
    y = yaml.safe_load(cli("status", str(job["id"]), "-o", "yaml").stdout)
    assert y["id"] == job["id"] and [e["to_state"] for e in y["events"]][0] == "QUEUED"
    cli("cancel", str(job["id"]))


def test_hold_release_requeue_cancel_and_queue_columns(cli, tmp_path):
    long = _spec(tmp_path, "long", **{"resources.gpus": 2, "resources.expected_duration_s": 3600})
    running = cli.json("submit", long)
    waiting = cli.json("submit", _spec(tmp_path, "wait"))
    cli.wait(running["id"], lambda j, c: j.state.value == "RUNNING")
    table = cli("queue", "--start").stdout
    assert "POS" in table and "START" in table and "team a uses 2/2 GPUs" in table
    assert [e["id"] for e in cli.json("queue", "--start")] == [waiting["id"]]
    assert "HELD" in cli("hold", str(waiting["id"])).stdout
    p = cli("hold", str(running["id"]), code=2)
    assert "only QUEUED jobs can be held" in p.stderr
    assert [j["state"] for j in cli.json("queue", "--state", "HELD")] == ["HELD"]
    cli("release", str(waiting["id"]))
    cli("requeue", str(running["id"]))
    cli.wait(running["id"], lambda j, c: "PREEMPTING" in [e.to_state for e in c.events(j.id)])
    p = cli("cancel", str(running["id"]), str(waiting["id"]), "999999", code=2)
    assert "job 999999: Job not found" in p.stderr
    for job in (running, waiting):
        cli.wait(job["id"], lambda j, c: j.state.value == "CANCELLED")


def test_member_token_from_env_and_config_file_is_confined_to_its_team(cli, tmp_path):
    created = cli.json("token", "create", "--user", "bob", "--team", "a", "--role", "member")
    assert created["token"].startswith("shoal_")
    p = cli("token", "create", "--user", "eve", "--team", "b")
    assert "shown only this once" in p.stdout
    bob = {"SHOAL_TOKEN": created["token"]}
    assert cli.json("whoami", env=bob)["user"] == "bob"
    job = cli.json("submit", _spec(tmp_path, "bobs", **{"resources.expected_duration_s": 5}), env=bob)
    assert job["user"] == "bob"
    p = cli("submit", str(write_spec(tmp_path / "b.yaml", name="x", team="b")), env=bob, code=4)
    assert "you belong to team 'a', not 'b'" in p.stderr
    assert cli("drain", "node-1", env=bob, code=4).stderr.startswith("error: Forbidden")
    assert cli("quota", "set", "a", "--gpus", "9", env=bob, code=4)
    assert [t["name"] for t in cli.json("quota", "show", env=bob)] == ["a"]
    # The same token from a config file (no SHOAL_TOKEN), and a bad token: exit 4.
    conf = tmp_path / "config.yaml"
    conf.write_text(yaml.safe_dump({"token": created["token"]}))
    assert cli.json("whoami", env={"SHOAL_CONFIG": str(conf)})["user"] == "bob"
    assert "Invalid token" in cli("queue", env={"SHOAL_TOKEN": "shoal_00000000_x"}, code=4).stderr
    ids = [t["id"] for t in cli.json("token", "list", env=bob)]
    assert ids == [created["id"]]
    cli("token", "revoke", created["id"])
    cli("whoami", env=bob, code=4)


def test_quota_nodes_drain_top_and_logs(cli, tmp_path):
    cli("quota", "set", "a", "--borrowing-limit", "1")
    q = {t["name"]: t for t in cli.json("quota", "show")}
    assert q["a"]["borrowing_limit"] == 1 and q["b"]["gpus"] == 2
    assert "TEAM" in cli("quota", "show", "b").stdout
    p = cli("quota", "set", "a", "--cohort", "nowhere", code=2)
    assert "cohort: 'nowhere' is not a cohort" in p.stderr
    p = cli("quota", "set", "zz", "--gpus", "1", "--create")
    assert "zz" in p.stdout
    nodes = cli.json("nodes")
    assert [n["name"] for n in nodes] == ["node-1"] and len(nodes[0]["gpus"]) == 4
    assert "drained (rack work)" in cli("drain", "node-1", "--reason", "rack work").stdout
    assert cli.json("nodes")[0]["drained"] is True
    job = cli.json("submit", _spec(tmp_path, "drained", **{"resources.expected_duration_s": 1}))
    time.sleep(1.5)
    assert cli.json("status", str(job["id"]))["state"] == "QUEUED"
    cli("undrain", "node-1")
    frame = cli("top", "--once").stdout
    assert "GPUs" in frame and "node-1" in frame and "NAME" in frame
    cli.wait(job["id"], lambda j, c: j.state.value == "SUCCEEDED")
    log = cli("logs", str(job["id"]), "-f").stdout
    assert "QUEUED -> ADMITTED" in log and "-> SUCCEEDED" in log
