"""Packing isolation, formats end to end, DoRA / QLoRA / full, evaluation, early stopping,
targets, export (adapter, merged model, model card), telemetry, and a pinned loss."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import AutoModelForCausalLM

from trainer import data as D
from trainer import telemetry as T
from trainer.config import TrainConfig
from trainer.evaluation import EarlyStopping, check_target
from trainer.loop import Hooks, forward_logits, train
from trainer.model import load_tokenizer

from .conftest import DATA, REPO

CHAT = REPO / "examples" / "data" / "tiny-chat"
ALPACA = REPO / "examples" / "data" / "tiny-alpaca"


@pytest.fixture
def make_cfg(tiny_model_dir, tmp_path):
    def make(**overrides) -> TrainConfig:
        base = dict(job_id=3, model_path=str(tiny_model_dir), train_path=str(DATA / "train.jsonl"),
                    val_path=str(DATA / "val.jsonl"), output_dir=str(tmp_path / "out"),
                    learning_rate=1e-2, warmup_steps=2, batch_size=8, max_length=64, max_steps=6,
                    checkpoint_every_steps=100)
        return TrainConfig(**{**base, **overrides})
    return make


def run(cfg: TrainConfig) -> tuple[dict, list[dict]]:
    events = []
    return train(cfg, Hooks(progress=events.append)), events


def per_token_ce(logits, labels) -> torch.Tensor:
    """CE of each position's next-token prediction (0 where unlabelled), shape (batch, len-1)."""
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels[:, 1:],
                         ignore_index=D.IGNORE_INDEX, reduction="none")
    return ce


# ---- packing ------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt_dir", ["tiny-sft", "tiny-chat"])
def test_packed_batch_gives_the_same_per_example_loss_as_unpacked(tiny_model_dir, fmt_dir):
    tok = load_tokenizer(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), local_files_only=True).eval()
    path = REPO / "examples" / "data" / fmt_dir / "val.jsonl"
    _, enc, _ = D.prepare(path, tok, "auto", 64, "error")
    enc = enc[:24]
    alone = []
    with torch.no_grad():
        for ex in enc:  # each example on its own: no padding, no neighbour
            b = D.collate([ex], tok.pad_token_id)
            alone.append(per_token_ce(forward_logits(model, b, torch.device("cpu")), b["labels"])[0])
        rows = D.pack(enc, 128)
        assert len(rows) <= len(enc) / 3  # several examples per row
        batch = D.collate(rows, tok.pad_token_id)
        packed = per_token_ce(forward_logits(model, batch, torch.device("cpu")), batch["labels"])
        leaky = dict(batch, attention_mask=torch.ones_like(batch["input_ids"]))  # one causal mask per row
        leaked = per_token_ce(forward_logits(model, leaky, torch.device("cpu")), batch["labels"])
    by_ids = {tuple(ex["input_ids"]): ce for ex, ce in zip(enc, alone)}
    max_diff, max_leak = 0.0, 0.0
    for r, row in enumerate(rows):
        start = 0
        for n in row["lengths"]:
            mine = by_ids[tuple(row["input_ids"][start:start + n])]
            got = packed[r, start:start + n - 1]  # predictions made inside this example
            max_diff = max(max_diff, float((got - mine).abs().max()))
            max_leak = max(max_leak, float((leaked[r, start:start + n - 1] - mine).abs().max()))
            start += n
    assert max_diff < 1e-4
    assert max_leak > 1e-2  # without isolation the same check fails: attention crosses examples


def test_packing_cuts_padding_waste_and_trains(make_cfg):
    plain, plain_events = run(make_cfg(batch_size=16))
    packed, packed_events = run(make_cfg(batch_size=4, packing=True))
    assert packed["padding_waste"] < plain["padding_waste"]
    assert plain["padding_waste"] > 0.2 and packed["padding_waste"] < 0.15
    assert packed["eval_loss"] < packed["eval_loss_initial"]
    assert packed_events[-1]["type"] == "log"


