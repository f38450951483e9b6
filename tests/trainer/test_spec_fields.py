"""The trainer's job-spec fields: parsing with line numbers, mapping onto TrainConfig, and the
submit-time file checks (formats, length policy, chat template, storage root, QLoRA)."""

import json

import pytest

from scheduler.admission import SubmitError, check_files, storage_root
from scheduler.executor import LaunchRequest
from scheduler.ray_executor import train_config
from scheduler.spec import JobSpec, SpecError, parse_job_spec
from trainer.config import TrainConfig

from .conftest import DATA, REPO

SPEC = """\
name: t
team: default
model: /m
dataset:
  train: /t.jsonl
  format: chat
  max_length_policy: drop
method: dora
hyperparameters:
  packing: true
  gradient_checkpointing: true
eval:
  every_steps: 5
  generate_examples: 4
  max_new_tokens: 8
  metric: my.metrics:score
  early_stopping_patience: 2
  early_stopping_min_delta: 0.01
export:
  merge: true
target:
  eval_loss: 1.5
  score: 0.8
"""


def test_new_fields_parse_and_reach_the_trainer():
    spec = parse_job_spec(SPEC)
    req = LaunchRequest(job_id=1, attempt=1, spec=spec.model_dump(mode="json"), node_id="n", gpu_indices=(0,),
                        memory_per_gpu_mib=1, job_dir="/j", output_dir="/o", price_per_gpu_hour=2.49)
    cfg = TrainConfig.model_validate(train_config(req))
    assert (cfg.data_format, cfg.max_length_policy, cfg.method, cfg.packing) == ("chat", "drop", "dora", True)
    assert cfg.gradient_checkpointing and cfg.merge
    assert (cfg.eval_every_steps, cfg.eval_generate_examples, cfg.eval_max_new_tokens) == (5, 4, 8)
    assert (cfg.eval_metric, cfg.early_stopping_patience, cfg.early_stopping_min_delta) == \
        ("my.metrics:score", 2, 0.01)
    assert cfg.target == {"eval_loss": 1.5, "score": 0.8}
    assert (cfg.price_per_gpu_hour, cfg.job_name) == (2.49, "t")


def test_defaults_map_to_the_error_policy_and_no_extras():
    spec = parse_job_spec("name: t\nteam: default\nmodel: /m\ndataset: {train: /t.jsonl}\n")
    req = LaunchRequest(job_id=1, attempt=1, spec=spec.model_dump(mode="json"), node_id="n", gpu_indices=(0,),
                        memory_per_gpu_mib=1, job_dir="/j", output_dir="/o")
    cfg = TrainConfig.model_validate(train_config(req))
    assert (cfg.max_length_policy, cfg.data_format, cfg.packing, cfg.merge) == ("error", "auto", False, False)
    assert cfg.price_per_gpu_hour is None and cfg.target == {}


@pytest.mark.parametrize("patch,line,message", [
    (("format: chat", "format: sharegpt"), 6, "dataset.format"),
    (("max_length_policy: drop", "max_length_policy: cut"), 7, "dataset.max_length_policy"),
    (("method: dora", "method: prefix"), 8, "method"),
    (("max_new_tokens: 8", "max_new_tokenz: 8"), 15, "eval.max_new_tokenz: unknown field"),
    (("metric: my.metrics:score", "metric: nocolon"), 16, "eval.metric"),
    (("  merge: true", "  merge: maybe"), 20, "export.merge"),
    (("  score: 0.8", "  score: high"), 23, "target.score"),
])
def test_bad_new_fields_are_reported_with_their_line(patch, line, message):
    with pytest.raises(SpecError) as err:
        parse_job_spec(SPEC.replace(*patch), "job.yaml")
    assert any(p.startswith(f"job.yaml:{line}: {message}") for p in err.value.problems), err.value.problems


@pytest.mark.parametrize("extra,message", [
    ({"eval": {"metric": "m:f"}}, "metric needs generate_examples"),
    ({"eval": {"early_stopping_patience": 2}}, "early_stopping_patience needs every_steps"),
    ({"target": {"bleu": 0.3}}, "target: unknown metric 'bleu'"),
    ({"target": {"exact_match": 0.3}}, "exact_match needs eval.generate_examples"),
    ({"method": "full", "export": {"merge": True}}, "export.merge is for adapters"),
])
def test_inconsistent_settings_are_refused(extra, message):
    with pytest.raises(ValueError, match=message):
        JobSpec.model_validate({"name": "t", "team": "a", "model": "/m", "dataset": {"train": "/t"}, **extra})


# ---- submit-time file checks ------------------------------------------------------------------
def spec_for(model, train, **kw) -> JobSpec:
    return JobSpec.model_validate({"name": "t", "team": "default", "model": str(model),
                                   "dataset": {"train": str(train), **kw.pop("dataset", {})},
                                   "resources": {"gpus": 1}, **kw})


