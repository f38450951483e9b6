"""Job commands: validate, submit (with --watch and --dry-run), queue, status, logs, and the
actions cancel, hold, release, requeue."""
from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from scheduler.admission import SubmitError, check_files
from scheduler.models import JobOut
from scheduler.client import Client, ShoalError
from scheduler.lifecycle import JobState
from scheduler.placement import describe, named_parts
from scheduler.spec import SpecError, load_job_spec
from scheduler.cli.common import (_ask, _client, _emit, _error, _fail, _for_each, _num, _table, _ts,
    _when, app, out, OUTPUT, Output)


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
        entries = _ask(lambda: client.queue(team=team))
        if not _emit(entries, output):
            t = _table("POS", "ID", "NAME", "TEAM", "USER", "PRI", "GPUS", "START", "REASON", fold="REASON")
            for e in entries:
                t.add_row(str(e.position), str(e.id), e.name, e.team, e.user, str(e.priority), str(e.gpus),
                          _when(e.estimated_start_at), e.pending_reason or "")
            out.print(t)
        return
    states = [s.value for s in state] if state else (None if all_ else
                                                     [s.value for s in JobState if not s.terminal])
    jobs = _ask(lambda: client.jobs(state=states, team=team, user=user))
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
    job, events = _ask(lambda: (client.job(job_id), client.events(job_id)))
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

    def act(jid: int) -> str:
        job = getattr(client, action)(jid)
        return f"Job {jid}: {done}" + ("" if action == "cancel" else f" ({job.state.value})")

    _for_each(job_ids, "job", act)


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

