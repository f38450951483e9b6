"""`shoal` command line. Exit codes: 0 ok; 1 the job (or command) failed; 2 invalid input
(bad spec or option, unknown job, a job in the wrong state); 3 no Shoal server reachable;
4 not authenticated or not allowed (missing/invalid token, role or team may not do this)."""
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
from scheduler.models import JobOut, Role
from scheduler.client import Client, NotRunning, ShoalError
from scheduler.daemon import default_home
from scheduler.lifecycle import JobState
from scheduler.placement import describe, named_parts
from scheduler.spec import SpecError, load_job_spec

app = typer.Typer(help="Shoal: a GPU scheduler for LLM fine-tuning on Ray.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
# Piped output (scripts, grep) gets whole lines instead of rich's 80-column default.
out = Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 250)
err = Console(stderr=True, soft_wrap=True)  # never wrap error lines: they are file:line: field: message


class Output(str, Enum):
    table = "table"
    json = "json"
    yaml = "yaml"


OUTPUT = typer.Option(Output.table, "--output", "-o", help="table, json or yaml")


def _client() -> Client:
    try:
        return Client()
    except NotRunning as e:
        _error(str(e))
        raise typer.Exit(3) from None
    except ShoalError as e:
        raise _fail(e) from None


def _emit(data, output: Output) -> bool:
    """Print `data` (pydantic models, lists of them, dicts) as JSON or YAML and return True;
    False for table output (the caller draws the table)."""
    if output is Output.table:
        return False
    plain = _plain(data)
    if output is Output.json:
        out.out(json.dumps(plain, indent=2), highlight=False)
    else:
        import yaml

        out.out(yaml.safe_dump(plain, sort_keys=False).rstrip("\n"), highlight=False)
    return True


def _plain(data):
    if hasattr(data, "model_dump"):
        return data.model_dump(mode="json")
    if isinstance(data, list):
        return [_plain(x) for x in data]
    if isinstance(data, dict):
        return {k: _plain(v) for k, v in data.items()}
    return data


def _table(*columns: str, fold: str | None = None) -> Table:
    t = Table(box=None, header_style="bold")
    for c in columns:
        if c == fold:
            t.add_column(c, overflow="fold", min_width=20)
        else:
            t.add_column(c, no_wrap=True)
    return t


def _fail(e: Exception, code: int = 1) -> typer.Exit:
    if isinstance(e, NotRunning):
        code = 3
    elif isinstance(e, ShoalError) and e.status in (401, 403):
        code = 4
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


def _when(t: float | None) -> str:
    """A start estimate: 'now', 'in 5m', or a date; '-' when unknown."""
    if t is None:
        return "-"
    dt = t - time.time()
    if dt <= 1:
        return "now"
    if dt < 3600:
        return f"in {dt / 60:.0f}m"
    return _ts(t)


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


# -- jobs --------------------------------------------------------------------------------------

@app.command()
def validate(file: Path,
             model: Optional[Path] = typer.Option(None, help="data file only: model folder whose tokenizer "
                                                  "counts tokens and renders chat (without it: records only)"),
             max_length: int = typer.Option(512, "--max-length", min=2, help="data file only: tokens per record"),
             policy: str = typer.Option("error", help="data file only: records over max-length: error | "
                                        "truncate | drop"),
             format: str = typer.Option("auto", "--format", help="data file only: auto | prompt_completion | "
                                        "chat | alpaca")) -> None:
    """Check a job spec (YAML) and its files locally without submitting: every invalid field (with its
    line), the model directory, every dataset record. Team and quota are checked at submit.
    Given a data file or folder (.jsonl / .json / .parquet) instead, check its records alone."""
    from trainer.formats import SUFFIXES  # .jsonl .json .parquet
    if file.is_dir() or file.suffix in SUFFIXES:
        return _validate_data(file, model, max_length, policy, format)
    try:
        spec = load_job_spec(file)
        files = check_files(spec)
    except (SpecError, SubmitError) as e:
        raise _fail(e) from None
    val = f", {files.validation_records} validation" if files.validation_records is not None else ""
    out.print(f"{file}: valid ({spec.method} fine-tuning of {spec.model} for team {spec.team}; "
              f"{files.train_records} training records{val})", highlight=False)
    for name, summary in (("train", files.train_summary), ("validation", files.validation_summary)):
        if summary:
            _print_summary(name, summary)