# ---- formats end to end, DoRA, export ------------------------------------------------------
def test_chat_dora_packing_eval_export_merge_and_card(make_cfg, tmp_path):
    cfg = make_cfg(train_path=str(CHAT / "train.jsonl"), val_path=str(CHAT / "val.jsonl"), method="dora",
                   packing=True, batch_size=4, max_length=96, max_steps=20, learning_rate=3e-3,
                   eval_every_steps=10, eval_generate_examples=8, eval_max_new_tokens=6, merge=True,
                   target={"eval_loss": 50.0, "exact_match": 1.01}, price_per_gpu_hour=2.5,
                   job_name="chat-test", gradient_checkpointing=True)
    result, events = run(cfg)
    assert result["data"]["format"] == "chat" and result["eval_loss"] < result["eval_loss_initial"]
    assert [e["step"] for e in events if e["type"] == "eval"] == [0, 10, 20]
    assert result["generation"]["generated"] == 8 and 0.0 <= result["exact_match"] <= 1.0
    assert result["target"]["detail"]["eval_loss"]["met"] is True
    assert result["target"]["detail"]["exact_match"]["met"] is False  # above 1: unreachable
    assert result["target_met"] is False
    assert result["cost_usd"] == pytest.approx(result["gpu_hours"] * 2.5)

    out = cfg.output_dir
    assert json.loads(open(os.path.join(out, "adapter_config.json")).read())["use_dora"] is True
    card = open(os.path.join(out, "README.md")).read()
    for text in ("base_model: ", "method **dora**", "| learning_rate | 0.003 |", "eval_loss", "GPU-hours",
                 "cost: $", "Target NOT met", "format: chat"):
        assert text in card, text
    # reload the adapter the way a user would, generate, and compare with the merged model
    tok = load_tokenizer(out)
    base = AutoModelForCausalLM.from_pretrained(cfg.model_path, local_files_only=True)
    peft_model = PeftModel.from_pretrained(base, out).eval()
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(out, "merged"), local_files_only=True).eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 5 + 37?"}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(peft_model(ids).logits, merged(ids).logits, atol=1e-4)
        gen = peft_model.generate(input_ids=ids, max_new_tokens=4, do_sample=False,
                                  pad_token_id=tok.pad_token_id)
        assert gen.shape[1] > ids.shape[1]
        fresh = AutoModelForCausalLM.from_pretrained(cfg.model_path, local_files_only=True).eval()
        assert not torch.allclose(fresh(ids).logits, merged(ids).logits, atol=1e-3)  # it learned


def test_alpaca_json_trains_dropping_long_records(make_cfg):
    cfg = make_cfg(train_path=str(ALPACA / "train.json"), val_path=str(ALPACA / "val.json"),
                   max_length=150, max_length_policy="drop", max_steps=3, batch_size=4)
    result, _ = run(cfg)
    data = result["data"]
    assert data["format"] == "alpaca" and data["dropped"] > 0 and data["examples"] > 100
    assert data["records"] == data["examples"] + data["dropped"] == 400


def test_alpaca_over_max_length_is_refused_under_error_policy(make_cfg):
    with pytest.raises(D.DatasetError, match="longer than max_length=160"):
        run(make_cfg(train_path=str(ALPACA / "train.json"), val_path=None, max_length=160,
                     max_length_policy="error"))


def test_full_fine_tuning_writes_a_loadable_model(make_cfg):
    cfg = make_cfg(method="full", max_steps=4, learning_rate=1e-3)
    result, _ = run(cfg)
    model = AutoModelForCausalLM.from_pretrained(cfg.output_dir, local_files_only=True)
    assert sum(p.numel() for p in model.parameters()) > 100_000
    assert "library_name: transformers" in open(os.path.join(cfg.output_dir, "README.md")).read()
    assert result["status"] == "succeeded"


def test_qlora_on_cpu_is_a_clear_error(make_cfg):
    with pytest.raises(ValueError, match="qlora"):
        run(make_cfg(method="qlora"))


# ---- evaluation -------------------------------------------------------------------------------
def test_early_stopping_stops_when_val_loss_stops_improving(make_cfg):
    # an improvement must exceed 100 nats: never; patience 2 -> stop at the 2nd eval after step 0
    cfg = make_cfg(max_steps=30, eval_every_steps=3, early_stopping_patience=2,
                   early_stopping_min_delta=100.0, restore_best=False)
    result, events = run(cfg)
    assert result["early_stopped"] is True and result["steps"] == 6
    assert result["best_eval_step"] == 0 and result["restored_best_step"] is None
    assert result["eval_loss"] == result["eval_loss_last"] < result["eval_loss_initial"]
    assert any("early stopping at step 6" in e.get("line", "") for e in events)


def val_loss_of_export(cfg: TrainConfig) -> float:
    """Validation loss of the exported adapter, reloaded as a user would."""
    from trainer.loop import evaluate
    from trainer.model import quiet_peft
    tok = load_tokenizer(cfg.output_dir)
    base = AutoModelForCausalLM.from_pretrained(cfg.model_path, local_files_only=True)
    with quiet_peft():
        model = PeftModel.from_pretrained(base, cfg.output_dir)
    _, val, _ = D.prepare(cfg.val_path, tok, "auto", cfg.max_length, "error")
    return evaluate(model, [D.collate(val[i:i + 8], tok.pad_token_id) for i in range(0, len(val), 8)], "cpu")


def test_early_stopping_exports_the_best_weights_by_default(make_cfg):
    # the rule (improvement > 100 nats) makes step 0 the best; training did lower the loss, so
    # the last step's weights differ from the exported ones
    cfg = make_cfg(max_steps=30, eval_every_steps=3, early_stopping_patience=2, early_stopping_min_delta=100.0)
    assert cfg.restores_best  # default with early stopping
    result, events = run(cfg)
    assert result["early_stopped"] and result["restored_best_step"] == 0 and result["steps"] == 6
    assert result["eval_loss_last"] < result["eval_loss_initial"] - 0.5
    assert result["eval_loss"] == pytest.approx(result["eval_loss_initial"], abs=1e-5)
    assert val_loss_of_export(cfg) == pytest.approx(result["eval_loss"], abs=1e-5)
    assert any("exporting the weights of step 0" in e.get("line", "") for e in events)
    assert "| restored_best_step | 0 |" in open(os.path.join(cfg.output_dir, "README.md")).read()


