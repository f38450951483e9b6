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
