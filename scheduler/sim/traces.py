"""Trace readers. Each turns a file into `TraceJob`s (submit time, run time, GPU count, group,
user), sorted by submit time, with every bad row reported as `file:line: column: message`.
A bad row stops the read (TraceError lists them all) unless `skip_bad=True`, in which case the
row is left out and listed in `Trace.skipped`, so the report can say what was dropped.

Column mappings:

  Philly (`read_philly`, the processed Microsoft Philly trace of Jeon et al., ATC'19, as shipped
  with AdaptDL/Pollux; see ../shared/traces/README.md):
      timestamp  -> submit time ('YYYY-MM-DD HH:MM:SS', read as UTC)
      duration   -> run time in seconds on its GPUs (> 0)
      num_gpus   -> GPU count (integer >= 1)
      gpu_time   -> checked: must equal duration x num_gpus (within 1 s per GPU)
      cluster    -> group (the virtual cluster; the cluster YAML maps groups to teams)
      (no user column: user = group)

  Generic CSV (`read_csv`): the caller names the columns, e.g.
      {"submit": "ts", "duration": "run_s", "gpus": "n", "group": "vc", "user": "who"}
  `submit` and `duration` and `gpus` are required; `submit` is seconds (a number) or an ISO 8601
  datetime; `group` defaults to "default" and `user` to the group when not mapped.

  Shoal's own history (`read_history`): every SUCCEEDED job of a Shoal store (any store URL):
      submitted_at -> submit time, attained GPU-seconds / gpus -> run time, gpus, team -> group,
      user; plus the job's own memory estimate, shareable flag and priority, so a site replays its
      own past jobs as they were (the SFT workload model is not needed for them).
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path


class TraceError(ValueError):
    def __init__(self, problems: list[str]):
        self.problems = problems
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        super().__init__("\n".join(shown))


@dataclass(frozen=True)
class TraceJob:
    submit_s: float  # seconds since the Unix epoch (or any fixed origin)
    duration_s: float  # run time on `gpus` exclusive GPUs, seconds
    gpus: int
    group: str  # virtual cluster / queue / team key
    user: str
    line: int  # 1-based line in the source (0 when not from a file)
    # Known facts about the job (store history); None lets the workload model draw them.
    memory_per_gpu_mib: int | None = None
    shareable: bool | None = None
    priority: int = 0
    name: str | None = None
    # The run-time estimate the policy saw (store history: the spec's resources.expected_duration_s,
    # None if the user gave none); `history` marks a job read from a store, whose estimate is kept.
    estimate_s: float | None = None
    history: bool = False


@dataclass
class Trace:
    source: str
    jobs: list[TraceJob]
    skipped: list[str] = field(default_factory=list)  # 'file:line: column: message' of rows left out

    def first(self, n: int | None) -> Trace:
        """The first `n` jobs by submit time (all when n is None)."""
        if n is None:
            return self
        if n < 1:
            raise ValueError(f"jobs: must be at least 1 (got {n})")
        return Trace(self.source, self.jobs[:n], self.skipped)


def _finish(source: str, jobs: list[TraceJob], problems: list[str], skip_bad: bool) -> Trace:
    if problems and not skip_bad:
        raise TraceError(problems + ["(pass --skip-bad-rows to leave these rows out and go on)"])
    if not jobs:
        raise TraceError([f"{source}: no valid jobs in the trace"])
    jobs.sort(key=lambda j: (j.submit_s, j.line))
    return Trace(source, jobs, problems)


def _number(row: dict, col: str, where: str, problems: list[str], *, integer: bool = False,
            positive: bool = True) -> float | None:
    raw = (row.get(col) or "").strip()
    if raw == "":
        problems.append(f"{where}: {col}: missing value")
        return None
    try:
        v = float(raw)
    except ValueError:
        problems.append(f"{where}: {col}: {raw!r} is not a number")
        return None
    if not math.isfinite(v):
        problems.append(f"{where}: {col}: {raw!r} is not a finite number")
        return None
    if integer and v != int(v):
        problems.append(f"{where}: {col}: {raw!r} is not a whole number")
        return None
    if positive and v <= 0:
        problems.append(f"{where}: {col}: {raw!r} must be greater than 0")
        return None
    return v


def _time(raw: str, col: str, where: str, problems: list[str]) -> float | None:
    raw = (raw or "").strip()
    if raw == "":
        problems.append(f"{where}: {col}: missing value")
        return None
    try:
        return float(raw)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(raw)
    except ValueError:
        problems.append(f"{where}: {col}: {raw!r} is neither seconds nor a date-time like 2017-10-09 07:01:55")
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def _open_csv(path: Path, required: list[str]) -> tuple[list[tuple[int, dict]], str]:
    source = str(path)
    try:
        f = path.open(newline="")
    except OSError as e:
        raise TraceError([f"{source}: cannot read: {e.strerror}"]) from None
    with f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in required if c not in header]
        if missing:
            raise TraceError([f"{source}:1: missing column(s) {', '.join(missing)} "
                              f"(header has: {', '.join(header) or 'nothing'})"])
        rows = []
        for row in reader:
            rows.append((reader.line_num, row))
    return rows, source


PHILLY_COLUMNS = ["timestamp", "duration", "num_gpus", "gpu_time", "cluster"]


def read_philly(path: str | Path, *, skip_bad: bool = False) -> Trace:
    rows, source = _open_csv(Path(path), PHILLY_COLUMNS)
    jobs: list[TraceJob] = []
    problems: list[str] = []
    for line, row in rows:
        where = f"{source}:{line}"
        before = len(problems)
        submit = _time(row.get("timestamp", ""), "timestamp", where, problems)
        duration = _number(row, "duration", where, problems)
        gpus = _number(row, "num_gpus", where, problems, integer=True)
        gpu_time = _number(row, "gpu_time", where, problems, positive=False)
        group = (row.get("cluster") or "").strip()
        if not group:
            problems.append(f"{where}: cluster: missing value")
        if duration is not None and gpus is not None and gpu_time is not None \
                and abs(gpu_time - duration * gpus) > gpus:
            problems.append(f"{where}: gpu_time: {gpu_time:g} is not duration x num_gpus "
                            f"({duration:g} x {gpus:g} = {duration * gpus:g})")
        if len(problems) == before:
            jobs.append(TraceJob(submit, duration, int(gpus), group, group, line))
    return _finish(source, jobs, problems, skip_bad)


def parse_columns(text: str) -> dict[str, str]:
    """'submit=ts,duration=run_s,gpus=n' -> mapping; errors name the bad part."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, col = part.partition("=")
        if not sep or not key.strip() or not col.strip():
            raise TraceError([f"--columns: {part!r} is not field=column"])
        out[key.strip()] = col.strip()
    return out


