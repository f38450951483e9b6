"""Usage and cost reports over the ledger: GPU-hours and $ by team / user / job, JSON and CSV,
confined to the caller's team for non-admins."""
import csv
import io

import pytest


def test_usage_report_by_team_user_and_job_in_json_and_csv(world):
    t0 = world.clock.now()
    a = world.job(team="a", gpus=1, user="bob")
    b = world.job(team="b", gpus=2, user="bea")
    world.service.tick()  # both admitted at t0: the ledger opens one record per attempt
    world.clock.advance(1800)
    world.service.tick()  # both finish at t0 + 1800 s (the in-memory run lasts 100 s of clock)
    root = world.sdk("root")
    rep = root.usage(since=t0 - 10, until=t0 + 7200, by=["team"])
    got = {r.key["team"]: (r.gpu_hours, r.cost_usd, r.jobs) for r in rep.rows}
    assert got == {"a": pytest.approx((0.5, 1.0, 1)), "b": pytest.approx((1.0, 2.0, 1))}  # $2 per GPU-hour
    assert rep.total_gpu_hours == pytest.approx(1.5) and rep.total_cost_usd == pytest.approx(3.0)
    # A window cutting the runs in half charges half.
    half = root.usage(since=t0 + 900, until=t0 + 7200, by=["team", "user", "job_id"])
    assert [(r.key, round(r.gpu_hours, 6)) for r in half.rows] == [
        ({"team": "a", "user": "bob", "job_id": str(a.id)}, 0.25), ({"team": "b", "user": "bea", "job_id": str(b.id)}, 0.5)]
    text = world.http("root").get("/v1/usage", params={"since": t0 - 10, "until": t0 + 7200, "by": ["user", "gpu_model"],
                                                       "format": "csv"})
    assert text.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(text.text)))
    assert [(r["user"], r["gpu_model"], float(r["gpu_hours"]), float(r["cost_usd"])) for r in rows] == [
        ("bea", "H100 80GB", 1.0, 2.0), ("bob", "H100 80GB", 0.5, 1.0)]
    # Members and viewers see their own team's usage only; asking for another team is 403.
    assert [r.key["team"] for r in world.sdk("vic").usage(since=t0 - 10, until=t0 + 7200).rows] == ["a"]
    assert world.http("bob").get("/v1/usage", params={"team": "b"}).status_code == 403
    r = world.http("root").get("/v1/usage", params={"by": "colour"})
    assert r.status_code == 422 and r.json()["errors"][0].startswith("query.by.0:")
    r = world.http("root").get("/v1/usage", params={"since": t0, "until": t0 - 1})
    assert r.status_code == 422 and r.json()["errors"][0].startswith("since:")