def _print_summary(name: str, summary: dict) -> None:
    """trainer.data.summarize's figures: what the estimator and the user can plan with."""
    hist = " ".join(f"{k}:{v}" for k, v in summary["histogram"].items())
    out.print(f"  {name}: {summary['format']}, {summary['examples']} examples, {summary['tokens']} tokens "
              f"(mean {summary['mean_tokens']}, max {summary['max_tokens']}; {summary['truncated']} truncated, "
              f"{summary['dropped']} dropped at max_length {summary['max_length']}); lengths {hist}",
              highlight=False)


def _bad_data(problems: list[str]) -> typer.Exit:
    _error(f"invalid data ({len(problems)} problem(s)):\n" + "\n".join(f"  {p}" for p in problems))
    return typer.Exit(2)


def _validate_data(path: Path, model: Path | None, max_length: int, policy: str, fmt: str) -> None:
    """`shoal validate DATA`: every bad record with its file and line; with --model, token lengths
    under the policy, the chat template and the summary."""
    from trainer.data import POLICIES, DatasetError, collect_records, prepare
    from trainer.formats import FORMATS

    problems = [f"--policy: {policy!r} is not one of {', '.join(POLICIES)}"] if policy not in POLICIES else []
    if fmt != "auto" and fmt not in FORMATS:
        problems.append(f"--format: {fmt!r} is not one of auto, {', '.join(FORMATS)}")
    if problems:
        raise _bad_data(problems)
    try:
        if model is None:
            records, found, errs = collect_records(path, fmt)
            if errs:
                raise DatasetError(errs)
            out.print(f"{path}: valid ({found}, {len(records)} records; give --model to check token lengths "
                      f"and see the summary)", highlight=False)
            return
        from trainer.model import load_tokenizer
        try:
            tokenizer = load_tokenizer(model)
        except Exception as e:  # noqa: BLE001 - any failure to load is the user's model folder
            raise _bad_data([f"--model: {model}: cannot load its tokenizer ({e})"]) from None
        _, _, summary = prepare(path, tokenizer, fmt, max_length, policy)
    except (DatasetError, ValueError) as e:
        raise _bad_data(getattr(e, "problems", None) or [str(e)]) from None
    out.print(f"{path}: valid ({summary['records']} records)", highlight=False)
    _print_summary("data", summary)


@app.command()
def submit(file: Path, watch: bool = typer.Option(False, "--watch", "-w", help="follow progress to the end"),
           dry_run: bool = typer.Option(False, "--dry-run", help="check everything and show what would happen; "
                                        "queue nothing"),
           set_: Optional[list[str]] = typer.Option(None, "--set", help="override a spec field: key.path=value "
                                                    "(repeatable; value parsed as YAML)"),
           output: Output = OUTPUT) -> None:
    """Submit a job spec (YAML). Invalid specs are refused with every bad field named."""
    client = _client()
    try:
        job = client.submit_file(file, set_ or [], dry_run=dry_run)
    except (ShoalError, SpecError) as e:
        raise _fail(e) from None
    if dry_run:
        _dry_run_report(job, output)
        return
    if not watch and _emit(job, output):
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


