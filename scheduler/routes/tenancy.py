"""Teams, cohorts, users and tokens (admin CRUD; members read their own team)."""

from dataclasses import asdict
from typing import Annotated

from fastapi import Depends, FastAPI
from fastapi.responses import Response

from scheduler.api import Problem, _Cached, _path_name, _path_token, _path_user
from scheduler.auth import TEAM_ADMIN_FIELDS, Principal, TokenAuthority
from scheduler.models import (
    CohortIn, CohortOut, Role, TeamIn, TeamOut, TeamPatch, TokenCreated, TokenCreateIn, TokenOut, UserIn,
    UserOut,
)
from scheduler.service import Service
from scheduler.spec import CohortConfig, TeamConfig


def register(app: FastAPI, service: Service, auth: TokenAuthority, Who, teams_now: _Cached,
             team_out, live_jobs) -> None:
    store, clock = service.store, service.clock

    def teams() -> dict[str, TeamConfig]:
        return teams_now.get()

    def changed() -> None:
        teams_now.clear()

    def check_team(name: str, t: TeamConfig) -> None:
        problems = []
        if t.cohort is not None and t.cohort not in store.cohort_configs(service.config):
            problems.append(f"cohort: {t.cohort!r} is not a cohort (create it with PUT /v1/cohorts/{t.cohort})")
        for model in t.gpus_by_model:
            if model not in service.config.gpu_models:
                problems.append(f"gpus_by_model.{model}: not a GPU model of this cluster "
                                f"(known: {', '.join(sorted(service.config.gpu_models))})")
        if problems:
            raise Problem(422, "Invalid team", errors=problems)

    def get_team(p: Principal, name: str) -> TeamConfig:
        if not p.sees_team(name):
            raise Problem(403, "Forbidden", f"you belong to team {p.team!r}, not {name!r}")
        t = teams().get(name)
        if t is None:
            raise Problem(404, "Team not found", f"team {name!r} does not exist")
        return t

    Name = Annotated[str, Depends(_path_name)]

    @app.get("/v1/teams")
    def list_teams(p: Who) -> list[TeamOut]:
        """Teams with quota, cohort, budget and current use (non-admins: their own team)."""
        jobs = live_jobs()
        return [team_out(n, t, jobs) for n, t in teams().items() if p.sees_team(n)]

    @app.get("/v1/teams/{name}")
    def read_team(name: Name, p: Who) -> TeamOut:
        return team_out(name, get_team(p, name), live_jobs())

    @app.put("/v1/teams/{name}")
    def put_team(name: Name, body: TeamIn, p: Who) -> TeamOut:
        """Create or replace a team (its quota, cohort, limits, weight and budget)."""
        t = TeamConfig.model_validate(body.model_dump())
        check_team(name, t)
        store.put_team(name, t, clock.now())
        changed()
        return team_out(name, t, live_jobs())

    @app.patch("/v1/teams/{name}")
    def patch_team(name: Name, body: TeamPatch, p: Who) -> TeamOut:
        """Change some of a team's settings. A team admin may change only their own team's
        `lending_limit` and `borrowing_limit` (within its cohort)."""
        cur = get_team(p, name)
        changes = body.model_dump(exclude_unset=True)
        if not p.is_admin:
            bad = sorted(set(changes) - TEAM_ADMIN_FIELDS)
            if bad:
                raise Problem(403, "Forbidden", f"team admins may change only {', '.join(sorted(TEAM_ADMIN_FIELDS))}; "
                              f"not {', '.join(bad)} (ask a cluster admin)")
            if changes.get("borrowing_limit") is not None and cur.cohort is None:
                raise Problem(422, "Invalid team", errors=["borrowing_limit: the team is in no cohort; "
                                                           "there is nobody to borrow from"])
        for k in ("gpus", "weight", "gpus_by_model"):
            if k in changes and changes[k] is None:
                raise Problem(422, "Invalid team", errors=[f"{k}: may not be null"])
        t = TeamConfig.model_validate({**cur.model_dump(), **changes})
        check_team(name, t)
        store.put_team(name, t, clock.now())
        changed()
        return team_out(name, t, live_jobs())

    @app.delete("/v1/teams/{name}", status_code=204)
    def delete_team(name: Name, p: Who) -> Response:
        if name not in teams():
            raise Problem(404, "Team not found", f"team {name!r} does not exist")
        busy = [j.id for j in live_jobs() if j.team == name]
        if busy:
            raise Problem(409, "Team has jobs", f"team {name!r} has queued or running jobs {busy[:10]}; cancel them first")
        store.delete_team(name, clock.now())
        changed()
        return Response(status_code=204)

    @app.get("/v1/cohorts")
    def list_cohorts(p: Who) -> list[CohortOut]:
        t = teams()
        return [CohortOut(name=n, parent=c.parent, teams=sorted(k for k, v in t.items() if v.cohort == n))
                for n, c in store.cohort_configs(service.config).items()]

    @app.put("/v1/cohorts/{name}")
    def put_cohort(name: Name, body: CohortIn, p: Who) -> CohortOut:
        cohorts = store.cohort_configs(service.config)
        if body.parent is not None and body.parent not in cohorts:
            raise Problem(422, "Invalid cohort", errors=[f"parent: {body.parent!r} is not a cohort"])
        parent = body.parent
        while parent is not None:  # no cycles
            if parent == name:
                raise Problem(422, "Invalid cohort", errors=[f"parent: {body.parent!r} would make a cycle"])
            parent = cohorts[parent].parent if parent in cohorts else None
        store.put_cohort(name, CohortConfig(parent=body.parent), clock.now())
        changed()
        return CohortOut(name=name, parent=body.parent, teams=sorted(k for k, v in teams().items() if v.cohort == name))

    @app.delete("/v1/cohorts/{name}", status_code=204)
    def delete_cohort(name: Name, p: Who) -> Response:
        cohorts = store.cohort_configs(service.config)
        if name not in cohorts:
            raise Problem(404, "Cohort not found", f"cohort {name!r} does not exist")
        users = sorted([k for k, v in teams().items() if v.cohort == name] +
                       [k for k, v in cohorts.items() if v.parent == name])
        if users:
            raise Problem(409, "Cohort in use", f"cohort {name!r} is used by {', '.join(users)}")
        store.delete_cohort(name, clock.now())
        changed()
        return Response(status_code=204)

    def user_out(u) -> UserOut:
        return UserOut(name=u.name, team=u.team, role=u.role, created_at=u.created_at)

    @app.get("/v1/users")
    def list_users(p: Who) -> list[UserOut]:
        return [user_out(u) for u in store.users(team=None if p.is_admin else p.team)]

    def check_membership(team: str | None, role: Role) -> None:
        if role is not Role.admin and team is None:
            raise Problem(422, "Invalid user", errors=[f"team: required for role {role.value}"])
        if team is not None and team not in teams():
            raise Problem(422, "Invalid user", errors=[f"team: {team!r} is not a team"])

    @app.put("/v1/users/{name}")
    def put_user(name: Annotated[str, Depends(_path_user)], body: UserIn, p: Who) -> UserOut:
        """Create a user or change their team and role (their tokens follow at once)."""
        check_membership(body.team, body.role)
        u = store.put_user(name, body.team, body.role.value, clock.now())
        auth.forget()
        return user_out(u)

    @app.delete("/v1/users/{name}", status_code=204)
    def delete_user(name: Annotated[str, Depends(_path_user)], p: Who) -> Response:
        """Disable a user and revoke their tokens."""
        if not store.delete_user(name, clock.now()):
            raise Problem(404, "User not found", f"user {name!r} does not exist")
        auth.forget()
        return Response(status_code=204)

    def token_out(t) -> TokenOut:
        return TokenOut(**asdict(t))

    @app.post("/v1/tokens", status_code=201)
    def create_token(body: TokenCreateIn, p: Who) -> TokenCreated:
        """A new token for `user` (created, or moved to this team and role). The token is in
        this answer only; the server keeps a keyed hash."""
        if not p.is_admin and (body.role is Role.admin or body.team != p.team):
            raise Problem(403, "Forbidden", f"team admins create non-admin tokens for team {p.team!r} only")
        check_membership(body.team, body.role)
        existing = store.get_user(body.user)
        if not p.is_admin and existing is not None and existing.team not in (None, p.team) \
                and existing.role != "disabled":
            raise Problem(403, "Forbidden", f"user {body.user!r} belongs to another team")
        token, rec = auth.create(body.user, body.team, body.role, ttl_s=body.expires_in_s,
                                 description=body.description)
        return TokenCreated(**asdict(rec), token=token, team=body.team, role=body.role)

    def visible_tokens(p: Principal):
        if p.is_admin:
            return store.tokens()
        if p.role is Role.team_admin:
            return store.tokens(team=p.team)
        return store.tokens(user=p.user)

    @app.get("/v1/tokens")
    def list_tokens(p: Who) -> list[TokenOut]:
        return [token_out(t) for t in visible_tokens(p)]

    @app.delete("/v1/tokens/{token_id}")
    def revoke_token(token_id: Annotated[str, Depends(_path_token)], p: Who) -> TokenOut:
        if token_id not in {t.id for t in visible_tokens(p)}:
            raise Problem(404, "Token not found", f"token {token_id} does not exist")
        rec = store.revoke_token(token_id, clock.now())
        auth.forget()
        return token_out(rec)

