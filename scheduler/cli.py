"""`shoal` command line. Exit codes: 0 ok; 1 the job (or command) failed; 2 invalid input;
3 no Shoal server reachable."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from scheduler.admission import SubmitError, check_files
from scheduler.models import JobOut
from scheduler.client import Client, NotRunning, ShoalError
from scheduler.daemon import default_home
from scheduler.lifecycle import JobState
from scheduler.spec import SpecError, load_job_spec

app = typer.Typer(help="Shoal: a GPU scheduler for LLM fine-tuning on Ray.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
# Piped output (scripts, grep) gets whole lines instead of rich's 80-column default.
out = Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 250)
err = Console(stderr=True, soft_wrap=True)  # never wrap error lines: they are file:line: field: message


class Output(str, Enum):
    table = "table"
    json = "json"


def _client() -> Client:
    try:
        return Client()
    except NotRunning as e:
        _error(str(e))
        raise typer.Exit(3) from None


def _fail(e: Exception, code: int = 1) -> typer.Exit:
    if isinstance(e, NotRunning):
        code = 3
    elif isinstance(e, ShoalError) and e.status in (400, 404, 409, 422):
        code = 2
    elif isinstance(e, (SpecError, SubmitError)):
        code = 2
    if isinstance(e, (SpecError, SubmitError)):
        _error(f"invalid spec ({len(e.problems)} problem(s)):\n" + "\n".join(f"  {p}" for p in e.problems))
    else:
        _error(str(e))
    return typer.Exit(code)


def _error(message: str) -> None:
    """'error: ...' on stderr; the message is printed verbatim (no markup, no wrapping)."""
    err.print("[red]error:[/] ", end="")
    err.print(message, markup=False, highlight=False)


def _num(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _ts(t: float | None) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


# -- server lifecycle ------------------------------------------------------------------------

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
       foreground: bool = typer.Option(False, help="run in this terminal instead of the background"),
       timeout: float = typer.Option(180, help="seconds to wait for the server to come up")) -> None:
    """Start the embedded Shoal server: local Ray, scheduler, REST API and /metrics."""
    home = default_home()
    if (info := _daemon_info(home)) is not None:
        out.print(f"Shoal is already running at {info['url']} (pid {info['pid']})")
        return
    args = [sys.executable, "-m", "scheduler.daemon", "--home", str(home), "--port", str(port)]
    if config:
        args += ["--config", str(config.resolve())]
    if db:
        args += ["--db", db]
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


# -- jobs --------------------------------------------------------------------------------------

@app.command()
def validate(file: Path) -> None:
    """Check a job spec and its files locally without submitting: every invalid field (with its
    line), the model directory, every dataset record. Team and quota are checked at submit."""
    try:
        spec = load_job_spec(file)
        files = check_files(spec)
    except (SpecError, SubmitError) as e:
        raise _fail(e) from None
    val = f", {files.validation_records} validation" if files.validation_records is not None else ""
    out.print(f"{file}: valid ({spec.method} fine-tuning of {spec.model} for team {spec.team}; "
              f"{files.train_records} training records{val})", highlight=False)
    for name, summary in (("train", files.train_summary), ("validation", files.validation_summary)):
        if summary:  # trainer.data.summarize: what the estimator and the user can plan with
            hist = " ".join(f"{k}:{v}" for k, v in summary["histogram"].items())
            out.print(f"  {name}: {summary['format']}, {summary['examples']} examples, {summary['tokens']} tokens "
                      f"(mean {summary['mean_tokens']}, max {summary['max_tokens']}; {summary['truncated']} truncated, "
                      f"{summary['dropped']} dropped at max_length {summary['max_length']}); lengths {hist}",
                      highlight=False)


@app.command()
def submit(file: Path, watch: bool = typer.Option(False, "--watch", "-w", help="follow progress to the end"),
           output: Output = typer.Option(Output.table, "--output", "-o")) -> None:
    """Submit a job spec (YAML). Invalid specs are refused with every bad field named."""
    client = _client()
    try:
        job = client.submit_file(file)
    except (ShoalError, SpecError) as e:
        raise _fail(e) from None
    if output is Output.json and not watch:
        out.print_json(job.model_dump_json())
        return
    out.print(f"Submitted job [bold]{job.id}[/] ({job.name}, team {job.team}, {job.gpus} GPU(s))")
    if watch:
        try:
            final = _watch(client, job.id)
        except ShoalError as e:
            raise _fail(e) from None
        except KeyboardInterrupt:
            out.print(f"\nStopped watching; job {job.id} goes on (shoal status {job.id}, shoal cancel {job.id})")
            raise typer.Exit(130) from None
        raise typer.Exit(0 if final.state is JobState.SUCCEEDED else 1)


def _watch(client: Client, job_id: int) -> JobOut:
    cols = [TextColumn("job {task.fields[jid]} [bold]{task.fields[state]:<10}"), BarColumn(),
            MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}  {task.fields[tps]} tok/s"),
            TimeElapsedColumn()]
    with Progress(*cols, console=out, transient=False) as bar:
        task = bar.add_task("", total=None, jid=job_id, state="QUEUED", loss="-", tps="-")
        while True:
            job = client.job(job_id)
            p = job.progress or {}
            bar.update(task, state=job.state.value, total=p.get("total_steps"), completed=p.get("step", 0),
                       loss=f"{p['loss']:.4f}" if "loss" in p else "-",
                       tps=f"{p['tokens_per_s']:.0f}" if "tokens_per_s" in p else "-")
            if job.state.terminal:
                break
            time.sleep(0.5)
    _summary(job)
    return job


def _summary(job: JobOut) -> None:
    color = {"SUCCEEDED": "green", "FAILED": "red", "CANCELLED": "yellow"}.get(job.state.value, "white")
    out.print(f"Job {job.id} [bold {color}]{job.state.value}[/]")
    r = job.result or {}
    if job.state is JobState.SUCCEEDED:
        out.print(f"  train loss       {_num(r.get('train_loss'), 4)}")
        out.print(f"  validation loss  {_num(r.get('eval_loss'), 4)}   (untrained: "
                  f"{_num(r.get('eval_loss_initial'), 4)}, perplexity {_num(r.get('perplexity'), 2)})")
        out.print(f"  steps            {r.get('steps', '-')}   tokens/s {_num(r.get('tokens_per_s'), 0)}")
        out.print(f"  adapter          {r.get('output_dir')}", highlight=False)
    elif job.failure_reason:
        out.print(f"  cause: {job.failure_reason.strip().splitlines()[-1]}", highlight=False)
        out.print(f"  full log: shoal logs {job.id}")


@app.command()
def queue(state: Optional[list[JobState]] = typer.Option(None, "--state", "-s"),
          team: Optional[str] = typer.Option(None, "--team", "-t"),
          all_: bool = typer.Option(False, "--all", "-a", help="include finished jobs"),
          output: Output = typer.Option(Output.table, "--output", "-o")) -> None:
    """List jobs (unfinished ones unless --all), with the reason each pending job waits."""
    client = _client()
    states = [s.value for s in state] if state else (None if all_ else
                                                     [s.value for s in JobState if not s.terminal])
    try:
        jobs = client.jobs(state=states, team=team)
    except ShoalError as e:
        raise _fail(e) from None
    if output is Output.json:
        out.print_json(json.dumps([j.model_dump(mode="json") for j in jobs]))
        return
    t = Table(box=None, header_style="bold")
    for c in ("ID", "NAME", "TEAM", "USER", "PRI", "STATE", "GPUS", "NODE/GPU", "PROGRESS"):
        t.add_column(c, no_wrap=True)
    t.add_column("REASON", overflow="fold", min_width=20)
    for j in jobs:
        p = j.progress or {}
        where = f"{j.placement['node']}:{','.join(map(str, j.placement['gpu_indices']))}" if j.placement else "-"
        prog = f"{p.get('step', 0)}/{p.get('total_steps', '?')}" if p else "-"
        t.add_row(str(j.id), j.name, j.team, j.user, str(j.priority), j.state.value, str(j.gpus), where, prog,
                  j.pending_reason if j.state is JobState.QUEUED and j.pending_reason else "")
    out.print(t)


@app.command()
def status(job_id: int, output: Output = typer.Option(Output.table, "--output", "-o")) -> None:
    """Show one job: state, placement, progress, result and its state history."""
    client = _client()
    try:
        job, events = client.job(job_id), client.events(job_id)
    except ShoalError as e:
        raise _fail(e) from None
    if output is Output.json:
        out.print_json(json.dumps({**job.model_dump(mode="json"), "events": [e.model_dump() for e in events]}))
        return
    out.print(f"Job {job.id} [bold]{job.name}[/]  team {job.team}  user {job.user}  priority {job.priority}")
    out.print(f"  state      {job.state.value}" + (f"  ({job.pending_reason})" if job.pending_reason else ""))
    out.print(f"  resources  {job.gpus} GPU(s), ~{job.memory_per_gpu_mib} MiB each; attempt {job.attempt}, "
              f"retries {job.retries}")
    if job.placement:
        out.print(f"  placement  {job.placement['node']} GPU {job.placement['gpu_indices']}")
    if job.progress:
        p = job.progress
        out.print(f"  progress   step {p.get('step')}/{p.get('total_steps')}  loss {p.get('loss')}  "
                  f"tokens/s {p.get('tokens_per_s')}")
    if job.state.terminal:
        _summary(job)
    t = Table(box=None, header_style="bold")
    for c in ("TIME", "FROM", "TO", "ATTEMPT"):
        t.add_column(c, no_wrap=True)
    t.add_column("REASON", overflow="fold", min_width=20)
    for e in events:
        t.add_row(_ts(e.ts), e.from_state or "-", e.to_state, str(e.attempt), e.reason)
    out.print(t)


@app.command()
def logs(job_id: int, follow: bool = typer.Option(False, "--follow", "-f", help="keep printing until the job ends")) -> None:
    """Print a job's log: state changes, training steps, evaluation, errors."""
    client = _client()
    try:
        if follow:
            for text in client.follow_logs(job_id):
                out.out(text, end="", highlight=False)
        else:
            out.out(client.logs(job_id).text, end="", highlight=False)
    except ShoalError as e:
        raise _fail(e) from None


@app.command()
def cancel(job_ids: list[int]) -> None:
    """Cancel jobs. Queued jobs end at once; running ones are stopped."""
    client = _client()
    code = 0
    for jid in job_ids:
        try:
            client.cancel(jid)
            out.print(f"Job {jid}: cancel requested")
        except ShoalError as e:
            _error(f"job {jid}: {e}")
            code = 2 if not isinstance(e, NotRunning) else 3
    raise typer.Exit(code)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
