"""Usage and cost reports (sacct/sreport-like), JSON or CSV."""

import csv
import io
from typing import Annotated, Literal

from fastapi import FastAPI, Query
from fastapi.responses import Response

from scheduler.api import Problem
from scheduler.models import UsageGroupOut, UsageReport
from scheduler.service import Service


def register(app: FastAPI, service: Service, Who) -> None:
    from scheduler.accounting import GROUP_KEYS, period_start, summarize

    store, clock = service.store, service.clock
    GroupKey = Literal[GROUP_KEYS]  # type: ignore[valid-type]

    @app.get("/v1/usage", responses={200: {"content": {"text/csv": {"schema": {"type": "string"}}},
                                          "description": "the report (JSON, or CSV with format=csv)"}})
    def usage(p: Who, since: Annotated[float | None, Query(ge=0, le=1e11, description="Unix time; default: start "
                                                             "of the current budget period")] = None,
              until: Annotated[float | None, Query(ge=0, le=1e11, description="Unix time; default: now")] = None,
              by: Annotated[list[GroupKey] | None, Query(description="group by (repeatable); default team")] = None,
              team: Annotated[str | None, Query(max_length=63)] = None,
              user: Annotated[str | None, Query(max_length=63)] = None,
              format: Literal["json", "csv"] = "json") -> UsageReport:
        """GPU-hours and $ by team / user / job / GPU model / node over a window, from the usage
        ledger (one record per job attempt; running attempts count up to `until`). Non-admins
        report on their own team only."""
        now = clock.now()
        until_ = now if until is None else until
        since_ = period_start(now, service.config.scheduler.budget_period) if since is None else since
        if since_ >= until_:
            raise Problem(422, "Invalid window", errors=[f"since: must be before until ({since_} >= {until_})"])
        if not p.is_admin:
            if team not in (None, p.team):
                raise Problem(403, "Forbidden", f"you belong to team {p.team!r}, not {team!r}")
            team = p.team
        keys = tuple(dict.fromkeys(by or ["team"]))
        rows = summarize(store.usage(since=since_, until=until_, team=team, user=user), keys, since_, until_)
        report = UsageReport(since=since_, until=until_, by=list(keys),
                             rows=[UsageGroupOut(key=r.key, gpu_hours=r.gpu_hours, cost_usd=r.cost_usd, jobs=r.jobs)
                                   for r in rows],
                             total_gpu_hours=sum(r.gpu_hours for r in rows), total_cost_usd=sum(r.cost_usd for r in rows))
        if format == "json":
            return report
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow([*keys, "gpu_hours", "cost_usd", "jobs"])
        for r in report.rows:
            w.writerow([*(r.key[k] for k in keys), f"{r.gpu_hours:.6f}", f"{r.cost_usd:.6f}", r.jobs])
        return Response(buf.getvalue(), media_type="text/csv")

