"""`shoal` command line. Exit codes: 0 ok; 1 the job (or command) failed; 2 invalid input
(bad spec or option, unknown job, a job in the wrong state); 3 no Shoal server reachable;
4 not authenticated or not allowed (missing/invalid token, role or team may not do this).

One Typer app (`common.app`); each module adds its commands to it:
  server    up, down, db upgrade
  jobs      validate, submit, queue, status, logs, cancel, hold, release, requeue
  simulate  simulate
  admin     quota show/set, token create/list/revoke, whoami, drain, undrain
  cluster   nodes, top, usage
"""
from __future__ import annotations

# importing a module registers its commands; this order is `shoal --help`'s
from scheduler.cli import server, jobs, simulate, admin, cluster  # noqa: F401,E401,I001
from scheduler.cli.common import app
from scheduler.cli.server import _pid_alive

__all__ = ["app", "main", "_pid_alive"]


def main() -> None:
    app()