def _dry_run_report(d, output: Output) -> None:
    if not _emit(d, output):
        if not d.valid:
            _error(f"the job would be refused ({len(d.problems)} problem(s)):\n" +
                   "\n".join(f"  {p}" for p in d.problems))
        else:
            val = f", {d.validation_records} validation" if d.validation_records is not None else ""
            out.print(f"Valid: {d.gpus} GPU(s), ~{d.memory_per_gpu_mib} MiB each; {d.train_records} training "
                      f"records{val}", highlight=False)
            if d.would_start_now:
                out.print("Would start now")
            else:
                out.print(f"Would wait: {d.pending_reason or 'not placed this cycle'}; estimated start "
                          f"{_when(d.estimated_start_at)}", highlight=False)
            out.print("Nothing was queued (--dry-run)")
    raise typer.Exit(0 if d.valid else 2)


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
          user: Optional[str] = typer.Option(None, "--user", "-u"),
          all_: bool = typer.Option(False, "--all", "-a", help="include finished jobs"),
          start: bool = typer.Option(False, "--start", help="queued jobs only, in start order, with the "
                                     "position and estimated start (squeue --start)"),
          output: Output = OUTPUT) -> None:
    """List jobs (unfinished ones unless --all), with the reason each pending job waits."""
    client = _client()
    if start:
        try:
            entries = client.queue(team=team)
        except ShoalError as e:
            raise _fail(e) from None
        if not _emit(entries, output):
            t = _table("POS", "ID", "NAME", "TEAM", "USER", "PRI", "GPUS", "START", "REASON", fold="REASON")
            for e in entries:
                t.add_row(str(e.position), str(e.id), e.name, e.team, e.user, str(e.priority), str(e.gpus),
                          _when(e.estimated_start_at), e.pending_reason or "")
            out.print(t)
        return
    states = [s.value for s in state] if state else (None if all_ else
                                                     [s.value for s in JobState if not s.terminal])
    try:
        jobs = client.jobs(state=states, team=team, user=user)
    except ShoalError as e:
        raise _fail(e) from None
    if _emit(jobs, output):
        return
    t = _table("ID", "NAME", "TEAM", "USER", "PRI", "STATE", "GPUS", "NODE/GPU", "PROGRESS", "START", "REASON",
               fold="REASON")
    for j in jobs:
        p = j.progress or {}
        where = "+".join(f"{name}:{','.join(map(str, ix))}" for _, name, ix in named_parts(j.placement)) or "-"
        prog = f"{p.get('step', 0)}/{p.get('total_steps', '?')}" if p else "-"
        queued = j.state is JobState.QUEUED
        t.add_row(str(j.id), j.name, j.team, j.user, str(j.priority), j.state.value, str(j.gpus), where, prog,
                  _eta(j.estimated_start_at) if queued else "",
                  j.pending_reason if queued and j.pending_reason else
                  ("held (shoal release)" if j.state is JobState.HELD else ""))
    out.print(t)


def _eta(ts: float | None) -> str:
    """A queued job's estimated start as local clock time ('~14:05'), '-' when unknown."""
    if ts is None:
        return "-"
    return "~" + datetime.fromtimestamp(ts).strftime("%H:%M" if abs(ts - time.time()) < 86400 else "%m-%d %H:%M")


@app.command()
def status(job_id: int, output: Output = OUTPUT) -> None:
    """Show one job: state, placement, progress, result and its state history."""
    client = _client()
    try:
        job, events = client.job(job_id), client.events(job_id)
    except ShoalError as e:
        raise _fail(e) from None
    if _emit({**job.model_dump(mode="json"), "events": [e.model_dump() for e in events]}, output):
        return
    out.print(f"Job {job.id} [bold]{job.name}[/]  team {job.team}  user {job.user}  priority {job.priority}")
    out.print(f"  state      {job.state.value}" + (f"  ({job.pending_reason})" if job.pending_reason else ""))
    out.print(f"  resources  {job.gpus} GPU(s), ~{job.memory_per_gpu_mib} MiB each; attempt {job.attempt}, "
              f"retries {job.retries}")
    if job.placement:
        out.print(f"  placement  {describe(job.placement)}")
    if job.progress:
        p = job.progress
        out.print(f"  progress   step {p.get('step')}/{p.get('total_steps')}  loss {p.get('loss')}  "
                  f"tokens/s {p.get('tokens_per_s')}")
    if job.state.terminal:
        _summary(job)
    t = _table("TIME", "FROM", "TO", "ATTEMPT", "REASON", fold="REASON")
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


def _each(job_ids: list[int], action: str, done: str) -> None:
    """Apply a job action to each id; the exit code is the worst outcome."""
    client = _client()
    code = 0
    for jid in job_ids:
        try:
            job = getattr(client, action)(jid)
            out.print(f"Job {jid}: {done}" + ("" if action == "cancel" else f" ({job.state.value})"))
        except ShoalError as e:
            _error(f"job {jid}: {e}")
            code = max(code, _fail_code(e))
    raise typer.Exit(code)


# -- nodes and the database: straight to the store (the server's loop acts on what is recorded) --

def _store_url(db: Optional[str]) -> str:
    if db:
        return db
    info = _daemon_info(default_home())
    if info is not None:
        return info["db"]
    return f"sqlite:///{default_home() / 'shoal.db'}"


