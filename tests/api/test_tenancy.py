"""Teams, cohorts, users and tokens through the API; their effect on scheduling; the admin token
bootstrap; the scheduler's view of DB-edited quotas."""
from __future__ import annotations

import stat

import pytest

from scheduler.auth import AuthError, SecretMismatch, TokenAuthority, load_or_create_secret
from scheduler.lifecycle import JobState as S
from scheduler.models import Role


def test_teams_seeded_from_config_then_edited_in_the_db(world):
    root = world.sdk("root")
    assert [(t.name, t.gpus, t.cohort) for t in root.teams()] == [("a", 2, "research"), ("b", 2, "research")]
    t = root.put_team("c", gpus=1)
    assert (t.name, t.gpus, t.cohort) == ("c", 1, None)
    assert root.patch_team("a", gpus=3, budget_usd=100.0).gpus == 3
    configs = world.store.team_configs(world.config)
    assert sorted(configs) == ["a", "b", "c"] and configs["a"].gpus == 3 and configs["a"].budget_usd == 100.0
    assert {q.team: q.nominal_gpus for q in world.service.views.quotas()} == {"a": 3, "b": 2, "c": 1}
    root.delete_team("c")
    assert [t.name for t in root.teams()] == ["a", "b"]
    # A member reads only their own team; another team's is 403 (team names are not secret).
    bob = world.http("bob")
    assert [t["name"] for t in bob.get("/v1/teams").json()] == ["a"]
    assert bob.get("/v1/teams/b").status_code == 403
    assert world.http("root").get("/v1/teams/zzz").status_code == 404


def test_a_quota_raised_through_the_api_lets_a_waiting_job_start(world):
    jobs = [world.job(gpus=1, name=f"j{i}") for i in range(3)]
    world.service.tick()
    assert [world.store.get(j.id).state for j in jobs] == [S.STARTING, S.STARTING, S.QUEUED]
    world.sdk("root").patch_team("a", gpus=3, lending_limit=0)
    world.service.tick()
    assert world.store.get(jobs[2].id).state is S.STARTING


def test_team_admin_changes_only_their_teams_limits(world):
    ann = world.http("ann")
    r = ann.patch("/v1/teams/a", json={"lending_limit": 1, "borrowing_limit": 2})
    assert r.status_code == 200 and (r.json()["lending_limit"], r.json()["borrowing_limit"]) == (1, 2)
    r = ann.patch("/v1/teams/a", json={"gpus": 8})
    assert r.status_code == 403 and "gpus" in r.json()["detail"]
    assert ann.patch("/v1/teams/b", json={"lending_limit": 0}).status_code == 403
    assert ann.put("/v1/teams/a", json={"gpus": 8}).status_code == 403
    assert world.store.team_configs(world.config)["a"].gpus == 2
    # Within cohort rules: borrowing needs a cohort to borrow from.
    world.sdk("root").patch_team("a", cohort=None)
    r = ann.patch("/v1/teams/a", json={"borrowing_limit": 1})
    assert r.status_code == 422 and r.json()["errors"][0].startswith("borrowing_limit:")


def test_team_and_cohort_input_errors_name_the_field(world):
    root = world.http("root")
    r = root.put("/v1/teams/c", json={"gpus": -1, "cohort": "nope", "colour": "red"})
    assert r.status_code == 422
    fields = {e.split(":")[0] for e in r.json()["errors"]}
    assert fields == {"body.gpus", "body.colour"}, r.json()
    r = root.put("/v1/teams/c", json={"gpus": 1, "cohort": "nope", "gpus_by_model": {"A100": 1}})
    assert r.status_code == 422 and [e.split(":")[0] for e in r.json()["errors"]] == ["cohort", "gpus_by_model.A100"]
    assert root.put("/v1/teams/Bad_Name", json={"gpus": 1}).status_code == 422
    assert root.put("/v1/cohorts/child", json={"parent": "research"}).status_code == 200
    r = root.put("/v1/cohorts/research", json={"parent": "child"})
    assert r.status_code == 422 and "cycle" in r.json()["errors"][0]
    r = root.delete("/v1/cohorts/research")
    assert r.status_code == 409 and "a, b, child" in r.json()["detail"]
    world.job(team="b", user="bea")
    r = root.delete("/v1/teams/b")
    assert r.status_code == 409 and "cancel them first" in r.json()["detail"]


