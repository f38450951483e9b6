"""A tiny Llama-style model + byte-level BPE tokenizer, built offline for tests/demos.

    python -m trainer.tiny OUT_DIR --data FILE [FILE...]

The result is an ordinary Hugging Face directory (config.json, model.safetensors,
tokenizer files) loadable with AutoModelForCausalLM / AutoTokenizer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]  # bos, eos, pad
VOCAB_SIZE = 512
CHAT_TEMPLATE = (  # "role: content" lines; an assistant turn ends with eos (stops generation)
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def build_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (~VOCAB_SIZE tokens) on `texts`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(out_dir: str | Path, texts: list[str], seed: int = 0) -> Path:
    """Write a seeded random-init 2-layer Llama (hidden 64) + tokenizer to out_dir."""
    out = Path(out_dir)
    tokenizer = build_tokenizer(texts)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=512, tie_word_embeddings=False,
        # std of the random init; wider than Llama's 0.02 so that a frozen random
        # lm_head still lets LoRA reach sharp output distributions
        initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def is_valid_model_dir(path: str | Path) -> bool:
    """True if path holds a loadable config, safetensors weights and a tokenizer."""
    p = Path(path)
    if not all((p / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json")):
        return False
    try:
        return "vocab_size" in json.loads((p / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False


def read_texts(files: list[str]) -> list[str]:
    """prompt + completion of every JSONL record in files (bad lines skipped)."""
    texts = []
    for f in files:
        for line in Path(f).read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
                texts.append(str(rec["prompt"]) + str(rec["completion"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return texts


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    ap = argparse.ArgumentParser(prog="python -m trainer.tiny", description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--data", nargs="+", required=True, help="JSONL files of prompt/completion")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if is_valid_model_dir(args.out_dir):
        print(f"tiny model already present in {args.out_dir}; nothing to do")
        return 0
    texts = read_texts(args.data)
    if not texts:
        print(f"no prompt/completion records in {args.data}", file=sys.stderr)
        return 2
    build_tiny_model(args.out_dir, texts, seed=args.seed)
    print(f"built tiny model in {args.out_dir} from {len(texts)} texts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
