"""Admin commands: team quotas and budgets, API tokens, whoami, drain and undrain."""
from __future__ import annotations

import time
from typing import Optional

import typer
from rich.table import Table

from scheduler.models import Role
from scheduler.client import ShoalError
from scheduler.cli.common import (_ask, _client, _emit, _error, _fail, _for_each, _table, _ts, app,
    out, OUTPUT, Output)
from scheduler.cli.server import _store_url


def _set_drain(node: str, drained: bool, db: Optional[str], reason: str) -> None:
    from scheduler.nodes import find_node
    from scheduler.store import Store

    store = Store(_store_url(db))
    try:
        rec = find_node(list(store.nodes().values()), node)
        store.set_drained(rec.node_id, drained, reason=reason if drained else None, now=time.time())
        out.print(f"Node {rec.name} ({rec.node_id[:12]}) " + (
            "drained: no new jobs land there; its running jobs checkpoint and move" if drained
            else "undrained: it takes jobs again"))
    except KeyError as e:
        _error(e.args[0])
        raise typer.Exit(2) from None
    finally:
        store.close()


quota_app = typer.Typer(help="Team quotas and budgets (sshare / sacctmgr).", no_args_is_help=True)


token_app = typer.Typer(help="API tokens: create (shown once), list, revoke.", no_args_is_help=True)


app.add_typer(quota_app, name="quota")


app.add_typer(token_app, name="token")


def _quota_table(teams) -> Table:
    t = _table("TEAM", "QUOTA", "IN USE", "QUEUED", "RUNNING", "PENDING", "COHORT", "BORROW", "LEND", "WEIGHT",
               "BUDGET $")
    for x in teams:
        by = ",".join(f"{m}:{n}" for m, n in x.gpus_by_model.items())
        t.add_row(x.name, f"{x.gpus}" + (f" ({by})" if by else ""), str(x.gpus_in_use), str(x.gpus_queued),
                  str(x.jobs_running), str(x.jobs_queued), x.cohort or "-",
                  "any" if x.borrowing_limit is None else str(x.borrowing_limit),
                  "all" if x.lending_limit is None else str(x.lending_limit), f"{x.weight:g}",
                  "-" if x.budget_usd is None else f"{x.budget_usd:,.2f}")
    return t


@quota_app.command("show")
def quota_show(team: Optional[str] = typer.Argument(None, help="one team (default: every team you can see)"),
               output: Output = OUTPUT) -> None:
    """Quota, use and budget per team."""
    client = _client()
    teams = _ask(lambda: [client.team(team)] if team else client.teams())
    if not _emit(teams, output):
        out.print(_quota_table(teams))


@quota_app.command("set")
def quota_set(team: str,
              gpus: Optional[int] = typer.Option(None, help="nominal GPUs (cluster admin)"),
              borrowing_limit: Optional[int] = typer.Option(None, help="most GPUs above nominal to borrow"),
              lending_limit: Optional[int] = typer.Option(None, help="most idle nominal GPUs to lend"),
              cohort: Optional[str] = typer.Option(None, help="cohort (cluster admin)"),
              weight: Optional[float] = typer.Option(None, help="fair-share weight (cluster admin)"),
              budget: Optional[float] = typer.Option(None, "--budget-usd", help="$ per budget period (cluster admin)"),
              create: bool = typer.Option(False, "--create", help="create the team (cluster admin; needs --gpus)"),
              output: Output = OUTPUT) -> None:
    """Change a team's quota, limits, cohort, weight or budget (only the options given)."""
    fields = {k: v for k, v in {"gpus": gpus, "borrowing_limit": borrowing_limit, "lending_limit": lending_limit,
                                "cohort": cohort, "weight": weight, "budget_usd": budget}.items() if v is not None}
    if not fields:
        _error("nothing to change: give at least one of --gpus, --borrowing-limit, --lending-limit, --cohort, "
               "--weight, --budget-usd")
        raise typer.Exit(2)
    client = _client()
    team_out = _ask(lambda: client.put_team(team, **fields) if create else client.patch_team(team, **fields))
    if not _emit(team_out, output):
        out.print(_quota_table([team_out]))