def test_tokens_created_listed_and_revoked_by_scope(world):
    root, ann, bob = world.sdk("root"), world.sdk("ann"), world.sdk("bob")
    created = ann.create_token("carl", "a", Role.viewer, description="ci")
    assert created.token.startswith(f"shoal_{created.id}_") and created.expires_at is not None
    from scheduler.client import Client

    carl = Client(world.url, token=created.token)
    assert carl.whoami().role is Role.viewer and carl.whoami().team == "a"
    # Team admins may not mint admin tokens or tokens for other teams.
    for body in ({"user": "x", "team": "a", "role": "admin"}, {"user": "x", "team": "b", "role": "member"}):
        assert world.http("ann").post("/v1/tokens", json=body).status_code == 403
    assert world.http("ann").post("/v1/tokens", json={"user": "bea", "team": "a"}).status_code == 403
    # Listing: admin all, team admin their team's, member their own.
    assert {t.user for t in bob.tokens()} == {"bob"}
    assert {t.user for t in ann.tokens()} == {"ann", "bob", "vic", "carl"}
    assert {t.user for t in root.tokens()} == {"root", "ann", "bob", "vic", "bea", "carl"}
    bea_token = next(t.id for t in root.tokens() if t.user == "bea")
    assert world.http("bob").delete(f"/v1/tokens/{bea_token}").status_code == 404
    assert world.http("ann").delete(f"/v1/tokens/{bea_token}").status_code == 404
    assert bob.revoke_token(next(t.id for t in bob.tokens())).revoked_at is not None
    assert world.http("bob").get("/v1/whoami").status_code == 401
    # A user's role changes take effect on their tokens at once; a deleted user's tokens stop.
    root.put_user("carl", "a", Role.member)
    assert carl.whoami().role is Role.member
    root.delete_user("carl")
    assert world.http(None).get("/v1/whoami", headers={"Authorization": f"Bearer {created.token}"}).status_code == 401


def test_admin_token_bootstrap_writes_a_private_file_once(tmp_path, world):
    secret = load_or_create_secret(tmp_path / "home")
    assert stat.S_IMODE((tmp_path / "home" / "server.secret").stat().st_mode) == 0o600
    assert load_or_create_secret(tmp_path / "home") == secret
    auth = TokenAuthority(world.store, secret)
    path = tmp_path / "home" / "admin.token"
    assert auth.ensure_admin_token(path) is True
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = path.read_text().strip()
    assert auth.verify(token).is_admin
    assert auth.ensure_admin_token(path) is False and path.read_text().strip() == token
    # Another server secret (e.g. the secret file was lost): the old token no longer verifies,
    # and a start writes a new one.
    other = TokenAuthority(world.store, b"another")
    assert other.ensure_admin_token(path) is True and path.read_text().strip() != token


def test_a_server_with_another_secret_is_refused_until_it_rotates(world):
    """Replicas sharing a database must share the secret: the second secret is refused with a
    message naming the fix, and --rotate-secret adopts it while revoking every older token."""
    first = TokenAuthority(world.store, b"first-secret")
    first.check_secret()
    first.check_secret()  # same secret again: fine
    token, rec = first.create("alice", "nlp", Role.member)
    other = TokenAuthority(world.store, b"second-secret")
    with pytest.raises(SecretMismatch, match="SHOAL_SECRET.*--rotate-secret"):
        other.check_secret()
    assert first.rotate_secret() == 0  # the recorded secret: nothing to revoke
    live = [t for t in world.store.tokens() if t.revoked_at is None]
    assert other.rotate_secret() == len(live) and len(live) >= 1
    other.check_secret()
    assert all(t.revoked_at is not None for t in world.store.tokens())
    with pytest.raises(SecretMismatch):
        first.check_secret()
    with pytest.raises(AuthError, match=f"token {rec.id} was revoked|unknown token"):
        first.verify(token)


def test_drain_keeps_new_jobs_off_a_node(world):
    root = world.sdk("root")
    n = root.drain("node-1", "disk swap")
    assert n.drained and not n.schedulable and n.drain_reason == "disk swap"
    job = world.job()
    world.service.tick()
    assert world.store.get(job.id).state is S.QUEUED
    assert world.http("root").post("/v1/nodes/nope/drain", json={}).status_code == 404
    assert not root.undrain("node-1").drained
    world.service.tick()
    assert world.store.get(job.id).state is S.STARTING
    gpus = world.sdk("bea").nodes()[0].gpus
    assert sum(g.hidden_jobs for g in gpus) == 1 and all(g.jobs == [] for g in gpus)  # team a's job hidden
    assert [j for g in world.sdk("bob").nodes()[0].gpus for j in g.jobs] == [job.id]
