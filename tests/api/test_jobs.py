"""Jobs through the REST API: submit (idempotency, dry run, sandbox), list (filters, pages),
hold / release / requeue / cancel, tenancy (404 vs 403) and problem+json errors."""
from __future__ import annotations

import os

from scheduler.lifecycle import JobState as S


def _submit(world, who="bob", key=None, **changes):
    headers = {"Idempotency-Key": key} if key else {}
    return world.http(who).post("/v1/jobs", json={"spec": world.spec(team="a", **changes)}, headers=headers)


def test_submit_runs_as_the_token_user_and_is_idempotent_per_key(world):
    r = _submit(world, key="k1")
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["user"] == "bob" and job["team"] == "a" and job["state"] == "QUEUED"
    again = _submit(world, key="k1")
    assert again.status_code == 200 and again.json()["id"] == job["id"]
    # The same key with another body is refused; another key is another job.
    other = _submit(world, key="k1", priority=5)
    assert other.status_code == 422 and "Idempotency-Key" in other.json()["title"]
    assert _submit(world, key="k2").json()["id"] != job["id"]
    # Keys are per user: bea (team b) using "k1" gets her own job.
    r = world.http("bea").post("/v1/jobs", json={"spec": world.spec(team="b")}, headers={"Idempotency-Key": "k1"})
    assert r.status_code == 201 and r.json()["id"] not in (job["id"],)
    assert len(world.store.jobs()) == 3


def test_members_cannot_submit_for_another_team_or_user(world):
    r = world.http("bob").post("/v1/jobs", json={"spec": world.spec(team="b")})
    assert r.status_code == 403 and "team 'a'" in r.json()["detail"]
    r = world.http("bob").post("/v1/jobs", json={"spec": world.spec(team="a", user="mallory")})
    assert r.status_code == 403 and "user" in r.json()["detail"]
    r = world.http("root").post("/v1/jobs", json={"spec": world.spec(team="b", user="mallory")})
    assert r.status_code == 201 and r.json()["user"] == "mallory"
    assert r.json()["team"] == "b"


def test_dry_run_validates_estimates_and_predicts_without_queuing(world):
    r = world.http("bob").post("/v1/jobs/dry-run", json={"spec": world.spec(team="a")})
    d = r.json()
    assert r.status_code == 200 and d["valid"] and d["would_start_now"], d
    assert d["gpus"] == 1 and d["memory_per_gpu_mib"] > 0 and d["train_records"] == 400
    assert d["estimated_start_at"] == world.clock.now()
    # Team a's quota (2) is full: a dry run says it would wait and why.
    world.job(gpus=2)
    world.service.tick()
    d = world.http("bob").post("/v1/jobs/dry-run", json={"spec": world.spec(team="a")}).json()
    assert d["valid"] and not d["would_start_now"]
    assert d["pending_reason"].startswith("waiting for quota: team a uses 2/2 GPUs"), d
    # Invalid specs come back as problems, each naming its field; nothing is queued.
    d = world.http("bob").post("/v1/jobs/dry-run", json={"spec": world.spec(
        team="a", **{"hyperparameters.learning_rate": -1, "resources.gpus": 3})}).json()
    assert not d["valid"] and any(p.startswith("hyperparameters.learning_rate") for p in d["problems"])
    d = world.http("bob").post("/v1/jobs/dry-run", json={"spec": world.spec(team="a", **{"resources.gpus": 3})}).json()
    assert not d["valid"] and len(d["problems"]) == 1, d
    assert d["problems"][0].startswith("resources: can never run here:") and "team a may hold at most 2" in d["problems"][0], d
    assert [j.id for j in world.store.jobs()] == [1]


