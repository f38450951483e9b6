"""Shoal's SFT loop against TRL's SFTTrainer: same model, data, seed and hyper-parameters.

    python benchmarks/trainer_vs_trl.py [--records N] [--epochs E] [--threads T] [--gpu]

Model: a Llama with hidden 256, 4 layers, 4 heads, built from a config (random init, seeded)
with a byte-level BPE trained on the data, as trainer/tiny.py does. Data: a deterministic
mixed-length copy task ("Repeat: w1 .. wk" -> " w1 .. wk", k from a long-tailed mix), so
plain padding wastes many positions. Method: LoRA r=16 on all linear layers, fp32 on CPU.

Both trainers get the SAME token ids and loss masks (TRL receives Shoal's encoding
pre-tokenized: input_ids + completion_mask) and the SAME initial LoRA weights (one seeded
PEFT model, built by Shoal's loader, is handed to TRL). TRL's differing SFTConfig defaults
(bf16, gradient checkpointing, learning rate, packing, ...) are set explicitly. Each run is a
separate process (clean peak memory) and covers whole epochs, so both see every example.

TRL SFTConfig defaults that differ from Shoal's or could skew the comparison, all set
explicitly: bf16 (True in SFTConfig; off on CPU), gradient_checkpointing (True; off), learning
rate (2e-5), lr_scheduler_type (linear; cosine), warmup, optim (adamw_torch_fused; adamw_torch =
Shoal's torch.optim.AdamW), pad_to_multiple_of ("auto"; None), packing / padding_free (off),
max_length (1024), completion_only_loss, loss_type "nll", liger off, activation offloading and
torch.compile off, logging every step (Shoal reports every step too). What stays TRL's own: its
per-step extras (entropy / token accuracy from its chunked LM head). Data order: TRL gets the
rows in Shoal's seeded order with a SequentialSampler, so both trainers see the same batches
(same padding, same work per step; exact for epochs whose size is a multiple of the batch, as
the default 160 / 8).

Figures: tokens/s (non-padding tokens / time of the training loop, both the process's CPU
time and the wall time are printed; RESULT lines use --clock: CPU time by default on CPU,
wall on a GPU), final validation loss on a held-out set (computed by the same function for
both models), padding waste, peak resident memory (CPU) or peak CUDA memory, MFU (GPU). Runs:
TRL (padding), Shoal (padding), Shoal (packing).

--gpu (NVIDIA GPU; exits with an error without CUDA): a ~0.47B Llama (hidden 1024, 24 layers,
MLP 4096, 32k vocabulary) built from a config, full fine-tuning, bf16 autocast for both, 32768
records, padded batch 64, packed 8 rows of 2048, lr 2e-5, wall clock; extra RESULT lines
trainer_gpu_tok_s, trainer_gpu_mfu_pct, trainer_gpu_packed_mfu_pct. Run on an H200 (session 7;
figures and a profile in docs/trainer.md): MFU 5.0 % padded, 18.0 % packed.

Ends with RESULT lines: trainer_tok_s_vs_trl, trainer_loss_diff_pct, trainer_packed_tok_s_vs_trl.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORDS = ("apple river stone cloud green table music light house water paper tiger bread chair "
         "smile ocean plant dream night happy storm quiet sugar horse lemon metal grape train "
         "honey piano robot money field candy eagle juice lunch magic north olive pilot queen").split()


def make_records(n: int, seed: int) -> list[dict]:
    """Mixed lengths: 60 % short (2-8 words), 30 % medium (10-30), 10 % long (40-70)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        r = rng.random()
        k = rng.randint(2, 8) if r < 0.6 else rng.randint(10, 30) if r < 0.9 else rng.randint(40, 70)
        words = " ".join(rng.choice(WORDS) for _ in range(k))
        out.append({"prompt": f"Repeat: {words}\n", "completion": f" {words}"})
    return out


