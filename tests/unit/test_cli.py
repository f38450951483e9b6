"""The CLI's local verbs and its exit codes (no server needed)."""
from pathlib import Path

from typer.testing import CliRunner

from scheduler.cli import app

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def test_validate_reports_spec_and_file_problems_with_lines(tmp_path, tiny_model_dir, monkeypatch):
    ok = runner.invoke(app, ["validate", str(REPO / "examples/tiny-lora.yaml")])
    assert ok.exit_code == 0 and "400 training records, 60 validation" in ok.output

    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 3, "completion": "b"}\n{oops\n')
    spec = tmp_path / "job.yaml"
    spec.write_text((REPO / "examples/tiny-lora.yaml").read_text()
                    .replace("train: data/tiny-sft/train.jsonl", f"train: {data}")
                    .replace("model: models/tiny-llama", f"model: {tiny_model_dir}"))
    bad = runner.invoke(app, ["validate", str(spec)])
    assert bad.exit_code == 2
    assert f"dataset.train: {data}:2:" in bad.output and f"dataset.train: {data}:3:" in bad.output

    spec.write_text("name: x\nteam: a\nmodel: m\ndataset: {train: t}\nhyperparameters:\n  epochs: -2\n")
    bad = runner.invoke(app, ["validate", str(spec)])
    assert bad.exit_code == 2 and f"{spec}:6: hyperparameters.epochs" in bad.output


def test_no_server_is_exit_code_3(tmp_path, monkeypatch):
    monkeypatch.setenv("SHOAL_HOME", str(tmp_path))
    res = runner.invoke(app, ["queue"])
    assert res.exit_code == 3 and "no Shoal server found" in res.output
    monkeypatch.setenv("SHOAL_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    res = runner.invoke(app, ["status", "1"])
    assert res.exit_code == 3 and "cannot reach" in res.output
    res = runner.invoke(app, ["down"])
    assert res.exit_code == 0 and "not running" in res.output


def test_validate_a_data_file_alone(tmp_path, tiny_model_dir):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "x", "completion": ""}\n{oops\n'
                    '{"messages": [{"role": "robot", "content": "hi"}]}\n')
    bad = runner.invoke(app, ["validate", str(data)])
    assert bad.exit_code == 2 and "invalid data (3 problem(s))" in bad.output
    for line, what in ((2, "empty completion"), (3, "invalid JSON"), (4, "")):
        assert f"{data}:{line}: {what}" in bad.output

    data.write_text('{"prompt": "What is 1 + 1?", "completion": " 2"}\n'
                    '{"prompt": "' + "apple " * 40 + '", "completion": " x"}\n')
    ok = runner.invoke(app, ["validate", str(data)])
    assert ok.exit_code == 0 and "prompt_completion, 2 records" in ok.output
    long = runner.invoke(app, ["validate", str(data), "--model", str(tiny_model_dir), "--max-length", "16"])
    assert long.exit_code == 2 and f"{data}:2: record is" in long.output and "longer than max_length=16" in long.output
    dropped = runner.invoke(app, ["validate", str(data), "--model", str(tiny_model_dir), "--max-length", "16",
                                  "--policy", "drop"])
    assert dropped.exit_code == 0 and "1 examples" in dropped.output and "1 dropped at max_length 16" in dropped.output
    assert "lengths <=32:1" in dropped.output
    wrong = runner.invoke(app, ["validate", str(data), "--policy", "cut", "--format", "csv"])
    assert wrong.exit_code == 2 and "--policy: 'cut'" in wrong.output and "--format: 'csv'" in wrong.output