def test_unknown_keys_such_as_env_or_command_are_refused(world):
    for key, value in [("env", {"LD_PRELOAD": "/tmp/x.so"}), ("command", "rm -rf /"),
                       ("runtime_env", {"pip": ["evil"]}), ("resources.env", {"A": "1"})]:
        r = world.http("bob").post("/v1/jobs", json={"spec": world.spec(team="a", **{key: value})})
        assert r.status_code == 422, (key, r.text)
        assert r.headers["content-type"] == "application/problem+json"
        assert f"{key}: unknown field" in " ".join(r.json()["errors"]), r.json()
    assert world.store.jobs() == []


def test_paths_are_confined_to_storage_roots(tmp_path, tiny_model_dir):
    from tests.api.conftest import CLUSTER, REPO, ApiWorld

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jsonl").write_text('{"prompt": "a", "completion": "b"}\n' * 3)
    link = REPO / "examples" / "data" / f"escape-{os.getpid()}.jsonl"
    link.symlink_to(outside / "secret.jsonl")
    (tmp_path / "w").mkdir()
    w = ApiWorld(tmp_path / "w", cluster={**CLUSTER, "storage_roots": [str(REPO / "examples")]})
    try:
        ok = w.http("bob").post("/v1/jobs", json={"spec": w.spec(team="a")})
        assert ok.status_code == 201, ok.text
        cases = {
            "dataset.train": str(outside / "secret.jsonl"),  # plainly outside
            "dataset.validation": str(link),  # inside by name, outside after resolving the link
            "output": str(REPO / "examples" / ".." / "stolen"),  # '..'
        }
        for field, path in cases.items():
            r = w.http("bob").post("/v1/jobs", json={"spec": w.spec(team="a", **{field: path})})
            assert r.status_code == 422, r.text
            errors = " ".join(r.json()["errors"])
            assert errors.startswith(f"{field}: "), errors
            assert "outside the storage roots" in errors or "may not contain '..'" in errors
        assert "resolves to" in w.http("bob").post("/v1/jobs", json={"spec": w.spec(
            team="a", **{"dataset.validation": str(link)})}).json()["errors"][0]
    finally:
        link.unlink()
        w.close()


def test_list_filters_and_pages(world):
    ids = [world.job(team="a", user="bob").id for _ in range(5)] + [world.job(team="b", user="bea").id]
    world.clock.advance(100)
    late = world.job(team="a", user="ann").id
    root = world.sdk("root")
    assert [j.id for j in root.jobs()] == ids + [late]
    assert [j.id for j in root.jobs(team="b")] == [ids[5]]
    assert [j.id for j in root.jobs(user="ann")] == [late]
    assert [j.id for j in root.jobs(since=world.clock.now())] == [late]
    # Members see their own team only, whatever they ask for.
    assert [j.id for j in world.sdk("bob").jobs()] == ids[:5] + [late]
    assert world.sdk("bob").jobs(team="b") == []
    # Cursor pages: no job twice, none lost; offset works too.
    page = root.jobs_page(limit=3)
    assert [j.id for j in page.items] == ids[:3] and page.next_cursor == str(ids[2])
    page2 = root.jobs_page(limit=3, cursor=page.next_cursor)
    assert [j.id for j in page2.items] == ids[3:6] and page2.next_cursor is not None
    page3 = root.jobs_page(limit=3, cursor=page2.next_cursor)
    assert [j.id for j in page3.items] == [late] and page3.next_cursor is None
    assert [j.id for j in root.jobs_page(offset=5, limit=10).items] == [ids[5], late]
    r = world.http("root").get("/v1/jobs", params={"state": "NOPE", "limit": 0})
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    errs = r.json()["errors"]
    assert any(e.startswith("query.state.0:") for e in errs) and any(e.startswith("query.limit:") for e in errs)


