"""The whole path, for real: CLI -> REST API -> store -> policy -> Ray Train workers running the
LoRA SFT loop on fake GPUs -> adapter on disk -> /metrics over HTTP."""
from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from scheduler.lifecycle import JobState
from tests.integration.harness import REPO, ShoalServer, write_spec

pytestmark = pytest.mark.ray


@pytest.fixture
def server(tmp_path, tiny_model_dir):
    s = ShoalServer(tmp_path / "home")
    s.up()
    yield s
    s.down()
    assert not (s.home / "daemon.json").exists(), "shoal down left the server running"


def _metric(text: str, name: str, **labels) -> list[float]:
    """Values of the samples of `name` whose labels include `labels` (parsed as Prometheus does)."""
    return [s.value for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def _val_loss(model, tokenizer) -> float:
    from trainer.data import collate, encode_pairs, load_pairs
    from trainer.loop import evaluate

    enc = encode_pairs(tokenizer, load_pairs(REPO / "examples/data/tiny-sft/val.jsonl"), 64)
    batches = [collate(enc[i:i + 8], tokenizer.pad_token_id) for i in range(0, len(enc), 8)]
    return evaluate(model, batches, "cpu")


def test_tiny_lora_job_end_to_end(server, tiny_model_dir):
    client = server.client()
    proc = server.cli("submit", "examples/tiny-lora.yaml", "--watch", check=False, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr + server.log()[-3000:]
    assert "SUCCEEDED" in proc.stdout and "validation loss" in proc.stdout

    job = client.jobs(state=["SUCCEEDED"])[0]
    states = [e.to_state for e in client.events(job.id)]
    assert states == ["QUEUED", "ADMITTED", "STARTING", "RUNNING", "SUCCEEDED"]
    assert job.placement is None and job.attempt == 1
    r = job.result
    assert r["steps"] == 60 and math.isfinite(r["eval_loss"])
    assert r["eval_loss"] < r["eval_loss_initial"]

    # The adapter is a real PEFT adapter; measured here, independently of the trainer's report.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True, dtype=torch.float32)
    base_loss = _val_loss(base, tok)
    tuned = PeftModel.from_pretrained(base, r["output_dir"])
    tuned_loss = _val_loss(tuned, tok)
    assert math.isfinite(tuned_loss) and tuned_loss < base_loss - 0.5
    assert tuned_loss == pytest.approx(r["eval_loss"], rel=1e-3)

    # Logs hold the steps; /metrics over HTTP shows the job and the GPU series.
    log = "".join(client.follow_logs(job.id))
    assert "step 60/60" in log and "RUNNING -> SUCCEEDED" in log
    text = httpx.get(f"{client.url}/metrics").text
    assert _metric(text, "shoal_jobs", state="SUCCEEDED", team="default") == [1.0]
    assert _metric(text, "shoal_jobs", state="RUNNING", team="default") == [0.0]
    assert len(_metric(text, "DCGM_FI_DEV_FB_USED", modelName="H100 80GB")) == 8
    assert len(_metric(text, "DCGM_FI_DEV_GPU_UTIL")) == 8

    out = server.cli("queue", "--all", "--output", "json")
    assert [j["state"] for j in json.loads(out.stdout)] == ["SUCCEEDED"]

    # The attempt's runner actor is gone (no process per finished job is left behind).
    deadline = time.monotonic() + 20
    while _processes("ray::JobRunner"):
        assert time.monotonic() < deadline, _processes("ray::JobRunner")
        time.sleep(0.5)


def _processes(title: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text.startswith(title):
            found.append(text)
    return found


def test_running_job_shows_on_its_gpu_in_metrics_and_cancel_stops_it(server, tmp_path):
    client = server.client()
    spec = write_spec(tmp_path / "long.yaml", **{"hyperparameters.max_steps": 100000, "name": "long"})
    job = client.submit_file(spec)
    deadline = time.monotonic() + 180
    while client.job(job.id).state is not JobState.RUNNING:
        assert time.monotonic() < deadline, server.log()[-3000:]
        time.sleep(0.5)
    gpu = client.job(job.id).placement["gpu_indices"][0]
    # RUNNING comes with the job's first report, which may precede its first step: wait for the step
    deadline = time.monotonic() + 60
    while not _metric(text := httpx.get(f"{client.url}/metrics").text, "shoal_job_step", job_id=str(job.id)):
        assert time.monotonic() < deadline, "progress is not exported"
        time.sleep(0.5)
    assert _metric(text, "DCGM_FI_DEV_FB_USED", gpu=str(gpu), job_id=str(job.id), team="default") == [
        float(job.memory_per_gpu_mib)]
    assert _metric(text, "shoal_jobs", state="RUNNING", team="default") == [1.0]
    assert _metric(text, "shoal_job_step", job_id=str(job.id))  # progress is exported
    # Over quota while the first job holds a GPU: it waits, and `shoal queue` says why.
    big = client.submit_file(write_spec(tmp_path / "big.yaml", name="big", **{"resources.gpus": 8}))
    deadline = time.monotonic() + 30
    while client.job(big.id).pending_reason is None:
        assert time.monotonic() < deadline
        time.sleep(0.3)
    reason = "waiting for quota: team default uses 1/8 GPUs, job needs 8; no cohort to borrow from"
    assert client.job(big.id).pending_reason == reason and client.job(big.id).state is JobState.QUEUED
    assert reason in " ".join(server.cli("queue").stdout.split())
    server.cli("cancel", str(big.id))
    assert client.wait(big.id, timeout=30).state is JobState.CANCELLED
    server.cli("cancel", str(job.id))
    final = client.wait(job.id, timeout=120)
    assert final.state is JobState.CANCELLED
    text = httpx.get(f"{client.url}/metrics").text
    assert _metric(text, "DCGM_FI_DEV_FB_USED", gpu=str(gpu)) == [0.0]


def test_bad_spec_is_refused_with_every_field_named_and_nothing_queued(server, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "examples/tiny-lora.yaml").read_text()
                   .replace("learning_rate: 0.003", "learning_rate: -1")
                   .replace("batch_size: 8", "batch_size: 8\n  batchsize: 4")
                   .replace("model: models/tiny-llama", "model: models/nope")
                   .replace("team: default", "team: Default"))
    proc = server.cli("submit", str(bad), check=False)
    assert proc.returncode == 2
    assert "team:" in proc.stderr and "hyperparameters.learning_rate" in proc.stderr
    assert "hyperparameters.batchsize: unknown field" in proc.stderr
    assert re.search(r"bad.yaml:\d+: hyperparameters.learning_rate", proc.stderr)
    # Valid shape but wrong content (missing model dir, unknown team) is refused by the server.
    bad.write_text((REPO / "examples/tiny-lora.yaml").read_text()
                   .replace("model: models/tiny-llama", f"model: {REPO}/examples/models/nope")
                   .replace("team: default", "team: nobody")
                   .replace("train: data/tiny-sft/train.jsonl", f"train: {REPO}/examples/data/tiny-sft/train.jsonl")
                   .replace("validation: data/tiny-sft/val.jsonl", f"validation: {REPO}/examples/data/tiny-sft/val.jsonl"))
    proc = server.cli("submit", str(bad), check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "team: 'nobody' is not a team" in proc.stderr and "model:" in proc.stderr
    assert json.loads(server.cli("queue", "--all", "-o", "json").stdout) == []


def test_training_error_fails_the_job_with_its_cause(server, tmp_path):
    """The dataset is overwritten with a bad record after submit (the launch preflight only checks
    that files exist; a removed file fails before launch, tests/reliability): the trainer raises
    on the worker, Ray Train reports it, the job ends FAILED (no retries left) with the cause,
    and the server keeps serving."""
    client = server.client()
    data = tmp_path / "train.jsonl"
    data.write_text((REPO / "examples/data/tiny-sft/train.jsonl").read_text())
    job = client.submit_file(write_spec(tmp_path / "j.yaml", name="doomed", max_retries=0,
                                        **{"dataset.train": str(data)}))
    data.write_text('{"prompt": "only a prompt"}\n')
    final = client.wait(job.id, timeout=180)
    assert final.state is JobState.FAILED, server.log()[-3000:]
    assert "train.jsonl" in final.failure_reason
    assert final.placement is None and final.attempt == 1
    assert "attempt 1 failed" in "".join(client.follow_logs(job.id))
    proc = server.cli("status", str(job.id))
    assert "FAILED" in proc.stdout and "cause:" in proc.stdout
    assert client.health()