def build_assets(work: Path, args) -> dict:
    """Data files and the model directory, written once and shared by all runs."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.tiny import build_tokenizer

    records = make_records(args.records + args.val_records, args.seed)
    train, val = records[:args.records], records[args.records:]
    for name, recs in (("train.jsonl", train), ("val.jsonl", val)):
        (work / name).write_text("".join(json.dumps(r) + "\n" for r in recs))
    tok = build_tokenizer([r["prompt"] + r["completion"] for r in records])
    # --gpu: ~0.47B parameters (hidden 1024, 24 layers, MLP 4096, a 32k vocabulary as real
    # models have: the tokenizer uses the first len(tok) rows)
    hidden, layers, heads, mlp, vocab = (1024, 24, 16, 4096, 32000) if args.gpu else \
        (256, 4, 4, 256 * 8 // 3, len(tok))
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=args.max_length, tie_word_embeddings=False,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(args.seed)
    model_dir = work / "model"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    n_params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    lengths = [len(tok(r["prompt"] + r["completion"])["input_ids"]) + 2 for r in train]  # + bos, eos
    return {"train": str(work / "train.jsonl"), "val": str(work / "val.jsonl"), "model": str(model_dir),
            "params": n_params, "mean_tokens": sum(lengths) / len(lengths)}


def clocks() -> tuple[float, float]:
    """(process CPU time, wall time) in seconds. Both are recorded; tokens/s uses --clock: CPU
    time by default on CPU (on a shared, oversubscribed machine the wall clock mostly measures
    the neighbours), wall time on a GPU (where the CPU waits for the device)."""
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.process_time(), time.perf_counter()


def timed(run: dict, start: tuple[float, float], end: tuple[float, float], args) -> dict:
    """Adds seconds (the chosen clock), cpu_s, wall_s and tokens/s to a run's figures."""
    cpu, wall = end[0] - start[0], end[1] - start[1]
    seconds = cpu if args.clock == "cpu" else wall
    return {**run, "seconds": seconds, "cpu_s": cpu, "wall_s": wall,
            "tokens_per_s": run["tokens"] / seconds, "tokens_per_wall_s": run["tokens"] / wall}


def train_config(assets: dict, args, out: str, packing: bool):
    from trainer.config import TrainConfig

    return TrainConfig(
        job_id=1, model_path=assets["model"], train_path=assets["train"], val_path=assets["val"],
        output_dir=out, method="full" if args.gpu else "lora", lora_r=16, lora_alpha=32,
        lora_dropout=0.0, lora_target_modules="all-linear", learning_rate=args.lr, warmup_steps=5,
        lr_scheduler="cosine", epochs=args.epochs,
        batch_size=args.packed_batch_size if packing else args.batch_size, grad_accum_steps=1,
        max_length=args.max_length, max_length_policy="error", max_grad_norm=1.0, weight_decay=0.0,
        seed=args.seed, checkpoint_every_steps=10**9, packing=packing, torch_threads=args.threads)


def with_mfu(run: dict, assets: dict, args) -> dict:
    """Model FLOPs utilization of a run on a GPU (trainer.telemetry's formula, wall clock, the
    mean example length of the data for the attention term); None on CPU (no known peak)."""
    import torch
    from transformers import AutoConfig

    from trainer import telemetry as T

    peak = T.peak_flops(torch.device("cuda")) if torch.cuda.is_available() else None
    config = AutoConfig.from_pretrained(assets["model"], local_files_only=True)
    per_token = T.flops_per_token(config, assets["params"], assets["mean_tokens"], adapter=not args.gpu)
    return {**run, "mfu": T.mfu(run["tokens_per_wall_s"], per_token, peak)}


def peak_memory_mib(device_type: str) -> float:
    import torch
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_shoal(assets: dict, args, packing: bool, out: str) -> dict:
    import torch

    from trainer.loop import Hooks, train

    torch.set_num_threads(args.threads)
    cfg = train_config(assets, args, out, packing)
    steps, start = [], []

    def progress(event):
        if event["type"] == "eval" and event["step"] == 0:
            start.append(clocks())  # the initial evaluation is done; the loop starts
        if event["type"] == "step":
            steps.append((clocks(), event))

    result = train(cfg, Hooks(progress=progress))
    tokens = sum(e["tokens_per_s"] * e["step_time_s"] for _, e in steps)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    run = {"name": "shoal-packed" if packing else "shoal", "steps": len(steps), "tokens": round(tokens),
           "eval_loss": result["eval_loss"], "train_loss": result["train_loss"],
           "padding_waste": result["padding_waste"], "peak_mib": peak_memory_mib(device)}
    # the training loop, as for TRL (its train() call): from the end of the initial evaluation
    # to the last step's event
    return with_mfu(timed(run, start[0], steps[-1][0], args), assets, args)