def test_other_teams_jobs_are_404_exactly_like_missing_ones(world):
    theirs = world.job(team="b", user="bea")
    missing = world.http("bob").get("/v1/jobs/99999")
    hidden = world.http("bob").get(f"/v1/jobs/{theirs.id}")
    assert missing.status_code == hidden.status_code == 404
    assert hidden.json()["detail"] == f"job {theirs.id} does not exist"
    assert missing.json().keys() == hidden.json().keys()
    for verb in ("cancel", "hold", "release", "requeue"):
        assert world.http("bob").post(f"/v1/jobs/{theirs.id}/{verb}").status_code == 404
    assert world.http("bob").get(f"/v1/jobs/{theirs.id}/events").status_code == 404
    assert world.http("bob").get(f"/v1/jobs/{theirs.id}/logs").status_code == 404
    assert world.http("root").get(f"/v1/jobs/{theirs.id}").status_code == 200
    # A viewer of team a sees team a's jobs but may not act on them: 403, not 404.
    mine = world.job(team="a")
    assert world.http("vic").get(f"/v1/jobs/{mine.id}").status_code == 200
    assert world.http("vic").post(f"/v1/jobs/{mine.id}/cancel").status_code == 403
    assert world.store.get(theirs.id).state is S.QUEUED and not world.store.get(theirs.id).cancel_requested


def test_hold_release_and_cancel_while_held(world):
    bob = world.sdk("bob")
    job = world.job(gpus=1)
    assert bob.hold(job.id).state is S.HELD
    world.service.tick()
    assert world.store.get(job.id).state is S.HELD and world.executor.launches == []  # never scheduled
    r = world.http("bob").post(f"/v1/jobs/{job.id}/hold")
    assert r.status_code == 409 and "HELD" in r.json()["detail"]
    assert bob.release(job.id).state is S.QUEUED
    world.service.tick()
    assert world.store.get(job.id).state is S.STARTING
    r = world.http("bob").post(f"/v1/jobs/{job.id}/hold")
    assert r.status_code == 409 and "STARTING" in r.json()["detail"]
    other = world.job()
    bob.hold(other.id)
    assert bob.cancel(other.id).state is S.CANCELLED  # at once, no scheduler cycle needed
    states = [e.to_state for e in bob.events(other.id)]
    assert states == ["QUEUED", "HELD", "CANCELLED"]
    assert world.http("bob").post(f"/v1/jobs/{other.id}/cancel").status_code == 409
    # A queued job whose cancel is pending (the loop carries it out) cannot be held any more.
    third = world.job()
    bob.cancel(third.id)
    r = world.http("bob").post(f"/v1/jobs/{third.id}/hold")
    assert r.status_code == 409 and "being cancelled" in r.json()["detail"]
    world.service.tick()
    assert world.store.get(third.id).state is S.CANCELLED


def test_requeue_checkpoints_a_running_job_and_queues_it_again(world):
    bob = world.sdk("bob")
    job = world.job()
    world.service.tick()
    world.clock.advance(3)
    world.service.tick()
    assert world.store.get(job.id).state is S.RUNNING
    assert bob.requeue(job.id).state is S.PREEMPTING
    world.service.tick()  # the executor stops it at a checkpoint -> QUEUED, then it is placed again
    states = [e.to_state for e in bob.events(job.id)]
    assert states[:6] == ["QUEUED", "ADMITTED", "STARTING", "RUNNING", "PREEMPTING", "QUEUED"], states
    assert "requeued by bob" in bob.events(job.id)[4].reason
    queued = world.job()
    r = world.http("bob").post(f"/v1/jobs/{queued.id}/requeue")
    assert r.status_code == 409 and "only STARTING or RUNNING" in r.json()["detail"]


def test_queue_positions_reasons_and_estimated_start(world):
    first = world.job(gpus=2)
    world.service.tick()
    waiting = [world.job(gpus=1, name=f"w{i}") for i in range(2)]
    theirs = world.job(team="b", gpus=2, user="bea")
    world.service.tick()  # team b's job starts; team a's wait on their quota
    q = world.sdk("bob").queue()
    assert [e.id for e in q] == [w.id for w in waiting]
    assert [e.position for e in q] == [1, 2]
    assert all(e.pending_reason.startswith("waiting for quota: team a uses 2/2 GPUs") for e in q)
    assert world.store.get(theirs.id).state is S.STARTING and first.id not in [e.id for e in q]
    assert world.sdk("bea").queue() == []


