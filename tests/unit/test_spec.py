from pathlib import Path

import pytest

from scheduler.spec import ClusterConfig, SpecError, load_cluster_config, load_job_spec, parse_job_spec

GOOD = """\
name: tiny-lora
team: default
model: ./models/tiny
dataset:
  train: data/train.jsonl
  validation: data/val.jsonl
hyperparameters:
  learning_rate: 0.001
  max_steps: 10
resources:
  gpus: 1
"""


def test_good_spec_resolves_relative_paths_against_its_folder(tmp_path: Path):
    f = tmp_path / "sub" / "job.yaml"
    f.parent.mkdir()
    f.write_text(GOOD)
    spec = load_job_spec(f)
    assert spec.model == str((tmp_path / "sub" / "models" / "tiny").resolve())
    assert spec.dataset.validation == str((tmp_path / "sub" / "data" / "val.jsonl").resolve())
    assert spec.hyperparameters.max_steps == 10
    assert spec.resources.gpus == 1


def test_every_invalid_field_is_named_with_its_line():
    bad = GOOD.replace("learning_rate: 0.001", "learning_rate: -1\n  learning_rte: 3").replace(
        "gpus: 1", "gpus: zero").replace("team: default", "team: Bad Team")
    with pytest.raises(SpecError) as e:
        parse_job_spec(bad, "job.yaml")
    problems = e.value.problems
    text = "\n".join(problems)
    assert "job.yaml:2: team:" in text
    assert "job.yaml:8: hyperparameters.learning_rate:" in text
    assert "job.yaml:9: hyperparameters.learning_rte: unknown field" in text
    assert any(p.startswith("job.yaml:12: resources.gpus") for p in problems)
    assert len({p.split(":")[2] for p in problems}) >= 4


def test_missing_required_fields_and_bad_yaml():
    with pytest.raises(SpecError) as e:
        parse_job_spec("name: x\n", "j.yaml")
    fields = {p.split(": ")[1] for p in e.value.problems}
    assert {"team", "model", "dataset"} <= fields
    with pytest.raises(SpecError, match=r"j.yaml:2: invalid YAML"):
        parse_job_spec("name: x\n  bad: [\n", "j.yaml")
    with pytest.raises(SpecError, match="expected a mapping"):
        parse_job_spec("- a\n- b\n", "j.yaml")


def test_gpus_bounds_and_full_with_lora_settings():
    with pytest.raises(SpecError, match="resources.gpus"):
        parse_job_spec(GOOD.replace("gpus: 1", "gpus: 0"))
    with pytest.raises(SpecError, match="method is 'full'"):
        parse_job_spec(GOOD + "method: full\nlora:\n  r: 4\n")


def test_cluster_config_defaults_and_unknown_gpu_model(tmp_path: Path):
    assert load_cluster_config(None) == ClusterConfig()
    f = tmp_path / "c.yaml"
    f.write_text("local:\n  gpus: 4\n  gpu_model: L4\nteams:\n  a: {gpus: -1}\n")
    with pytest.raises(SpecError) as e:
        load_cluster_config(f)
    text = "\n".join(e.value.problems)
    assert "c.yaml:5: teams.a.gpus" in text
