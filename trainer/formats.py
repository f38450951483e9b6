"""Reading SFT records from local files and checking them against a data format.

Files: JSONL (`.jsonl`), JSON (`.json`: a top-level array of objects, or JSON lines),
Parquet (`.parquet`), or a directory holding such files (sorted by name, not recursive).
Every record carries `source`, "<file>:<line>" (JSON/JSONL) or "<file>:row <n>" (Parquet),
so that every problem can be reported where the user can find it.

Formats (each record becomes one of two canonical shapes):
  prompt_completion  {"prompt": str, "completion": str}        -> {"prompt", "completion"}
  alpaca             {"instruction", "input"?, "output"}        -> {"prompt", "completion"}
                     (prompt built with ALPACA_PROMPT / ALPACA_PROMPT_NO_INPUT)
  chat               {"messages": [{"role", "content"}, ...]}   -> {"messages"}
                     roles system | user | assistant (OpenAI style); at least one
                     assistant message; loss goes on every assistant message.
  auto               the format of the first record whose fields match one of the above.
"""

from __future__ import annotations

import json
from pathlib import Path

FORMATS = ("prompt_completion", "chat", "alpaca")
ROLES = ("system", "user", "assistant")
SUFFIXES = (".jsonl", ".json", ".parquet")
# The Alpaca prompt (Taori et al. 2023, stanford_alpaca/train.py), response follows.
ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides "
                 "further context. Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that "
                          "appropriately completes the request.\n\n"
                          "### Instruction:\n{instruction}\n\n### Response:\n")


