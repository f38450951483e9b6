"""The hand-off: adapter (PEFT format) or full model, optional merged model, and a model card.

Layout of the output directory:
  adapter_config.json, adapter_model.safetensors   (lora / dora / qlora)  or
  config.json, model.safetensors                    (full)
  tokenizer files
  merged/            base model with the adapter merged in, HF format (export merge)
  README.md          model card: base model, data, method, hyper-parameters, metrics, cost
  shoal_result.json  the final metrics as JSON
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from trainer.config import TrainConfig

MERGED_DIR = "merged"
HYPERPARAMETERS = ("learning_rate", "lr_scheduler", "warmup_steps", "epochs", "max_steps",
                   "batch_size", "grad_accum_steps", "max_length", "max_length_policy", "packing",
                   "weight_decay", "max_grad_norm", "gradient_checkpointing", "seed")


def check_output_dir(output_dir: str, storage_root: str | None) -> None:
    """ValueError naming both paths if output_dir does not resolve under storage_root (symlinks
    followed, so a link cannot lead out); nothing is checked without a root."""
    if storage_root is None:
        return
    root = Path(storage_root).expanduser().resolve()
    real = Path(output_dir).expanduser().resolve()
    if not real.is_relative_to(root):
        raise ValueError(f"output_dir: {output_dir} (resolves to {real}) is outside the storage root "
                         f"{root}; the job may only write under it")


def save_output(model, tokenizer, out_dir: str | Path, state_dict: dict | None = None) -> None:
    """PEFT adapter or full model (safetensors) + tokenizer into out_dir; `state_dict`: the
    full weights of a sharded (FSDP) model."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if state_dict is not None:
        model.save_pretrained(out, state_dict=state_dict)
    else:
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def save_merged(cfg: TrainConfig, out_dir: str | Path) -> Path:
    """Merge the adapter saved in out_dir into a fresh fp32 copy of the base model (on CPU,
    so a 4-bit QLoRA base is merged at full precision) and save it under out_dir/merged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.model import quiet_peft

    out = Path(out_dir)
    base = AutoModelForCausalLM.from_pretrained(cfg.model_path, local_files_only=True,
                                                dtype=torch.float32)
    with quiet_peft():
        merged = PeftModel.from_pretrained(base, str(out)).merge_and_unload()
    merged.save_pretrained(out / MERGED_DIR)
    AutoTokenizer.from_pretrained(str(out), local_files_only=True).save_pretrained(out / MERGED_DIR)
    return out / MERGED_DIR


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def model_card(cfg: TrainConfig, metrics: dict, data_summary: dict | None) -> str:
    """README.md text for the output directory."""
    base = Path(cfg.model_path).name
    lines = ["---", f"base_model: {base}", "library_name: " + ("peft" if cfg.adapter else "transformers"),
             "pipeline_tag: text-generation", "tags: [shoal, sft, " + cfg.method + "]", "---", "",
             f"# {cfg.job_name or 'job-' + str(cfg.job_id)}", "",
             f"Supervised fine-tuning of `{cfg.model_path}` with method **{cfg.method}**, "
             f"trained by Shoal (job {cfg.job_id}).", ""]
    lines += ["## Data", "", f"- train: `{cfg.train_path}`",
              f"- validation: `{cfg.val_path}`" if cfg.val_path
              else f"- validation: {cfg.val_fraction:.0%} of train (seed {cfg.seed})"]
    if data_summary:
        lines.append(f"- format: {data_summary.get('format')}, {data_summary.get('records')} records, "
                     f"{data_summary.get('tokens')} tokens, {data_summary.get('dropped', 0)} dropped, "
                     f"{data_summary.get('truncated', 0)} truncated")
    lines += ["", "## Method", ""]
    if cfg.adapter:
        targets = cfg.lora_target_modules if isinstance(cfg.lora_target_modules, str) \
            else ", ".join(cfg.lora_target_modules)
        lines.append(f"- {cfg.method}: r={cfg.lora_r}, alpha={cfg.lora_alpha}, "
                     f"dropout={cfg.lora_dropout}, target modules: {targets}")
        lines.append("- load: `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "
                     "this_dir)`" + ("; merged model in `merged/`" if cfg.merge else ""))
    else:
        lines.append("- full fine-tuning; load with `AutoModelForCausalLM.from_pretrained(this_dir)`")
    lines += ["", "## Hyper-parameters", "", "| name | value |", "| --- | --- |"]
    lines += [f"| {k} | {_fmt(getattr(cfg, k))} |" for k in HYPERPARAMETERS]
    lines += ["", "## Results", "", "| metric | value |", "| --- | --- |"]
    for key in ("steps", "train_loss", "eval_loss_initial", "eval_loss", "perplexity",
                "best_eval_loss", "best_eval_step", "restored_best_step", "eval_loss_last",
                "exact_match", "tokens_per_s", "padding_waste", "mfu", "early_stopped"):
        if key in metrics and metrics[key] is not None:
            lines.append(f"| {key} | {_fmt(metrics[key])} |")
    for key, value in (metrics.get("generation") or {}).items():
        if key != "exact_match":
            lines.append(f"| {key} | {_fmt(value)} |")
    target = metrics.get("target") or {}
    if target.get("met") is not None:
        lines += ["", "## Target", "", f"Target {'met' if target['met'] else 'NOT met'}:", ""]
        for name, d in target["detail"].items():
            lines.append(f"- {name}: {_fmt(d['value'])} ({d['goal']} {_fmt(d['target'])}): "
                         f"{'met' if d['met'] else 'not met'}")
    lines += ["", "## Compute", "", f"- GPU-hours: {_fmt(metrics.get('gpu_hours'))} "
              f"({metrics.get('world_size', 1)} worker(s), {_fmt(metrics.get('train_seconds'))} s)"]
    if metrics.get("cost_usd") is not None:
        lines.append(f"- cost: ${metrics['cost_usd']:.4f} at ${cfg.price_per_gpu_hour}/GPU-hour")
    return "\n".join(lines) + "\n"


def write_card(cfg: TrainConfig, metrics: dict, data_summary: dict | None, out_dir: str | Path) -> None:
    out = Path(out_dir)
    (out / "README.md").write_text(model_card(cfg, metrics, data_summary))
    (out / "shoal_result.json").write_text(json.dumps(metrics, indent=1, default=str))
