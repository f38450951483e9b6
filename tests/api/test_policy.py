"""Every endpoint × every role, from the table `scheduler.api.POLICY`: an allowed role is never
refused (no 401/403), a role the table leaves out gets 403, no token gets 401. A route added to
the app without a table entry, or without an example request here, fails this module."""
from __future__ import annotations

import itertools

import pytest
from fastapi.routing import APIRoute

from scheduler.api import POLICY
from scheduler.models import Role

_n = itertools.count(1)


def _fresh(world, what: str) -> str:
    """A new resource of team a (or global) for a call that consumes it."""
    i = next(_n)
    if what == "team":
        from scheduler.spec import TeamConfig
        world.store.put_team(f"tmp{i}", TeamConfig(gpus=0), world.clock.now())
        return f"tmp{i}"
    if what == "cohort":
        from scheduler.spec import CohortConfig
        world.store.put_cohort(f"c{i}", CohortConfig(), world.clock.now())
        return f"c{i}"
    if what == "user":
        world.store.put_user(f"u{i}", "a", "member", world.clock.now())
        return f"u{i}"
    if what == "token":  # a token of team a's member bob: visible to bob, ann (team admin) and root
        _, rec = world.auth.create("bob", "a", Role.member)
        return rec.id
    raise AssertionError(what)


def _running(world):
    job = world.job()
    world.service.tick()  # admitted and launched on the in-memory executor
    world.clock.advance(2)
    world.service.tick()  # progress seen: RUNNING
    return world.store.get(job.id)


# (method, path) -> world -> (path to call, JSON body or None)
EXAMPLES = {
    ("GET", "/healthz"): lambda w: ("/healthz", None),
    ("GET", "/metrics"): lambda w: ("/metrics", None),
    ("GET", "/v1/whoami"): lambda w: ("/v1/whoami", None),
    ("POST", "/v1/jobs"): lambda w: ("/v1/jobs", {"spec": w.spec(team="a", user=None)}),
    ("POST", "/v1/jobs/dry-run"): lambda w: ("/v1/jobs/dry-run", {"spec": w.spec(team="a", user=None)}),
    ("GET", "/v1/jobs"): lambda w: ("/v1/jobs", None),
    ("GET", "/v1/jobs/{job_id}"): lambda w: (f"/v1/jobs/{w.job().id}", None),
    ("POST", "/v1/jobs/{job_id}/cancel"): lambda w: (f"/v1/jobs/{w.job().id}/cancel", None),
    ("POST", "/v1/jobs/{job_id}/hold"): lambda w: (f"/v1/jobs/{w.job().id}/hold", None),
    ("POST", "/v1/jobs/{job_id}/release"): lambda w: (f"/v1/jobs/{w.job().id}/release", None),
    ("POST", "/v1/jobs/{job_id}/requeue"): lambda w: (f"/v1/jobs/{_running(w).id}/requeue", None),
    ("GET", "/v1/jobs/{job_id}/events"): lambda w: (f"/v1/jobs/{w.job().id}/events", None),
    ("GET", "/v1/jobs/{job_id}/logs"): lambda w: (f"/v1/jobs/{w.job().id}/logs", None),
    ("GET", "/v1/jobs/{job_id}/logs/stream"): lambda w: (f"/v1/jobs/{w.job().id}/logs/stream", None),
    ("GET", "/v1/queue"): lambda w: ("/v1/queue", None),
    ("GET", "/v1/metrics/summary"): lambda w: ("/v1/metrics/summary", None),
    ("GET", "/v1/usage"): lambda w: ("/v1/usage", None),
    ("GET", "/v1/teams"): lambda w: ("/v1/teams", None),
    ("GET", "/v1/teams/{name}"): lambda w: ("/v1/teams/a", None),
    ("PUT", "/v1/teams/{name}"): lambda w: ("/v1/teams/a", {"gpus": 2, "cohort": "research"}),
    ("PATCH", "/v1/teams/{name}"): lambda w: ("/v1/teams/a", {"lending_limit": 1}),
    ("DELETE", "/v1/teams/{name}"): lambda w: (f"/v1/teams/{_fresh(w, 'team')}", None),
    ("GET", "/v1/cohorts"): lambda w: ("/v1/cohorts", None),
    ("PUT", "/v1/cohorts/{name}"): lambda w: ("/v1/cohorts/dev", {"parent": None}),
    ("DELETE", "/v1/cohorts/{name}"): lambda w: (f"/v1/cohorts/{_fresh(w, 'cohort')}", None),
    ("GET", "/v1/users"): lambda w: ("/v1/users", None),
    ("PUT", "/v1/users/{name}"): lambda w: ("/v1/users/newbie", {"team": "a", "role": "viewer"}),
    ("DELETE", "/v1/users/{name}"): lambda w: (f"/v1/users/{_fresh(w, 'user')}", None),
    ("POST", "/v1/tokens"): lambda w: ("/v1/tokens", {"user": "carl", "team": "a", "role": "member"}),
    ("GET", "/v1/tokens"): lambda w: ("/v1/tokens", None),
    ("DELETE", "/v1/tokens/{token_id}"): lambda w: (f"/v1/tokens/{_fresh(w, 'token')}", None),
    ("GET", "/v1/nodes"): lambda w: ("/v1/nodes", None),
    ("POST", "/v1/nodes/{name}/drain"): lambda w: ("/v1/nodes/node-1/drain", {"reason": "maintenance"}),
    ("POST", "/v1/nodes/{name}/undrain"): lambda w: ("/v1/nodes/node-1/undrain", None),
}