def test_problem_json_for_validation_errors_with_field_paths(world):
    r = world.http("bob").post("/v1/jobs", json={"spec": world.spec(team="a", **{"hyperparameters.batch_size": "x"}),
                                                 "source": "job.yaml"})
    body = r.json()
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    assert body["status"] == 422 and body["title"] == "Invalid job spec"
    assert body["errors"][0].startswith("job.yaml: hyperparameters.batch_size:")
    r = world.http("bob").post("/v1/jobs", json={"nope": 1})
    body = r.json()
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    assert "body.spec: Field required" in body["errors"]
    assert {"name": "body.spec", "reason": "Field required"} in body["invalid_params"]
    r = world.http("bob").get("/v1/no-such-thing")
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
    r = world.http("bob").get("/v1/jobs/abc")
    assert r.status_code == 422 and r.json()["errors"][0].startswith("path.job_id:")
    # Found by the fuzzer: ids beyond 64 bits were a 500; unknown or repeated query parameters
    # were silently ignored (or the last one kept).
    r = world.http("bob").get("/v1/jobs/6285846791100047044640382124032")
    assert r.status_code == 422 and r.json()["errors"][0].startswith("path.job_id:")
    r = world.http("bob").get("/v1/jobs?cursor=0&=null&colour=red")
    assert r.status_code == 422 and [e.split(":")[0] for e in r.json()["errors"]] == [
        "query.(empty name)", "query.colour"]
    r = world.http("bob").get("/v1/usage?user=a&user=b")
    assert r.status_code == 422 and r.json()["errors"] == ["query.user: given 2 times; takes one value"]
    assert world.http("bob").get("/v1/jobs?state=QUEUED&state=HELD").status_code == 200  # lists repeat


def test_logs_stream_and_metrics_summary(world):
    job = world.job()
    world.service.tick()
    world.clock.advance(5)
    world.service.tick()
    text = world.http("bob").get(f"/v1/jobs/{job.id}/logs/stream").text
    assert "QUEUED -> ADMITTED" in text and "step 5/100" in text
    s = world.sdk("bob").metrics_summary()
    assert s.gpus_total == 4 and s.gpus_allocated == 1 and s.jobs_by_state == {"RUNNING": 1}
    assert [t.name for t in s.teams] == ["a"] and s.teams[0].gpus_in_use == 1
    assert [t.name for t in world.sdk("root").metrics_summary().teams] == ["a", "b"]


def test_queue_reads_what_the_scheduler_stored_and_plans_nothing(world):
    """GET /v1/queue shows each job's stored pending reason and estimated start (written by the
    service loop), ordered by estimated start, then priority and submission; it never runs the
    policy (a queue of thousands would cost a planning cycle per request)."""
    late, soon, unplanned = (world.job(gpus=1, name=n) for n in ("late", "soon", "unplanned"))
    world.store.update_many({late.id: {"pending_reason": "waiting for GPUs", "estimated_start_at": 2_000_000_000.0},
                             soon.id: {"pending_reason": "waiting for GPUs", "estimated_start_at": 1_900_000_000.0}})

    def no_planning(snap):
        raise AssertionError("the policy ran during GET /v1/queue")

    world.service.policy = no_planning
    q = world.sdk("bob").queue()
    assert [(e.id, e.position) for e in q] == [(soon.id, 1), (late.id, 2), (unplanned.id, 3)]
    assert [e.estimated_start_at for e in q] == [1_900_000_000.0, 2_000_000_000.0, None]
    assert [e.pending_reason for e in q] == ["waiting for GPUs", "waiting for GPUs", None]
    assert [e.id for e in world.sdk("bob").queue(team="a")] == [soon.id, late.id, unplanned.id]
    assert world.sdk("bob").queue(team="b") == []
