"""Loading the base model + tokenizer from a local directory, with optional LoRA."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.config import TrainConfig

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def check_model_dir(path: str | Path) -> Path:
    """Raise ValueError naming `path` if it is not a complete local HF model dir."""
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"model_path {p} is not a directory")
    missing = []
    if not (p / "config.json").is_file():
        missing.append("config.json")
    if not any((p / f).is_file() for f in WEIGHT_FILES):
        missing.append("weights (" + " / ".join(WEIGHT_FILES) + ")")
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        missing.append("tokenizer (" + " / ".join(TOKENIZER_FILES) + ")")
    if missing:
        raise ValueError(f"model_path {p} lacks: " + ", ".join(missing))
    return p


def load_tokenizer(path: str | Path):
    """AutoTokenizer from a local dir; pad token falls back to eos."""
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer in {path} has no eos token")
    return tokenizer


def load_model_and_tokenizer(cfg: TrainConfig, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for cfg.method: a PEFT LoRA model or the full model.

    Weights are loaded as `dtype` (float32 by default; mixed precision is done
    with autocast in the loop). Only the LoRA parameters are trainable for "lora".
    """
    path = check_model_dir(cfg.model_path)
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dtype)
    if cfg.method == "lora":
        lora = LoraConfig(task_type="CAUSAL_LM", r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                          lora_dropout=cfg.lora_dropout,
                          target_modules=cfg.lora_target_modules)
        with warnings.catch_warnings():  # peft 0.21 calls a deprecated transformers 5 API
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing",
                                    category=FutureWarning)
            model = get_peft_model(model, lora)
    else:
        model.requires_grad_(True)
    return model, tokenizer