class DatasetError(ValueError):
    """Invalid dataset; `.problems` lists every problem as "<file>:<line>: <problem>"."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        shown = "\n  ".join(self.problems[:50])
        more = f"\n  ... and {len(self.problems) - 50} more" if len(self.problems) > 50 else ""
        super().__init__(f"{len(self.problems)} problem(s) in dataset:\n  {shown}{more}")


# ---- reading files ------------------------------------------------------------------------
def data_files(path: str | Path) -> list[Path]:
    """The data files at `path` (a file, or a directory's *.jsonl/*.json/*.parquet)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in SUFFIXES)
        if not files:
            raise DatasetError([f"{p}: directory has no {' / '.join(SUFFIXES)} files"])
        return files
    if not p.is_file():
        raise DatasetError([f"{p}: cannot read (no such file or directory)"])
    return [p]


class Unreadable(str):
    """A record that could not be parsed; the string is the problem."""


def read_raw(path: str | Path) -> list[tuple[str, object]]:
    """[(source, parsed value or Unreadable(problem))] for every record of every file at
    `path`, in file order; a file-level problem has the file as its source."""
    rows: list[tuple[str, object]] = []
    for f in data_files(path):
        try:
            got = _read_parquet(f) if f.suffix == ".parquet" else _read_json(f)
        except OSError as e:
            got = [(str(f), Unreadable(f"cannot read ({e.strerror or e})"))]
        rows += got or [(str(f), Unreadable("no records (empty file)"))]
    return rows


def _read_json(f: Path) -> list:
    raw = f.read_bytes()
    if f.suffix == ".json" and raw.lstrip().startswith(b"["):
        return _read_json_array(f, raw)
    rows = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue  # blank lines are allowed
        try:
            value = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            value = Unreadable("not valid UTF-8")
        except json.JSONDecodeError as e:
            value = Unreadable(f"invalid JSON ({e.msg} at column {e.colno})")
        rows.append((f"{f}:{lineno}", value))
    return rows


def _read_json_array(f: Path, raw: bytes) -> list:
    """A top-level JSON array; each element's source is the line where it starts."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return [(str(f), Unreadable(f"not valid UTF-8 (byte {e.start})"))]
    decoder, rows = json.JSONDecoder(), []
    i = text.index("[") + 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text):
            return rows + [(f"{f}:{text.count(chr(10)) + 1}", Unreadable("invalid JSON (array not closed)"))]
        if text[i] == "]":
            return rows or [(str(f), Unreadable("no records (empty array)"))]
        line = text.count("\n", 0, i) + 1
        try:
            value, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            return rows + [(f"{f}:{e.lineno}", Unreadable(
                f"invalid JSON ({e.msg} at column {e.colno}); records after it not read"))]
        rows.append((f"{f}:{line}", value))


def _read_parquet(f: Path) -> list:
    import pyarrow.parquet as pq  # a dependency of `datasets`

    try:
        table = pq.read_table(f)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for bad files
        return [(str(f), Unreadable(f"not a readable Parquet file ({e})"))]
    return [(f"{f}:row {i + 1}", rec) for i, rec in enumerate(table.to_pylist())]


# ---- checking records -----------------------------------------------------------------------
def detect_format(value: object) -> str | None:
    """The format whose required fields `value` has, or None."""
    if not isinstance(value, dict):
        return None
    if "messages" in value:
        return "chat"
    if "instruction" in value and "output" in value:
        return "alpaca"
    if "prompt" in value and "completion" in value:
        return "prompt_completion"
    return None


def _string_fields(obj: dict, names: tuple[str, ...], optional: tuple[str, ...] = ()) -> str | None:
    """Problem with the string fields `names` of obj (those in `optional` may be absent/null)."""
    for key in names:
        value = obj.get(key)
        if value is None and key in optional:
            continue
        if key not in obj:
            return f"missing field '{key}'"
        if not isinstance(value, str):
            return f"field '{key}' must be a string, got {type(value).__name__}"
    return None


def check_record(value: object, fmt: str) -> tuple[dict | None, str | None]:
    """(canonical record, None) or (None, problem) for one parsed record of format `fmt`."""
    if not isinstance(value, dict):
        return None, f"expected a JSON object, got {type(value).__name__}"
    if fmt == "prompt_completion":
        if (problem := _string_fields(value, ("prompt", "completion"))):
            return None, problem
        if not value["completion"]:
            return None, "empty completion"
        return {"prompt": value["prompt"], "completion": value["completion"]}, None
    if fmt == "alpaca":
        if (problem := _string_fields(value, ("instruction", "input", "output"), optional=("input",))):
            return None, problem
        if not value["output"]:
            return None, "empty output"
        inp = value.get("input") or ""
        template = ALPACA_PROMPT if inp else ALPACA_PROMPT_NO_INPUT
        return {"prompt": template.format(instruction=value["instruction"], input=inp),
                "completion": value["output"]}, None
    if fmt == "chat":
        return _check_messages(value)
    raise ValueError(f"unknown data format {fmt!r}; expected one of {FORMATS}")


def _check_messages(value: dict) -> tuple[dict | None, str | None]:
    messages = value.get("messages")
    if not isinstance(messages, list) or not messages:
        return None, "field 'messages' must be a non-empty list of {role, content} objects"
    out, has_answer = [], False
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return None, f"messages[{i}] must be an object, got {type(m).__name__}"
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            return None, (f"messages[{i}]: unknown role {role!r} (expected one of "
                          f"{', '.join(ROLES)})")
        if not isinstance(content, str):
            return None, f"messages[{i}]: 'content' must be a string, got {type(content).__name__}"
        if role == "assistant":
            if not content:
                return None, f"messages[{i}]: empty assistant message"
            has_answer = True
        out.append({"role": role, "content": content})
    if not has_answer:
        return None, "no assistant message (nothing to train on)"
    return {"messages": out}, None


def load_records(path: str | Path, fmt: str = "auto") -> tuple[list[dict], str]:
    """(records, format) for the data at `path`; every record has a "source".

    Raises DatasetError listing every bad record (invalid JSON, missing fields,
    unknown role, empty completion, records of another format, empty files).
    """
    records, fmt, problems = collect_records(path, fmt)
    if problems:
        raise DatasetError(problems)
    return records, fmt


def collect_records(path: str | Path, fmt: str = "auto") -> tuple[list[dict], str | None, list[str]]:
    """(good records, format or None if undetectable, problems) - load_records without raising."""
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; expected auto or one of {FORMATS}")
    try:
        rows = read_raw(path)
    except DatasetError as e:
        return [], None if fmt == "auto" else fmt, e.problems
    if fmt == "auto":
        detected = next((f for _, v in rows if (f := detect_format(v))), None)
        if detected is None:
            problems = [f"{src}: {v}" for src, v in rows if isinstance(v, Unreadable)]
            if len(problems) < len(rows):
                problems.append(f"{path}: no record has the fields of a known format "
                                f"(prompt/completion, messages, or instruction/output)")
            return [], None, problems
        fmt = detected
    records, problems = [], []
    for source, value in rows:
        if isinstance(value, Unreadable):
            problems.append(f"{source}: {value}")
            continue
        rec, problem = check_record(value, fmt)
        other = detect_format(value)
        if problem and other not in (fmt, None):
            problem = f"record has the fields of format {other} but the dataset is {fmt}"
        if problem:
            problems.append(f"{source}: {problem}")
        else:
            rec["source"] = source
            records.append(rec)
    return records, fmt, problems
