"""Reading records from JSONL / JSON / Parquet files and folders, format detection, and every
validation error with its file and line."""

import json

import pytest

from trainer import formats as F


def write_jsonl(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


PC = {"prompt": "What is 1 + 1?", "completion": " 2"}
CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello"}]}
ALPACA = {"instruction": "Uppercase the word.", "input": "apple", "output": "APPLE"}


@pytest.mark.parametrize("record,fmt", [(PC, "prompt_completion"), (CHAT, "chat"), (ALPACA, "alpaca")])
def test_auto_detects_each_format(tmp_path, record, fmt):
    records, found = F.load_records(write_jsonl(tmp_path / "d.jsonl", [record, record]))
    assert found == fmt and len(records) == 2
    assert records[1]["source"] == f"{tmp_path / 'd.jsonl'}:2"


def test_alpaca_becomes_prompt_completion_with_the_alpaca_template(tmp_path):
    no_input = {"instruction": "Say hi.", "output": "hi"}
    (with_input, _), (without, _) = (F.check_record(ALPACA, "alpaca"), F.check_record(no_input, "alpaca"))
    assert with_input == {"prompt": F.ALPACA_PROMPT.format(instruction="Uppercase the word.", input="apple"),
                          "completion": "APPLE"}
    assert without["prompt"] == F.ALPACA_PROMPT_NO_INPUT.format(instruction="Say hi.")
    assert "### Input:" in with_input["prompt"] and "### Input:" not in without["prompt"]


def test_every_bad_chat_record_is_reported_with_its_line(tmp_path):
    f = write_jsonl(tmp_path / "chat.jsonl", [
        CHAT,                                                                       # 1 ok
        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},  # 2
        {"messages": [{"role": "user", "content": "only a question"}]},             # 3
        {"messages": []},                                                           # 4
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},  # 5
        {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]},   # 6
        {"messages": ["hello"]},                                                    # 7
        PC,                                                                         # 8 other format
        "{broken",                                                                  # 9
    ])
    with pytest.raises(F.DatasetError) as err:
        F.load_records(f, "chat")
    problems = err.value.problems
    assert [p.split(": ")[0] for p in sorted(problems, key=lambda p: int(p.split(":")[1]))] == \
        [f"{f}:{n}" for n in range(2, 10)]
    text = "\n".join(problems)
    for expected in ("unknown role 'robot'", "no assistant message", "non-empty list",
                     "empty assistant message", "'content' must be a string", "must be an object",
                     "fields of format prompt_completion but the dataset is chat", "invalid JSON"):
        assert expected in text, expected


def test_pc_and_alpaca_field_errors(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [ALPACA, {"instruction": "x"}, {"instruction": "x", "output": ""},
                                           {"instruction": 1, "output": "y"}])
    with pytest.raises(F.DatasetError) as err:
        F.load_records(f, "alpaca")
    assert [p.removeprefix(f"{f}:") for p in err.value.problems] == [
        "2: missing field 'output'", "3: empty output", "4: field 'instruction' must be a string, got int"]


def test_auto_with_no_known_format_says_which_fields_it_wanted(tmp_path):
    f = write_jsonl(tmp_path / "x.jsonl", [{"text": "a"}, {"question": "b"}])
    with pytest.raises(F.DatasetError, match="prompt/completion, messages, or instruction/output"):
        F.load_records(f)


def test_json_array_reports_the_line_each_record_starts_on(tmp_path):
    f = tmp_path / "d.json"
    f.write_text('[\n  {"prompt": "a", "completion": " b"},\n  {"prompt": "c",\n   "completion": ""},\n'
                 '  {"prompt": "e", "completion": " f"}\n]\n')
    with pytest.raises(F.DatasetError) as err:
        F.load_records(f)
    assert err.value.problems == [f"{f}:3: empty completion"]
    f.write_text('[{"prompt": "a", "completion": " b"},\n {"prompt": "c" "completion": " d"}]')
    with pytest.raises(F.DatasetError, match=r"d.json:2: invalid JSON"):
        F.load_records(f)


def test_json_file_of_json_lines_is_read_like_jsonl(tmp_path):
    f = write_jsonl(tmp_path / "d.json", [PC, PC])
    assert len(F.load_records(f)[0]) == 2


def test_parquet_rows_and_folders(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    folder = tmp_path / "data"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([PC, {"prompt": "x", "completion": ""}]), folder / "b.parquet")
    write_jsonl(folder / "a.jsonl", [PC])
    (folder / "notes.txt").write_text("ignored")
    with pytest.raises(F.DatasetError) as err:
        F.load_records(folder)
    assert err.value.problems == [f"{folder / 'b.parquet'}:row 2: empty completion"]
    pq.write_table(pa.Table.from_pylist([PC, PC]), folder / "b.parquet")
    records, fmt = F.load_records(folder)
    assert fmt == "prompt_completion"
    assert [r["source"] for r in records] == [f"{folder / 'a.jsonl'}:1", f"{folder / 'b.parquet'}:row 1",
                                              f"{folder / 'b.parquet'}:row 2"]
    (folder / "c.parquet").write_bytes(b"not parquet")
    with pytest.raises(F.DatasetError, match="not a readable Parquet file"):
        F.load_records(folder)


def test_empty_missing_and_empty_folder(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(F.DatasetError, match="no records"):
        F.load_records(tmp_path / "empty.jsonl")
    with pytest.raises(F.DatasetError, match="no such file"):
        F.load_records(tmp_path / "missing.jsonl")
    (tmp_path / "dir").mkdir()
    with pytest.raises(F.DatasetError, match="directory has no"):
        F.load_records(tmp_path / "dir")
    with pytest.raises(ValueError, match="unknown data format"):
        F.load_records(tmp_path / "empty.jsonl", "sharegpt")