CSV_FIELDS = {"submit", "duration", "gpus", "group", "user"}


def read_csv(path: str | Path, columns: dict[str, str], *, skip_bad: bool = False) -> Trace:
    unknown = set(columns) - CSV_FIELDS
    if unknown:
        raise TraceError([f"--columns: unknown field(s) {', '.join(sorted(unknown))} "
                          f"(known: {', '.join(sorted(CSV_FIELDS))})"])
    missing = [k for k in ("submit", "duration", "gpus") if k not in columns]
    if missing:
        raise TraceError([f"--columns: map {', '.join(missing)} to a column (e.g. submit=ts,duration=run_s,gpus=n)"])
    rows, source = _open_csv(Path(path), list(columns.values()))
    jobs: list[TraceJob] = []
    problems: list[str] = []
    for line, row in rows:
        where = f"{source}:{line}"
        before = len(problems)
        submit = _time(row.get(columns["submit"], ""), columns["submit"], where, problems)
        duration = _number(row, columns["duration"], where, problems)
        gpus = _number(row, columns["gpus"], where, problems, integer=True)
        group = (row.get(columns["group"]) or "").strip() if "group" in columns else "default"
        if not group:
            problems.append(f"{where}: {columns['group']}: missing value")
        user = (row.get(columns["user"]) or "").strip() if "user" in columns else group
        if len(problems) == before:
            jobs.append(TraceJob(submit, duration, int(gpus), group, user or group, line))
    return _finish(source, jobs, problems, skip_bad)


def read_history(url: str, *, skip_bad: bool = False) -> Trace:
    """SUCCEEDED jobs of a Shoal store (e.g. sqlite:///.shoal/shoal.db). A job without recorded
    GPU time (it never held GPUs) is a bad row."""
    from scheduler.lifecycle import JobState
    from scheduler.store import Store

    store = Store(url)
    try:
        records = store.jobs(states=[JobState.SUCCEEDED])
    finally:
        store.close()
    jobs: list[TraceJob] = []
    problems: list[str] = []
    for r in records:
        if r.attained_gpu_s <= 0 or r.gpus < 1:
            problems.append(f"{url}: job {r.id}: attained_gpu_s: no GPU time recorded")
            continue
        res = (r.spec or {}).get("resources", {}) or {}
        jobs.append(TraceJob(r.submitted_at, r.attained_gpu_s / r.gpus, r.gpus, r.team, r.user, r.id,
                             memory_per_gpu_mib=r.memory_per_gpu_mib, shareable=bool(res.get("shareable", False)),
                             priority=r.priority, name=r.name,
                             estimate_s=float(res["expected_duration_s"]) if res.get("expected_duration_s") else None,
                             history=True))
    return _finish(url, jobs, problems, skip_bad)


def read_trace(trace: str, fmt: str = "auto", columns: str | None = None, *, skip_bad: bool = False) -> Trace:
    """Dispatch: fmt 'philly' | 'csv' (needs columns) | 'shoal' (a store URL) | 'auto' (a URL with
    '://' is a store; a CSV whose header is Philly's is Philly; else csv with columns)."""
    if fmt == "auto":
        if "://" in trace:
            fmt = "shoal"
        elif columns:
            fmt = "csv"
        else:
            fmt = "philly"
    if fmt == "philly":
        return read_philly(trace, skip_bad=skip_bad)
    if fmt == "csv":
        if not columns:
            raise TraceError(["--columns: a generic CSV trace needs a column mapping, e.g. "
                              "--columns submit=ts,duration=run_s,gpus=n,group=vc"])
        return read_csv(trace, parse_columns(columns), skip_bad=skip_bad)
    if fmt == "shoal":
        return read_history(trace, skip_bad=skip_bad)
    raise TraceError([f"--format: unknown trace format {fmt!r} (philly, csv, shoal, auto)"])
