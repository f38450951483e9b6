"""The memory estimator (scheduler/estimate.py) against the memory training really takes on a GPU.

    python benchmarks/memory_estimate.py [--out FILE.json] [--quick]

For each case (model shape x method x batch x sequence length x gradient checkpointing) it builds
a Llama-shaped model from a config (random init, no download), trains 3 steps through Shoal's
own loop (trainer.loop.train) on records that fill max_length (short prompt, long completion: the
loss needs every position's logits, the estimator's worst case), and records torch's peak
allocated and reserved memory, the CUDA context (NVML's figure for this process minus torch's
reserved memory), and the estimate. The packer trusts the estimate to share GPUs, so it must
cover reserved + context; the ratio estimate / (reserved + context) is printed per case.

Needs an NVIDIA GPU (exits with an error without CUDA). Ends with
`RESULT memory_estimate_min_cover <min ratio>` and `RESULT memory_estimate_max_cover <max ratio>`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORDS = ("apple river stone cloud green table music light house water paper tiger bread chair "
         "smile ocean plant dream night happy storm quiet sugar horse lemon metal grape").split()
# (name, hidden, layers, heads, kv_heads, intermediate, vocab)
SHAPES = {
    "h1024-I4096": (1024, 8, 16, 16, 4096, 32000),
    "h1024-24L": (1024, 24, 16, 16, 4096, 32000),  # tests/gpu's ~0.47B model
    "h1024-I2048": (1024, 8, 16, 16, 2048, 32000),
    "h2048-gqa": (2048, 4, 16, 4, 5632, 32000),
}
CASES = [  # (shape, method, batch, max_length, gradient checkpointing)
    ("h1024-I4096", "full", 8, 512, False),
    ("h1024-I4096", "full", 4, 1024, False),
    ("h1024-I4096", "lora", 8, 512, False),
    ("h1024-I4096", "lora", 4, 1024, False),
    ("h1024-I4096", "lora", 8, 512, True),
    ("h1024-I4096", "full", 8, 512, True),
    ("h1024-I4096", "dora", 8, 512, False),
    ("h1024-I4096", "qlora", 8, 512, False),
    ("h1024-I2048", "full", 8, 512, False),
    ("h1024-I2048", "lora", 8, 512, False),
    ("h2048-gqa", "full", 8, 512, False),
    ("h2048-gqa", "lora", 8, 512, False),
    ("h2048-gqa", "lora", 2, 2048, False),
    ("h1024-24L", "lora", 8, 512, False),
    ("h1024-24L", "full", 8, 512, False),
]


def build(work: Path, shape: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.model import load_tokenizer
    from trainer.tiny import build_tokenizer

    d = work / shape
    if (d / "config.json").exists():
        return d, load_tokenizer(d)
    texts = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(40)) for i in range(200)]
    tok = build_tokenizer(texts)
    h, layers, heads, kv, inter, vocab = SHAPES[shape]
    config = LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                         tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(d)
    tok.save_pretrained(d)
    return d, tok


def records(path: Path, tok, max_length: int, n: int = 64) -> Path:
    rows = []
    for i in range(n):  # long completions: truncated to max_length, every row full
        body = " ".join(WORDS[(i * 11 + j * 3) % len(WORDS)] for j in range(max_length + 64))
        rows.append({"prompt": "Say:", "completion": " " + body})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def context_mib() -> float:
    """NVML's memory for this process minus torch's reserved memory: the CUDA context and
    libraries (cuBLAS workspaces, kernels) that torch does not count."""
    import pynvml
    import torch

    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    mine = next((p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h)
                 if p.pid == os.getpid()), None)
    return (mine - torch.cuda.memory_reserved()) / 2**20 if mine is not None else float("nan")


def run_case(work: Path, case) -> dict:
    import torch

    from scheduler.estimate import estimate
    from trainer.config import TrainConfig
    from trainer.loop import Hooks, train

    shape, method, batch, length, ckpt = case
    model, tok = build(work, shape)
    data = records(work / f"data-{length}.jsonl", tok, length)
    cfg = TrainConfig(job_id=1, model_path=str(model), train_path=str(data), val_path=str(data),
                      output_dir=str(work / "out"), method=method, lora_r=16, lora_alpha=32,
                      lora_target_modules="all-linear", learning_rate=1e-4, batch_size=batch,
                      max_length=length, max_length_policy="truncate", max_steps=3,
                      gradient_checkpointing=ckpt, checkpoint_every_steps=10**9, eval_every_steps=10**9,
                      gpu_indices=[0])
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    events = []
    train(cfg, Hooks(progress=events.append))
    allocated = torch.cuda.max_memory_allocated() / 2**20
    reserved = torch.cuda.max_memory_reserved() / 2**20
    context = context_mib()
    est = estimate(model, method, batch, length, 1, 140_000, lora_r=16, lora_targets="all-linear",
                   gradient_checkpointing=ckpt)
    need = reserved + context
    return {"shape": shape, "method": method, "batch": batch, "max_length": length, "checkpointing": ckpt,
            "params": est.params, "estimate_mib": est.memory_per_gpu_mib,
            "breakdown_mib": {k: round(v) for k, v in est.breakdown_mib.items()},
            "allocated_mib": round(allocated), "reserved_mib": round(reserved), "context_mib": round(context),
            "cover": est.memory_per_gpu_mib / need}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="write the cases as JSON here")
    ap.add_argument("--quick", action="store_true", help="the first three cases only")
    args = ap.parse_args()
    import torch
    if not torch.cuda.is_available():
        sys.exit("error: needs an NVIDIA GPU with CUDA (torch.cuda.is_available() is False here)")
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}")
    results = []
    with tempfile.TemporaryDirectory() as work:
        for case in CASES[:3] if args.quick else CASES:
            try:
                r = run_case(Path(work), case)
            except Exception as e:  # noqa: BLE001 - a case that cannot run (e.g. no bitsandbytes)
                print(f"{case}: skipped ({type(e).__name__}: {e})")
                continue
            results.append(r)
            print(f"{r['shape']:<12} {r['method']:<6} b{r['batch']:<2} s{r['max_length']:<5} "
                  f"ckpt={int(r['checkpointing'])} est {r['estimate_mib']:>6} MiB {r['breakdown_mib']}  "
                  f"alloc {r['allocated_mib']:>6} reserved {r['reserved_mib']:>6} ctx {r['context_mib']:>4}  "
                  f"cover {r['cover']:.3f}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"RESULT memory_estimate_min_cover {min(r['cover'] for r in results):.3f}")
    print(f"RESULT memory_estimate_max_cover {max(r['cover'] for r in results):.3f}")


if __name__ == "__main__":
    main()
