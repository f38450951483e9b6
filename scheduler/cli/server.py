"""`shoal up`, `shoal down` (the local server: daemon, Ray, API) and `shoal db upgrade`."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from scheduler.client import Client
from scheduler.daemon import default_home
from scheduler.cli.common import _error, app, out


def _pid_alive(pid: int) -> bool:
    """True if `pid` runs. A killed process whose parent never reaps it stays a zombie ('Z' in
    /proc/PID/stat); it is not running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _healthy(url: str) -> bool:
    with Client(url) as c:
        return c.health()


def _daemon_info(home: Path) -> dict | None:
    """The running server's daemon.json, or None if there is none or its process is gone."""
    try:
        info = json.loads((home / "daemon.json").read_text())
        return info if _pid_alive(int(info["pid"])) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


@app.command()
def up(config: Optional[Path] = typer.Option(None, help="cluster config YAML (teams, quotas, GPUs)"),
       port: int = typer.Option(8470, help="API port on 127.0.0.1 (0: any free port)"),
       db: Optional[str] = typer.Option(None, help="SQLAlchemy URL; default SQLite in SHOAL_HOME"),
       ray_address: Optional[str] = typer.Option(None, "--ray-address",
                                                 help="connect to an existing Ray cluster (host:port) instead of "
                                                      "starting a local one"),
       host: str = typer.Option("127.0.0.1", help="API bind address (0.0.0.0: every interface; tokens required)"),
       scenario: Optional[Path] = typer.Option(None, help="fake-GPU scenario YAML for the embedded node "
                                               "(demos: GPU models, foreign processes, timed XID/ECC faults)"),
       foreground: bool = typer.Option(False, help="run in this terminal instead of the background"),
       rotate_secret: bool = typer.Option(False, "--rotate-secret", help="after a lost server.secret: adopt "
                                          "this server's secret and revoke every API token (a new admin token is written)"),
       timeout: float = typer.Option(180, help="seconds to wait for the server to come up")) -> None:
    """Start the embedded Shoal server: local Ray, scheduler, REST API and /metrics."""
    home = default_home()
    if (info := _daemon_info(home)) is not None:
        out.print(f"Shoal is already running at {info['url']} (pid {info['pid']})")
        return
    args = [sys.executable, "-m", "scheduler.daemon", "--home", str(home), "--port", str(port), "--host", host]
    if config:
        args += ["--config", str(config.resolve())]
    if db:
        args += ["--db", db]
    if ray_address:
        args += ["--ray-address", ray_address]
    if rotate_secret:
        args.append("--rotate-secret")
    if scenario:
        args += ["--scenario", str(scenario.resolve())]
    if foreground:
        os.execv(sys.executable, args)
    home.mkdir(parents=True, exist_ok=True)
    (home / "daemon.json").unlink(missing_ok=True)
    logf = (home / "shoal.log").open("ab")
    proc = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    with out.status("starting Shoal (local Ray, scheduler, API)..."):
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = (home / "shoal.log").read_text(errors="replace").splitlines()[-25:]
                _error(f"Shoal exited during start-up; last lines of {home / 'shoal.log'}:\n" + "\n".join(tail))
                raise typer.Exit(1)
            if (info := _daemon_info(home)) is not None and _healthy(info["url"]):
                out.print(f"Shoal is up: API {info['url']}  metrics {info['url']}/metrics  "
                          f"store {info['db']}  log {home / 'shoal.log'}")
                if info.get("admin_token"):
                    out.print(f"Admin API token: {info['admin_token']} (mode 0600; the CLI on this machine "
                              "uses it; `shoal token create` makes tokens for others)", highlight=False)
                return
            time.sleep(0.3)
    proc.terminate()
    _error(f"Shoal did not come up within {timeout:.0f} s; see {home / 'shoal.log'}")
    raise typer.Exit(1)


@app.command()
def down(timeout: float = typer.Option(120, help="seconds to wait for running jobs to checkpoint")) -> None:
    """Stop the server. Running jobs checkpoint and go back to the queue; `shoal up` resumes them."""
    home = default_home()
    info = _daemon_info(home)
    if info is None:
        out.print("Shoal is not running")
        return
    os.kill(info["pid"], signal.SIGTERM)
    deadline = time.monotonic() + timeout
    with out.status("stopping Shoal (checkpointing running jobs)..."):
        while time.monotonic() < deadline:
            if not _pid_alive(info["pid"]):
                out.print("Shoal stopped")
                return
            time.sleep(0.3)
    _error(f"Shoal (pid {info['pid']}) still running after {timeout:.0f} s")
    raise typer.Exit(1)


def _store_url(db: Optional[str]) -> str:
    if db:
        return db
    info = _daemon_info(default_home())
    if info is not None:
        return info["db"]
    return f"sqlite:///{default_home() / 'shoal.db'}"


db_app = typer.Typer(help="The store's schema.", no_args_is_help=True)


app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def db_upgrade(db: Optional[str] = typer.Option(None, help="SQLAlchemy URL; default SQLite in SHOAL_HOME")) -> None:
    """Migrate the database to this Shoal's schema (the server also does it when it starts)."""
    from scheduler.store import SchemaTooNew, SchemaUnknown
    from scheduler.store import migrate
    from scheduler.store.db import make_engine

    url = _store_url(db)
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            before = migrate.current(conn)
        rev = migrate.upgrade(engine, url)
    except (SchemaTooNew, SchemaUnknown) as e:
        _error(str(e))
        raise typer.Exit(2) from None
    finally:
        engine.dispose()
    out.print(f"{url}: schema at revision {rev}" + (" (already current)" if before == rev else f" (was {before})"))