def run_trl(assets: dict, args, out: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from trainer import data as D
    from trainer.loop import evaluate, seed_everything
    from trainer.model import load_model_and_tokenizer

    torch.set_num_threads(args.threads)
    cfg = train_config(assets, args, out, packing=False)
    seed_everything(cfg.seed)  # what Shoal's loop does before building the model
    model, tok = load_model_and_tokenizer(cfg)  # identical initial (LoRA) weights
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _, train_enc, _ = D.prepare(cfg.train_path, tok, "auto", cfg.max_length, "error")
    _, val_enc, _ = D.prepare(cfg.val_path, tok, "auto", cfg.max_length, "error")
    # Shoal's batch order (seeded permutation per epoch), fed to TRL in sequence: both runs see
    # the same batches, so padding, work per step and the loss curve are comparable one to one
    order = [i for epoch in range(args.epochs)
             for batch in D.epoch_batches(len(train_enc), cfg.batch_size, epoch, cfg.seed) for i in batch]
    rows = [{"input_ids": train_enc[i]["input_ids"],
             "completion_mask": [int(x != D.IGNORE_INDEX) for x in train_enc[i]["labels"]]} for i in order]
    tokens = sum(len(r["input_ids"]) for r in rows)
    padded = {"positions": 0}

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.start = clocks()

        def on_train_end(self, *a, **k):
            self.end = clocks()

    timer = Timer()
    sft = SFTConfig(
        output_dir=out, num_train_epochs=1, per_device_train_batch_size=args.batch_size,  # epochs in `rows`
        gradient_accumulation_steps=1, learning_rate=cfg.learning_rate, lr_scheduler_type="cosine",
        warmup_steps=5, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        bf16=args.gpu, fp16=False, gradient_checkpointing=False,  # SFTConfig defaults: True, True
        packing=False, padding_free=False, pad_to_multiple_of=None, max_length=cfg.max_length,
        completion_only_loss=True, activation_offloading=False, torch_compile=False, shuffle_dataset=False,
        assistant_only_loss=False, loss_type="nll", use_liger_kernel=False,
        logging_steps=1, report_to="none", save_strategy="no", eval_strategy="no",
        seed=cfg.seed, data_seed=cfg.seed, dataloader_num_workers=0, dataloader_drop_last=False,
        use_cpu=device == "cpu", disable_tqdm=True)
    class InOrder(SFTTrainer):
        def _get_train_sampler(self, *a, **k):  # rows are already in Shoal's seeded order
            return torch.utils.data.SequentialSampler(self.train_dataset)

    trainer = InOrder(model=model, args=sft, train_dataset=Dataset.from_list(rows),
                      processing_class=tok, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # no per-step dict on stdout (log_history keeps it)
    collator = trainer.data_collator

    def counting(examples):  # padding waste of TRL's batches, measured on what it builds
        batch = collator(examples)
        padded["positions"] += batch["input_ids"].numel()
        return batch

    trainer.data_collator = counting
    out_metrics = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    val_batches = [D.collate(val_enc[i:i + cfg.batch_size], tok.pad_token_id)
                   for i in range(0, len(val_enc), cfg.batch_size)]
    eval_loss = evaluate(trainer.model, val_batches, device)
    run = {"name": "trl", "steps": out_metrics.global_step, "tokens": tokens, "eval_loss": eval_loss,
           "train_loss": sum(losses[-10:]) / len(losses[-10:]),
           "padding_waste": 1 - tokens / padded["positions"] if padded["positions"] else None,
           "peak_mib": peak_memory_mib(device)}
    return with_mfu(timed(run, timer.start, timer.end, args), assets, args)


def _child(kind: str, assets: dict, args, queue) -> None:
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)  # TRL's own deprecated-argument notes
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import datasets
    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as out:
        if kind == "trl":
            queue.put(run_trl(assets, args, out))
        else:
            queue.put(run_shoal(assets, args, kind == "shoal-packed", out))


def in_process(kind: str, assets: dict, args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(kind, assets, args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", action="store_true",
                    help="NVIDIA GPU: ~0.47B model, bf16 autocast, full fine-tuning, wall clock, MFU; "
                         "defaults below in [brackets]")
    ap.add_argument("--records", type=int, help="training records (160) [32768]")
    ap.add_argument("--val-records", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, help="examples per padded batch (8) [64]")
    ap.add_argument("--packed-batch-size", type=int,
                    help="rows of max-length tokens per step with packing (1) [8]: 1 row of 256 ~ the "
                         "real tokens of a padded batch of 8 here")
    ap.add_argument("--max-length", type=int, help="tokens per example / packed row (256) [2048]")
    ap.add_argument("--lr", type=float, help="(1e-3) [2e-5]")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("cpu", "wall"), help="for tokens/s (cpu) [wall]")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    # GPU: ~16k tokens per packed step, enough work per step to keep an H100 busy
    preset = dict(records=32768, batch_size=64, packed_batch_size=8, max_length=2048, lr=2e-5,
                  clock="wall") if args.gpu else \
        dict(records=160, batch_size=8, packed_batch_size=1, max_length=256, lr=1e-3, clock="cpu")
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.gpu:
        import torch
        if not torch.cuda.is_available():
            sys.exit("error: --gpu needs an NVIDIA GPU with CUDA, and torch.cuda.is_available() is False "
                     f"here (torch {torch.__version__}, CUDA build {torch.version.cuda}); run without --gpu "
                     "for the CPU comparison")
    with tempfile.TemporaryDirectory() as work:
        assets = build_assets(Path(work), args)
        device = "cuda" if args.gpu else "cpu"
        print(f"model: {assets['params'] / 1e6:.1f}M params, {'full bf16' if args.gpu else 'LoRA r=16 fp32'} "
              f"on {device}; {args.records} train / {args.val_records} val records, mixed lengths (mean "
              f"{assets['mean_tokens']:.1f} tokens); batch {args.batch_size} (packed: {args.packed_batch_size} "
              f"row(s) of {args.max_length}), {args.epochs} epoch(s), {args.threads} thread(s), "
              f"tokens/s on the {args.clock} clock; load average {os.getloadavg()[0]:.2f}")
        runs = {k: in_process(k, assets, args) for k in ("trl", "shoal", "shoal-packed")}
    print(f"{'run':<13}{'steps':>6}{'cpu s':>8}{'wall s':>8}{'tokens':>8}{'tok/s':>9}{'tok/wall s':>11}"
          f"{'eval loss':>11}{'train loss':>11}{'pad waste':>10}{'peak MiB':>10}{'MFU':>7}")
    for r in runs.values():
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        print(f"{r['name']:<13}{r['steps']:>6}{r['cpu_s']:>8.1f}{r['wall_s']:>8.1f}{r['tokens']:>8}"
              f"{r['tokens_per_s']:>9.0f}{r['tokens_per_wall_s']:>11.0f}{r['eval_loss']:>11.4f}"
              f"{r['train_loss']:>11.4f}{r['padding_waste']:>10.1%}{r['peak_mib']:>10.0f}{mfu:>7}")
    trl, shoal, packed = runs["trl"], runs["shoal"], runs["shoal-packed"]
    print(f"wall clock: shoal / trl {shoal['tokens_per_wall_s'] / trl['tokens_per_wall_s']:.3f}, "
          f"packed / trl {packed['tokens_per_wall_s'] / trl['tokens_per_wall_s']:.3f}; "
          f"load average now {os.getloadavg()[0]:.2f}")
    if args.gpu:
        print(f"RESULT trainer_gpu_tok_s {shoal['tokens_per_s']:.0f}")
        print(f"RESULT trainer_gpu_mfu_pct {100 * (shoal['mfu'] or 0):.1f}")
        print(f"RESULT trainer_gpu_packed_mfu_pct {100 * (packed['mfu'] or 0):.1f}")
    print(f"RESULT trainer_tok_s_vs_trl {shoal['tokens_per_s'] / trl['tokens_per_s']:.3f}")
    print(f"RESULT trainer_loss_diff_pct {abs(shoal['eval_loss'] - trl['eval_loss']) / trl['eval_loss'] * 100:.3f}")
    print(f"RESULT trainer_packed_tok_s_vs_trl {packed['tokens_per_s'] / trl['tokens_per_s']:.3f}")


if __name__ == "__main__":
    main()