@token_app.command("create")
def token_create(user: str = typer.Option(..., "--user", "-u"),
                 team: Optional[str] = typer.Option(None, "--team", "-t", help="required unless --role admin"),
                 role: Role = typer.Option(Role.member, "--role", "-r"),
                 expires_days: float = typer.Option(90, "--expires-days", help="0: never expires"),
                 description: str = typer.Option("", "--description", "-d"),
                 output: Output = OUTPUT) -> None:
    """Create a token for a user (created or moved to TEAM with ROLE). It is shown only now."""
    client = _client()
    try:
        tok = client.create_token(user, team, role, expires_in_s=expires_days * 86400 if expires_days else None,
                                  description=description)
    except ShoalError as e:
        raise _fail(e) from None
    if not _emit(tok, output):
        out.print(f"Token {tok.id} for {tok.user} (team {tok.team or '-'}, role {tok.role.value}, expires "
                  f"{_ts(tok.expires_at) if tok.expires_at else 'never'}). It is shown only this once:",
                  highlight=False)
        out.out(tok.token, highlight=False)
        out.print("Use it with SHOAL_TOKEN=<token>, or `token: <token>` in ~/.config/shoal/config.yaml",
                  highlight=False)


@token_app.command("list")
def token_list(output: Output = OUTPUT) -> None:
    """Tokens you can see (admins: all; team admins: their team's; others: their own)."""
    client = _client()
    toks = _ask(client.tokens)
    if not _emit(toks, output):
        t = _table("ID", "USER", "CREATED", "EXPIRES", "REVOKED", "DESCRIPTION", fold="DESCRIPTION")
        for x in toks:
            t.add_row(x.id, x.user, _ts(x.created_at), _ts(x.expires_at) if x.expires_at else "never",
                      _ts(x.revoked_at), x.description)
        out.print(t)


@token_app.command("revoke")
def token_revoke(token_ids: list[str]) -> None:
    """Revoke tokens by id (the 8 hex characters after `shoal_`)."""
    client = _client()

    def revoke(tid: str) -> str:
        client.revoke_token(tid)
        return f"Token {tid} revoked"

    _for_each(token_ids, "token", revoke)


@app.command()
def whoami(output: Output = OUTPUT) -> None:
    """The user, team and role of the token in use."""
    client = _client()
    me = _ask(client.whoami)
    if not _emit(me, output):
        out.print(f"{me.user} (team {me.team or '-'}, role {me.role.value}, token {me.token_id}) at {client.url}",
                  highlight=False)


def _drain(node: str, reason: str | None, undo: bool, output: Output) -> None:
    client = _client()
    n = _ask(lambda: client.undrain(node) if undo else client.drain(node, reason or "drained by admin"))
    if not _emit(n, output):
        out.print(f"Node {n.name}: " + (f"drained ({n.drain_reason}); its running jobs checkpoint and move, nothing new starts there"
                                         if n.drained else "schedulable again"), highlight=False)


_DB_OPTION = typer.Option(None, "--db", help="act on this database directly (SQLAlchemy URL), e.g. with "
                          "the server down; default: through the server's API")


@app.command()
def drain(node: str = typer.Argument(..., help="node id, id prefix (6+ characters) or name"),
          reason: Optional[str] = typer.Option(None, "--reason", "-r"), db: Optional[str] = _DB_OPTION,
          output: Output = OUTPUT) -> None:
    """Take a node out of scheduling (admin): nothing new lands there; its running jobs checkpoint
    and move."""
    if db:
        _set_drain(node, True, db, reason or "drained by operator")
    else:
        _drain(node, reason, False, output)


@app.command()
def undrain(node: str = typer.Argument(..., help="node id, id prefix (6+ characters) or name"),
            db: Optional[str] = _DB_OPTION, output: Output = OUTPUT) -> None:
    """Put a drained node back into scheduling (admin); GPU faults seen so far are acknowledged."""
    if db:
        _set_drain(node, False, db, "")
    else:
        _drain(node, None, True, output)