def test_check_files_gives_a_summary_for_the_estimator(tiny_model_dir):
    files = check_files(spec_for(tiny_model_dir, DATA / "train.jsonl", hyperparameters={"max_length": 64}))
    assert files.train_records == 400 and files.train_summary["tokens"] > 400
    assert files.train_summary["format"] == "prompt_completion" and files.train_summary["histogram"]


def test_check_files_reports_length_and_format_problems_together(tiny_model_dir, tmp_path):
    f = tmp_path / "mixed.jsonl"
    f.write_text("\n".join([json.dumps({"prompt": "Uppercase: apple", "completion": " APPLE"}),
                            json.dumps({"prompt": "x " * 40, "completion": " y"}),
                            "{oops", json.dumps({"prompt": "a", "completion": ""})]) + "\n")
    with pytest.raises(SubmitError) as err:
        check_files(spec_for(tiny_model_dir, f, hyperparameters={"max_length": 16}))
    assert [p.split(": ")[1] for p in err.value.problems] == [f"{f}:{n}" for n in (2, 3, 4)]
    for problem, what in zip(err.value.problems, ("longer than max_length=16", "invalid JSON", "empty completion")):
        assert what in problem


def test_chat_data_for_a_model_without_template_is_refused_at_submit(tiny_model_dir, tmp_path):
    import shutil
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    cfg_file = model / "tokenizer_config.json"
    tc = json.loads(cfg_file.read_text())
    tc.pop("chat_template", None)
    cfg_file.write_text(json.dumps(tc))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(SubmitError, match="no chat template"):
        check_files(spec_for(model, REPO / "examples/data/tiny-chat/train.jsonl"))


def test_output_outside_the_storage_root_is_refused(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SHOAL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SHOAL_STORAGE_ROOT", raising=False)
    assert storage_root() == (tmp_path / "home").resolve()
    ok = spec_for(tiny_model_dir, DATA / "train.jsonl", output=str(tmp_path / "home" / "mine"))
    check_files(ok)
    bad = spec_for(tiny_model_dir, DATA / "train.jsonl", output=str(tmp_path / "elsewhere"))
    with pytest.raises(SubmitError, match=r"output: .*elsewhere is outside the storage root"):
        check_files(bad)
    monkeypatch.setenv("SHOAL_STORAGE_ROOT", str(tmp_path))
    check_files(bad)


def test_qlora_without_bitsandbytes_is_refused_at_submit(tiny_model_dir):
    pytest.importorskip("pytest")
    import importlib.util
    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes installed here")
    with pytest.raises(SubmitError, match="method: qlora needs the bitsandbytes package"):
        check_files(spec_for(tiny_model_dir, DATA / "train.jsonl", method="qlora"))


def test_the_data_summary_reaches_the_estimator(tiny_model_dir):
    from scheduler.admission import check_submission
    from scheduler.estimate import training_positions
    from scheduler.policy import GpuView, NodeView, TeamQuota
    from scheduler.spec import ClusterConfig, TeamConfig

    nodes = (NodeView("n1", "n1", tuple(GpuView(i, "H100 80GB", 81920, 0) for i in range(2))),)
    cfg = ClusterConfig(teams={"default": TeamConfig(gpus=2)})

    def admit(**hp):
        spec = spec_for(tiny_model_dir, DATA / "train.jsonl", hyperparameters={"max_length": 64, **hp})
        return check_submission(spec, cfg, nodes, (TeamQuota("default", 2),))

    summary = check_files(spec_for(tiny_model_dir, DATA / "train.jsonl",
                                   hyperparameters={"max_length": 64})).train_summary
    one, two = admit(), admit(epochs=2)
    assert one.train_positions >= summary["tokens"]  # real tokens plus padding
    assert two.train_positions == 2 * one.train_positions
    assert two.estimated_duration_s == pytest.approx(2 * one.estimated_duration_s) and one.estimated_duration_s > 0
    packed = admit(packing=True)
    assert packed.train_positions == summary["tokens"] < one.train_positions
    assert admit(max_steps=3, batch_size=4).train_positions == int(3 * 4 * max(
        summary["tokens"] / summary["examples"], min(32, summary["max_tokens"])))  # all lengths <=32


def test_training_positions_pads_to_the_expected_batch_maximum():
    # 90 short examples (<=32) and 10 long (<=256): a batch of 8 likely holds a long one
    summary = {"examples": 100, "tokens": 90 * 20 + 10 * 200, "max_tokens": 200, "max_length": 512,
               "histogram": {"<=32": 90, "<=256": 10}}
    from scheduler.estimate import training_positions
    kw = dict(epochs=1, max_steps=None, grad_accum_steps=1, gpus=1)
    batch_max = 32 * 0.9 ** 8 + 200 * (1 - 0.9 ** 8)  # the long bucket's edge capped at max_tokens
    assert training_positions(summary, batch_size=8, packing=False, **kw) == int(100 * batch_max)
    assert training_positions(summary, batch_size=1, packing=False, **kw) == 100 * 38  # no padding: the mean
    assert training_positions(summary, batch_size=8, packing=True, **kw) == summary["tokens"]
    assert training_positions({"examples": 0}, batch_size=8, packing=False, **kw) == 0