def test_restore_best_keeps_the_last_weights_when_they_are_best(make_cfg):
    cfg = make_cfg(max_steps=6, eval_every_steps=3, restore_best=True)
    result, _ = run(cfg)
    assert result["best_eval_step"] == 6 and result["restored_best_step"] is None
    assert val_loss_of_export(cfg) == pytest.approx(result["eval_loss"], abs=1e-5)
    with pytest.raises(ValueError, match="restore_best needs eval_every_steps"):
        make_cfg(restore_best=True)


def test_output_outside_the_storage_root_is_refused_by_the_trainer(make_cfg, tmp_path):
    root = tmp_path / "root"
    (root / "link").parent.mkdir()
    (root / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    for out in (tmp_path / "elsewhere", root / "link" / "out", root / ".." / "x"):
        with pytest.raises(ValueError, match="outside the storage root"):
            run(make_cfg(output_dir=str(out), storage_root=str(root)))
    result, _ = run(make_cfg(output_dir=str(root / "job-3"), storage_root=str(root), max_steps=1))
    assert os.path.isfile(root / "job-3" / "adapter_model.safetensors")


def test_early_stopping_unit():
    es = EarlyStopping(patience=2, min_delta=0.1)
    assert [es.update(x, s) for s, x in enumerate([5.0, 4.0, 3.95, 3.99, 3.0])] == \
        [False, False, False, True, False]
    assert (es.best, es.best_step) == (3.0, 4)
    assert not EarlyStopping(None).update(1.0, 0)


def test_user_metric_hook_and_target(make_cfg, tmp_path):
    metric = tmp_path / "my_metric.py"
    metric.write_text("def digits(predictions, references):\n"
                      "    return {'answered': sum(bool(p.strip()) for p in predictions) / len(predictions),\n"
                      "            'n_refs': float(len(references))}\n")
    cfg = make_cfg(max_steps=4, eval_generate_examples=5, eval_max_new_tokens=3,
                   eval_metric=f"{metric}:digits", target={"n_refs": 5.0})
    result, _ = run(cfg)
    assert result["generation"]["n_refs"] == 5.0 and 0.0 <= result["generation"]["answered"] <= 1.0
    assert result["target_met"] is True
    with pytest.raises(ValueError, match="no function 'nope'"):
        run(make_cfg(eval_generate_examples=1, eval_metric=f"{metric}:nope"))


def test_check_target_directions():
    got = check_target({"eval_loss": 2.0, "exact_match": 0.5}, {"eval_loss": 1.5, "exact_match": 0.4})
    assert got["detail"]["eval_loss"]["met"] and not got["detail"]["exact_match"]["met"]
    assert got["met"] is False
    assert check_target({}, {})["met"] is None
    assert check_target({"perplexity": 3.0}, {})["met"] is False  # missing metric: not met


# ---- telemetry and a pinned run --------------------------------------------------------------
def test_step_events_carry_telemetry(make_cfg):
    _, events = run(make_cfg(max_steps=2))
    step = next(e for e in events if e["type"] == "step")
    assert {"loss", "lr", "tokens_per_s", "step_time_s", "padding_waste", "gpu_mem_peak_mib", "mfu"} <= set(step)
    assert step["step_time_s"] > 0 and step["tokens_per_s"] > 0
    assert step["gpu_mem_peak_mib"] is None and step["mfu"] is None  # CPU: no GPU figures


def test_mfu_formula():
    class Cfg:
        num_hidden_layers, hidden_size = 24, 1024
    f = T.flops_per_token(Cfg, 500_000_000, 1024, adapter=False)
    assert f == 6 * 500e6 + 12 * 24 * 1024 * 1024
    assert T.mfu(10_000, f, 989e12) == pytest.approx(10_000 * f / 989e12)
    assert T.mfu(10_000, f, None) is None
    assert T.flops_per_token(Cfg, 100, 0, adapter=True) == 400


# Pinned figures of a fixed tiny run (like torchtune's recipe tests): a change to data
# encoding, masking, loss, optimizer or schedule moves them. Re-pin deliberately.
# Pinned on torch 2.13.0 CPU / transformers 5.23 / peft 0.21.2 (2026-11-25).
PINNED_LOSSES = [6.5377, 6.4904, 5.8882, 5.4889, 5.0177, 4.7469, 4.8141, 4.6139]
PINNED_EVAL = 4.5723


def test_pinned_loss_of_a_fixed_tiny_run(make_cfg):
    result, events = run(make_cfg(max_steps=8, lora_dropout=0.0))
    losses = [round(e["loss"], 4) for e in events if e["type"] == "step"]
    assert losses == pytest.approx(PINNED_LOSSES, abs=2e-3)
    assert result["eval_loss"] == pytest.approx(PINNED_EVAL, abs=2e-3)
