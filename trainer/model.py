"""Loading the base model + tokenizer from a local directory, with a peft adapter or not."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
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


@contextlib.contextmanager
def quiet_peft():
    """peft 0.21 calls a transformers 5 API deprecated in favour of activation checkpointing."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(is|enable)_gradient_checkpointing",
                                category=FutureWarning)
        yield


def check_method_supported(method: str, device: torch.device | None = None) -> None:
    """ValueError if `method` cannot run here: QLoRA needs bitsandbytes and a CUDA GPU."""
    if method != "qlora":
        return
    import importlib.util
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("method: qlora needs the bitsandbytes package (pip install bitsandbytes) "
                         "and an NVIDIA GPU; use method: lora or dora without them")
    if device is not None and device.type != "cuda":
        raise ValueError(f"method: qlora quantizes the base model to 4 bits with bitsandbytes, "
                         f"which needs a CUDA GPU; this worker runs on {device}. Use method: lora "
                         f"or dora here")


def load_model_and_tokenizer(cfg: TrainConfig, dtype: torch.dtype = torch.float32,
                             device: torch.device | None = None):
    """(model, tokenizer) for cfg.method: a PEFT model (lora, dora, qlora) or the full model.

    Weights are loaded as `dtype` (float32 by default; mixed precision is done with
    autocast in the loop); qlora loads the base in 4-bit NF4 on `device` (CUDA only).
    Only the adapter parameters are trainable for the peft methods.
    """
    path = check_model_dir(cfg.model_path)
    check_method_supported(cfg.method, device)
    tokenizer = load_tokenizer(path)
    kwargs: dict = {"dtype": dtype}
    if cfg.method == "qlora":
        from transformers import BitsAndBytesConfig
        kwargs = {"dtype": torch.bfloat16, "device_map": {"": device.index or 0},
                  "quantization_config": BitsAndBytesConfig(
                      load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                      bnb_4bit_compute_dtype=torch.bfloat16)}
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, **kwargs)
    model.config.use_cache = False  # training: no KV cache (and packed masks need none)
    if cfg.gradient_checkpointing:
        # non-reentrant: works with frozen inputs (adapters) without enable_input_require_grads
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.method == "qlora":
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.adapter:
        from peft import LoraConfig, get_peft_model  # not needed to check data or tokenizers

        lora = LoraConfig(task_type="CAUSAL_LM", r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                          lora_dropout=cfg.lora_dropout, use_dora=cfg.method == "dora",
                          target_modules=cfg.lora_target_modules)
        with quiet_peft():
            model = get_peft_model(model, lora)
    else:
        model.requires_grad_(True)
    return model, tokenizer