# One principal per role, all in team a except the cluster admin.
BY_ROLE = {Role.admin: "root", Role.team_admin: "ann", Role.member: "bob", Role.viewer: "vic"}


def _routes(app) -> set[tuple[str, str]]:
    return {(m, r.path) for r in app.routes if isinstance(r, APIRoute) for m in r.methods}


def test_every_route_has_a_policy_and_an_example(world):
    routes = _routes(world.app)
    assert routes - set(POLICY) == set(), "routes missing from scheduler.api.POLICY"
    assert set(POLICY) - routes == set(), "POLICY names routes the app does not have"
    assert routes - set(EXAMPLES) == set(), "routes without an example request in this test"


def test_the_app_refuses_a_route_without_policy(world):
    from fastapi import FastAPI

    import scheduler.api as api

    saved = dict(api.POLICY)
    api.POLICY.pop(("GET", "/v1/nodes"))
    try:
        with pytest.raises(RuntimeError, match="/v1/nodes"):
            api.create_app(world.service, __import__("prometheus_client").CollectorRegistry(), auth=world.auth)
    finally:
        api.POLICY.clear()
        api.POLICY.update(saved)
    assert isinstance(world.app, FastAPI)


@pytest.mark.parametrize("key", sorted(POLICY), ids=lambda k: f"{k[0]} {k[1]}")
def test_each_role_is_allowed_or_refused_as_the_table_says(world, key):
    method, _ = key
    rule = POLICY[key]
    for role, who in [*BY_ROLE.items(), (None, None)]:
        path, body = EXAMPLES[key](world)
        r = world.http(who).request(method, path, json=body)
        label = f"{method} {path} as {role.value if role else 'anonymous'}: {r.status_code} {r.text[:300]}"
        if rule.roles is None:
            assert r.status_code < 400, label
        elif role is None:
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), label
            assert r.headers["content-type"] == "application/problem+json", label
        elif role in rule.roles:
            assert r.status_code not in (401, 403) and r.status_code < 500, label
        else:
            assert r.status_code == 403, label
            assert r.json()["title"] == "Forbidden", label


def test_a_bad_expired_or_revoked_token_is_401(world):
    assert world.http(None).get("/v1/whoami", headers={"Authorization": "Bearer shoal_00000000_nope"}).status_code == 401
    token, rec = world.auth.create("tmp", "a", Role.member, ttl_s=60)
    h = {"Authorization": f"Bearer {token}"}
    assert world.http(None).get("/v1/whoami", headers=h).json()["user"] == "tmp"
    world.clock.advance(61)
    r = world.http(None).get("/v1/whoami", headers=h)
    assert r.status_code == 401 and "expired" in r.json()["detail"]
    token, rec = world.auth.create("tmp2", "a", Role.member)
    assert world.http("root").delete(f"/v1/tokens/{rec.id}").json()["revoked_at"] is not None
    r = world.http(None).get("/v1/whoami", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 401 and "revoked" in r.json()["detail"]


def test_tokens_are_stored_as_keyed_hashes_only(world):
    import sqlite3

    db = sqlite3.connect(world.store.url.removeprefix("sqlite:///"))
    stored = " ".join(str(v) for row in db.execute("select * from api_tokens") for v in row)
    db.close()
    for token in world.tokens.values():
        assert token not in stored and token.split("_", 2)[2] not in stored
    assert world.auth.digest(world.tokens["bob"]) in stored