def _set_drain(node: str, drained: bool, db: Optional[str], reason: str) -> None:
    from scheduler.service import find_node
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
@app.command()
def simulate(
    trace: str = typer.Option(..., "--trace", help="trace file (Philly CSV, generic CSV) or a Shoal store URL"),
    cluster: Path = typer.Option(..., "--cluster", help="simulated cluster YAML (nodes, GPU models, teams)"),
    policy: str = typer.Option("shoal,fifo,tiresias", "--policy", help="comma-separated: shoal, fifo, sjf, srtf, tiresias, drf"),
    jobs: Optional[int] = typer.Option(None, "--jobs", min=1, help="first N jobs by submit time (default: all)"),
    out_dir: Path = typer.Option(Path("sim-out"), "--out", help="folder for JSON, CSV, PNG and report.html"),
    fmt: str = typer.Option("auto", "--format", help="trace format: auto, philly, csv, shoal"),
    columns: Optional[str] = typer.Option(None, "--columns", help="generic CSV mapping, e.g. submit=ts,duration=run_s,gpus=n,group=vc"),
    skip_bad_rows: bool = typer.Option(False, "--skip-bad-rows", help="leave out invalid trace rows (listed in the output) instead of stopping"),
    seed: Optional[int] = typer.Option(None, "--seed", help="workload seed (overrides simulation.seed)"),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="write PNG plots and report.html"),
) -> None:
    """Replay a trace through the real scheduler loop under several policies and compare them."""
    from scheduler.sim.config import load_sim_cluster
    from scheduler.sim.runner import SimError, parse_policies, prepare, run_policies, write_all
    from scheduler.sim.traces import TraceError, read_trace
    from scheduler.sim.workload import WorkloadError

    try:
        names = parse_policies(policy)
        sc = load_sim_cluster(cluster)
        if seed is not None:
            sc = type(sc)(sc.cluster, sc.sim.model_copy(update={"seed": seed}), sc.source)
        tr = read_trace(trace, fmt, columns, skip_bad=skip_bad_rows)
        prep = prepare(tr, sc, jobs)
    except SpecError as e:
        _error(f"invalid cluster file ({len(e.problems)} problem(s)):\n" + "\n".join(f"  {p}" for p in e.problems))
        raise typer.Exit(2) from None
    except (TraceError, SimError, WorkloadError, ValueError) as e:
        _error(str(e))
        raise typer.Exit(2) from None
    if prep.skipped_rows:
        err.print(f"warning: {len(prep.skipped_rows)} bad trace row(s) left out (--skip-bad-rows); "
                  f"listed in {out_dir / 'skipped-rows.txt'}", markup=False)
    out.print(f"{len(prep.jobs)} jobs from {trace} on {sc.total_gpus} GPUs; policies: {', '.join(names)}")
    with Progress(TextColumn("{task.description:<10}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), console=out) as bar:
        def progress(name: str):  # one bar per policy, added when its run starts
            task = bar.add_task(name, total=1.0)
            return lambda frac: bar.update(task, completed=frac)

        results = run_policies(prep, sc, names, progress)
    summaries, written = write_all(out_dir, results, prep, sc, {"trace": trace, "cluster": str(cluster),
                                                               "policies": ",".join(names), "seed": sc.sim.seed},
                                   plots=plots)
    table = Table("policy", "done", "rejected", "avg JCT h", "p99 JCT h", "avg wait h", "makespan/bound",
                  "alloc (queue>0)", "Jain", "$/job", "events/s")
    for s in summaries:
        h = lambda v: _num(v / 3600.0 if v is not None else None, 2)  # noqa: E731
        table.add_row(s["policy"], str(s["jobs_completed"]), str(s["jobs_rejected"]), h(s["jct_avg_s"]),
                      h(s["jct_p99_s"]), h(s["queue_delay_avg_s"]), _num(s["makespan_vs_bound"], 3),
                      _num(s["allocation_while_queue_nonempty"], 3), _num(s["jain_fairness_teams"], 3),
                      _num(s["cost_per_completed_job_usd"], 2), _num(s["sim_events_per_s"], 0))
    out.print(table)
    out.print(f"wrote {len(written)} files to {out_dir}" + (f" (report: {out_dir / 'report.html'})" if plots else ""))


def _fail_code(e: ShoalError) -> int:
    if isinstance(e, NotRunning):
        return 3
    return 4 if e.status in (401, 403) else 2


@app.command()
def cancel(job_ids: list[int]) -> None:
    """Cancel jobs (scancel). Queued and held jobs end at once; running ones are stopped."""
    _each(job_ids, "cancel", "cancel requested")


@app.command()
def hold(job_ids: list[int]) -> None:
    """Keep queued jobs from starting until released (scontrol hold)."""
    _each(job_ids, "hold", "held")


@app.command()
def release(job_ids: list[int]) -> None:
    """Put held jobs back in the queue (scontrol release)."""
    _each(job_ids, "release", "released")


@app.command()
def requeue(job_ids: list[int]) -> None:
    """Stop running jobs at a checkpoint and queue them again; they resume from it (scontrol requeue)."""
    _each(job_ids, "requeue", "requeue requested")


# -- tenancy: quotas, tokens -------------------------------------------------------------------

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
    try:
        teams = [client.team(team)] if team else client.teams()
    except ShoalError as e:
        raise _fail(e) from None
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
    try:
        team_out = client.put_team(team, **fields) if create else client.patch_team(team, **fields)
    except ShoalError as e:
        raise _fail(e) from None
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
    try:
        toks = client.tokens()
    except ShoalError as e:
        raise _fail(e) from None
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
    code = 0
    for tid in token_ids:
        try:
            client.revoke_token(tid)
            out.print(f"Token {tid} revoked")
        except ShoalError as e:
            _error(f"token {tid}: {e}")
            code = max(code, _fail_code(e))
    raise typer.Exit(code)


@app.command()
def whoami(output: Output = OUTPUT) -> None:
    """The user, team and role of the token in use."""
    client = _client()
    try:
        me = client.whoami()
    except ShoalError as e:
        raise _fail(e) from None
    if not _emit(me, output):
        out.print(f"{me.user} (team {me.team or '-'}, role {me.role.value}, token {me.token_id}) at {client.url}",
                  highlight=False)


# -- cluster -------------------------------------------------------------------------------------

def _bar(frac: float, width: int = 10) -> str:
    n = max(0, min(width, round(frac * width)))
    return "█" * n + "·" * (width - n)


def _nodes_table(nodes) -> Table:
    t = _table("NODE", "STATE", "GPU", "MODEL", "UTIL", "MEMORY (MiB)", "HEALTH", "JOBS")
    for n in nodes:
        state = "drained" if n.drained else ("ok" if n.schedulable else "down")
        for i, g in enumerate(n.gpus):
            jobs = ",".join(map(str, g.jobs)) + (f" +{g.hidden_jobs} other" if g.hidden_jobs else "")
            t.add_row(n.name if i == 0 else "", state if i == 0 else "", str(g.index), g.model,
                      f"{_bar(g.utilization)} {g.utilization * 100:3.0f}%",
                      f"{g.memory_used_mib:>6}/{g.memory_total_mib}", "ok" if g.healthy else "[red]FAULT[/]",
                      jobs or "-")
        if not n.gpus:
            t.add_row(n.name, state, "-", "-", "-", "-", "-", "-")
    return t


@app.command()
def nodes(output: Output = OUTPUT) -> None:
    """Nodes and GPUs with live readings (utilization, memory, health) and the jobs on them."""
    client = _client()
    try:
        ns = client.nodes()
    except ShoalError as e:
        raise _fail(e) from None
    if not _emit(ns, output):
        out.print(_nodes_table(ns))
        for n in ns:
            if n.drained:
                out.print(f"{n.name}: drained ({n.drain_reason})", highlight=False)


@app.command()
def top(interval: float = typer.Option(2.0, "--interval", "-n", help="seconds between refreshes"),
        once: bool = typer.Option(False, "--once", help="print one frame and exit")) -> None:
    """A live view of the cluster: GPUs (utilization, memory, jobs) and running and queued jobs."""
    from rich.console import Group
    from rich.live import Live

    client = _client()

    def frame():
        summary, ns = client.metrics_summary(), client.nodes()
        jobs = client.jobs(state=[s.value for s in JobState if not s.terminal], limit=200)
        head = (f"[bold]Shoal[/] {client.url}  GPUs {summary.gpus_allocated}/{summary.gpus_total} allocated, "
                f"{summary.gpus_healthy} healthy, mean util {summary.gpu_utilization_mean * 100:.0f}%  "
                f"memory {summary.memory_used_mib / 1024:.0f}/{summary.memory_total_mib / 1024:.0f} GiB  "
                + "  ".join(f"{k} {v}" for k, v in sorted(summary.jobs_by_state.items())))
        jt = _table("ID", "NAME", "TEAM", "STATE", "GPUS", "STEP", "LOSS", "TOK/S", "REASON", fold="REASON")
        for j in jobs:
            p = j.progress or {}
            jt.add_row(str(j.id), j.name, j.team, j.state.value, str(j.gpus),
                       f"{p.get('step', '-')}/{p.get('total_steps', '-')}" if p else "-",
                       _num(p.get("loss"), 4), _num(p.get("tokens_per_s"), 0),
                       (j.pending_reason or "") if j.state is JobState.QUEUED else "")
        return Group(head, _nodes_table(ns), jt)

    try:
        if once:
            out.print(frame())
            return
        with Live(frame(), console=out, refresh_per_second=4, screen=False) as live:
            while True:
                time.sleep(interval)
                live.update(frame())
    except ShoalError as e:
        raise _fail(e) from None
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


def _parse_time(value: str | None, option: str) -> float | None:
    """'1732500000' (Unix time), '2026-11-01' or '2026-11-01T12:00' (UTC), or '7d' / '12h' / '30m'
    (that long ago)."""
    if value is None:
        return None
    v = value.strip()
    units = {"d": 86400, "h": 3600, "m": 60}
    try:
        if v[-1:] in units and v[:-1].replace(".", "", 1).isdigit():
            return time.time() - float(v[:-1]) * units[v[-1]]
        if v.replace(".", "", 1).isdigit():
            return float(v)
        dt = datetime.fromisoformat(v)
        if dt.tzinfo is None:
            from datetime import timezone
            dt = dt.replace(tzinfo=timezone.utc)
        return dt.timestamp()
    except ValueError:
        _error(f"{option}: {value!r} is not a time (Unix seconds, an ISO date like 2026-11-01, or 7d / 12h / 30m ago)")
        raise typer.Exit(2) from None


class ReportOutput(str, Enum):
    table = "table"
    json = "json"
    yaml = "yaml"
    csv = "csv"


@app.command()
def usage(since: Optional[str] = typer.Option(None, "--since", "-S", help="start: Unix time, ISO date (UTC), or "
                                              "7d/12h ago; default: start of the budget period"),
          until: Optional[str] = typer.Option(None, "--until", "-E", help="end (same forms); default now"),
          by: str = typer.Option("team", "--by", help="comma-separated: team,user,job_id,gpu_model,node"),
          team: Optional[str] = typer.Option(None, "--team", "-t"),
          user: Optional[str] = typer.Option(None, "--user", "-u"),
          output: ReportOutput = typer.Option(ReportOutput.table, "--output", "-o", help="table, json, yaml or csv")) -> None:
    """GPU-hours and cost by team / user / job / GPU model / node over a window (sreport / sacct)."""
    client = _client()
    kw = dict(since=_parse_time(since, "--since"), until=_parse_time(until, "--until"), team=team, user=user)
    keys = [k.strip() for k in by.split(",") if k.strip()]
    try:
        if output is ReportOutput.csv:
            out.out(client.usage_csv(by=keys, **kw), end="", highlight=False)
            return
        report = client.usage(by=keys, **kw)
    except ShoalError as e:
        raise _fail(e) from None
    if output is not ReportOutput.table:
        _emit(report, Output(output.value))
        return
    out.print(f"Usage {_ts(report.since)} .. {_ts(report.until)}", highlight=False)
    t = _table(*(k.upper() for k in report.by), "GPU-HOURS", "COST $", "JOBS")
    for r in report.rows:
        t.add_row(*(r.key[k] for k in report.by), f"{r.gpu_hours:.2f}", f"{r.cost_usd:,.2f}", str(r.jobs))
    t.add_row(*(["TOTAL"] + [""] * (len(report.by) - 1)), f"{report.total_gpu_hours:.2f}",
              f"{report.total_cost_usd:,.2f}", "")
    out.print(t)


def _drain(node: str, reason: str | None, undo: bool, output: Output) -> None:
    client = _client()
    try:
        n = client.undrain(node) if undo else client.drain(node, reason or "drained by admin")
    except ShoalError as e:
        raise _fail(e) from None
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
