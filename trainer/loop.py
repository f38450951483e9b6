"""The SFT training loop, independent of Ray (Ray plugs in through `Hooks`).

Step accounting: a "step" is one optimizer step = grad_accum_steps micro-batches
(fewer at the end of an epoch). Step s (0-based) covers epoch s // steps_per_epoch
and, inside it, micro-batches [pos * grad_accum, (pos + 1) * grad_accum) with
pos = s % steps_per_epoch. That, the seeded batch order and the restored
optimizer / scheduler / RNG state make a resumed run repeat an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from transformers import get_scheduler

from trainer import data as D
from trainer import evaluation as E
from trainer import export as X
from trainer import telemetry as T
from trainer.checkpoint import read_checkpoint, rng_state, write_checkpoint
from trainer.config import TrainConfig
from trainer.model import check_method_supported, load_model_and_tokenizer

LOSS_WINDOW = 10  # final train_loss = mean loss of the last LOSS_WINDOW steps
SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


@dataclass
class Hooks:
    """How the loop talks to its host (Ray worker, test, CLI)."""

    progress: Callable[[dict], None] = lambda event: None  # rank 0 only
    should_stop: Callable[[], bool] = lambda: False  # asked on rank 0 after each step
    # (dir with the state, or None on ranks != 0; metrics) -> persist; the dir
    # is deleted when the call returns.
    save_checkpoint: Callable[[str | None, dict], None] = lambda path, metrics: None
    resume_dir: str | None = None
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # index into cfg.gpu_indices


def pick_device(gpu_indices: list[int], local_rank: int = 0) -> torch.device:
    """cuda device for this worker's GPU, or cpu without CUDA.

    gpu_indices are physical indices; if CUDA_VISIBLE_DEVICES (set by Ray) lists
    them, the position in that list is the torch index.
    """
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if not gpu_indices:
        return torch.device(f"cuda:{local_rank % count}")
    physical = gpu_indices[local_rank % len(gpu_indices)]
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
    if str(physical) in visible:
        return torch.device(f"cuda:{visible.index(str(physical))}")
    return torch.device(f"cuda:{physical if physical < count else local_rank % count}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _autocast(device: torch.device):
    """bf16 autocast on CUDA, nothing elsewhere."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def forward_logits(model, batch: dict, device: torch.device) -> torch.Tensor:
    """Logits of a collated batch: padded (attention_mask) or packed (position_ids, no mask:
    transformers then keeps attention inside each packed example)."""
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids")
              if k in batch}
    with _autocast(device):
        return model(**inputs, use_cache=False).logits


def _selective_head(model) -> torch.nn.Module:
    """The model's LM head, patched once so that, while `head.shoal_keep` holds a (batch, seq) bool
    mask, it projects only the hidden states of those positions (logits of shape (n, vocab)).

    Only the positions that predict a labelled token need logits: prompt and padding positions
    skip the head's matmul (vocab x hidden per token, a large share on real vocabularies) and the
    (batch, seq, vocab) logits tensor is never materialized. The head is patched in place (its
    forward, not its module path), so state dicts, DDP/FSDP wrapping and generation are unchanged;
    TRL's SFTTrainer patches its model's head for the same reason."""
    head = model.get_output_embeddings()
    if not getattr(head, "shoal_patched", False):
        plain = head.forward

        def forward(hidden: torch.Tensor) -> torch.Tensor:
            keep = head.shoal_keep
            if keep is not None and hidden.shape[:2] == keep.shape:
                hidden = hidden[keep]
            return plain(hidden)

        head.forward, head.shoal_keep, head.shoal_patched = forward, None, True
    return head


def completion_ce(model, batch: dict, device: torch.device) -> tuple[torch.Tensor, int]:
    """(summed next-token CE over labelled tokens, number of labelled tokens). Logits are computed
    only at the positions that predict a labelled token (see _selective_head)."""
    target = batch["labels"].to(device)[:, 1:]
    keep = target != D.IGNORE_INDEX  # position t predicts token t + 1
    head = _selective_head(getattr(model, "module", model))  # DDP wraps the model
    head.shoal_keep = F.pad(keep, (0, 1), value=False)  # the last position predicts nothing
    try:
        logits = forward_logits(model, batch, device)
    finally:
        head.shoal_keep = None
    total = F.cross_entropy(logits.float(), target[keep], reduction="sum")
    return total, int(keep.sum())


@torch.no_grad()
def evaluate(model, batches, device) -> float:
    """Mean token-level cross-entropy (nats) over completion tokens; nan if none."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        s, n = completion_ce(model, batch, torch.device(device))
        total, count = total + float(s), count + n
    model.train(was_training)
    return total / count if count else math.nan


def train(cfg: TrainConfig, hooks: Hooks) -> dict:
    """Train per cfg; returns final metrics (or {"status": "preempted", "step"})."""
    return _Trainer(cfg, hooks).run()


class _Trainer:
    """State of one training attempt on one rank."""

    def __init__(self, cfg: TrainConfig, hooks: Hooks):
        self.cfg, self.hooks = cfg, hooks
        self.rank, self.world = hooks.rank, hooks.world_size
        self.device = pick_device(cfg.gpu_indices, hooks.local_rank)
        check_method_supported(cfg.method, self.device)  # before any weight is loaded
        X.check_output_dir(cfg.output_dir, cfg.storage_root)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # NCCL collectives use the current device
            # the reported peak is this run's, not what the process held before it (a host that
            # trains twice, or a test that allocated first: seen on an H200 as 113 GiB)
            torch.cuda.reset_peak_memory_stats(self.device)
        # the user's metric is imported first, so a typo fails before training, not after
        self.user_metric = E.load_metric(cfg.eval_metric) if cfg.eval_metric else None
        seed_everything(cfg.seed)  # same on all ranks: identical LoRA init
        # frozen adapter base in bf16 on GPU; trained weights always fp32
        base_dtype = torch.bfloat16 if self.device.type == "cuda" and cfg.adapter \
            else torch.float32
        self.model, self.tokenizer = load_model_and_tokenizer(cfg, dtype=base_dtype,
                                                              device=self.device)
        if cfg.method != "qlora":  # bitsandbytes placed it already
            self.model.to(self.device)
        self.train_set, self.val_set = self._load_data()
        self.val_batches = E.eval_batches(self.val_set, cfg.batch_size, self.tokenizer.pad_token_id)
        self.last_eval: tuple[int, float] | None = None  # (step, eval loss)
        self.early = E.EarlyStopping(cfg.early_stopping_patience, cfg.early_stopping_min_delta)
        # restore_best: CPU copy of the weights of the best evaluation so far (the adapter's,
        # or the full model's; with FSDP complete on rank 0 and {} elsewhere)
        self.best_state: dict[str, torch.Tensor] | None = None
        self.train_seconds = 0.0  # wall time of training in earlier attempts (from checkpoints)
        self.padded_positions, self.real_tokens = 0, 0  # this rank, this attempt
        n_params = sum(p.numel() for p in self.model.parameters())
        mean_len = self.data_summary["tokens"] / max(self.data_summary["examples"], 1)
        self.flops_token = T.flops_per_token(self.model.config, n_params, mean_len, cfg.adapter)
        self.peak_flops = T.peak_flops(self.device)
        self._orders: dict[int, list[list[int]]] = {}  # epoch -> this rank's micro-batches
        # full fine-tuning on several workers: FSDP (sharded weights, grads, optimizer states);
        # adapters: DDP (replicated base, tiny gradients)
        self.fsdp = self.world > 1 and cfg.method == "full"
        if self.fsdp:
            from trainer.fsdp import shard
            shard(self.model, self.device)  # before the optimizer sees the parameters
        self._setup_optimization()
        self.step, self.train_tokens = 0, 0  # optimizer steps done; tokens seen (all ranks)
        self.recent_losses: deque[float] = deque(maxlen=LOSS_WINDOW)
        self.eval_loss_initial: float | None = None
        self.resumed_from: int | None = None
        if hooks.resume_dir:
            self._restore(hooks.resume_dir)  # last: it also restores the RNG states
        self.train_model = self.model  # what the forward pass of training goes through
        if self.world > 1 and not self.fsdp:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=ids)

    def _setup_optimization(self) -> None:
        """AdamW over trainable params, step counts, warmup + decay schedule."""
        cfg = self.cfg
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.learning_rate,
                                           weight_decay=cfg.weight_decay)
        per_epoch = D.batches_per_epoch(len(self.train_set), cfg.batch_size, self.world)
        self.steps_per_epoch = math.ceil(per_epoch / cfg.grad_accum_steps)
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.scheduler = get_scheduler(SCHEDULERS[cfg.lr_scheduler], self.optimizer,
                                       num_warmup_steps=cfg.warmup_steps,
                                       num_training_steps=self.total_steps)

    # ---- data -----------------------------------------------------------------
    def _load_data(self) -> tuple[list[dict], list[dict]]:
        """(train rows, val rows): encoded examples, packed when cfg.packing. Also sets
        data_summary, val_records (for generation) and the padding waste of the train set."""
        cfg = self.cfg
        prep = lambda path: D.prepare(path, self.tokenizer, cfg.data_format, cfg.max_length,
                                      cfg.max_length_policy)
        train_records, train_enc, self.data_summary = prep(cfg.train_path)
        if cfg.val_path:
            val_records, val_enc, _ = prep(cfg.val_path)
        else:
            val_records = train_records
            train_enc, val_enc = D.split_pairs(train_enc, cfg.val_fraction, cfg.seed)
        self.val_records = [val_records[e["index"]] for e in val_enc]
        if cfg.packing:
            return D.pack(train_enc, cfg.max_length), D.pack(val_enc, cfg.max_length)
        return train_enc, val_enc

    def _micro_batches(self, step: int) -> list[dict]:
        """Collated micro-batches of optimizer step `step` on this rank."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch not in self._orders:
            self._orders = {epoch: D.epoch_batches(len(self.train_set), self.cfg.batch_size,
                                                   epoch, self.cfg.seed, self.rank, self.world)}
        ga = self.cfg.grad_accum_steps
        return [D.collate([self.train_set[i] for i in idx], self.tokenizer.pad_token_id)
                for idx in self._orders[epoch][pos * ga:(pos + 1) * ga]]

    # ---- distributed helpers ----------------------------------------------------
    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def _sum_over_ranks(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return t.tolist()

    def _stop_requested(self) -> bool:
        """rank 0 asks the host; its answer is broadcast so all ranks agree."""
        flag = bool(self.hooks.should_stop()) if self.rank == 0 else False
        if self.world > 1:
            t = torch.tensor([int(flag)], device=self._comm_device())
            dist.broadcast(t, src=0)
            flag = bool(t.item())
        return flag

    def _gather_rng_states(self) -> list[dict] | None:
        """Every rank's RNG states, on rank 0 (None elsewhere)."""
        mine = rng_state(self.device)
        if self.world == 1:
            return [mine]
        states = [None] * self.world if self.rank == 0 else None
        dist.gather_object(mine, states, dst=0)
        return states

    def _emit(self, event: dict) -> None:
        if self.rank == 0:
            self.hooks.progress(event)

    def _log(self, line: str) -> None:
        self._emit({"type": "log", "line": line})

    # ---- training -----------------------------------------------------------------
    def _optimizer_step(self) -> tuple[float, int, float]:
        """One optimizer step; returns (mean loss, tokens on all ranks, lr used)."""
        micro = self._micro_batches(self.step)
        self.train_model.train()
        losses, tokens = [], 0
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1
            no_sync = self.world > 1 and not last
            if self.fsdp:  # reduce-scatter gradients only on the last micro-batch
                self.model.set_requires_gradient_sync(last)
                no_sync = False
            with self.train_model.no_sync() if no_sync else contextlib.nullcontext():
                total, count = completion_ce(self.train_model, batch, self.device)
                loss = total / max(count, 1)  # mean CE over this micro-batch's tokens
                (loss / len(micro)).backward()
            losses.append(loss.item())
            real = int(batch["seq_mask"].sum())
            tokens += real
            self.real_tokens += real
            self.padded_positions += batch["seq_mask"].numel() - real
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, tokens_all = self._sum_over_ranks([sum(losses) / len(losses), float(tokens)])
        return loss_sum / self.world, int(tokens_all), lr

    def _eval(self) -> float | None:
        """Validation loss (all ranks compute it on the whole val set: same value)."""
        if not self.val_batches:
            return None
        if self.last_eval is not None and self.last_eval[0] == self.step:
            return self.last_eval[1]  # e.g. early stopping evaluated this step already
        loss = evaluate(self.model, self.val_batches, self.device)
        self.last_eval = (self.step, loss)
        ppl = math.exp(min(loss, 700.0))
        self._emit({"type": "eval", "step": self.step, "eval_loss": loss, "perplexity": ppl})
        self._log(f"step {self.step}: eval_loss {loss:.4f} perplexity {ppl:.2f}")
        return loss

    def _padding_waste(self) -> float:
        total = self.real_tokens + self.padded_positions
        return self.padded_positions / total if total else 0.0

    def _step_event(self, loss: float, tokens: int, lr: float, secs: float) -> dict:
        tps = tokens / secs if secs > 0 else 0.0
        return {"type": "step", "step": self.step, "total_steps": self.total_steps,
                "epoch": (self.step - 1) // self.steps_per_epoch, "loss": loss, "lr": lr,
                "tokens_per_s": tps, "step_time_s": secs,
                "padding_waste": self._padding_waste(),
                "gpu_mem_peak_mib": T.memory_peak_mib(self.device),
                "mfu": T.mfu(tps / self.world, self.flops_token, self.peak_flops)}

    def run(self) -> dict:
        cfg = self.cfg
        self._log(f"job {cfg.job_id} attempt {cfg.attempt}: {cfg.method} training on "
                  f"{self.device}, world size {self.world}, {len(self.train_set)} train / "
                  f"{len(self.val_set)} val examples, {self.total_steps} steps "
                  f"({self.steps_per_epoch} per epoch)")
        if self.resumed_from is not None:
            epoch, pos = divmod(self.step, self.steps_per_epoch)
            self._log(f"resumed from step {self.step} (epoch {epoch}, step {pos} of the epoch)")
        else:
            self.eval_loss_initial = self._eval()
            if self.eval_loss_initial is not None:
                self._track(self.eval_loss_initial)
        attempt_tokens, attempt_secs = 0, 0.0
        self.attempt_start = time.perf_counter()
        early_stopped = False
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            loss, tokens, lr = self._optimizer_step()
            secs = time.perf_counter() - t0
            self.step += 1
            self.train_tokens += tokens
            attempt_tokens, attempt_secs = attempt_tokens + tokens, attempt_secs + secs
            self.recent_losses.append(loss)
            self._emit(self._step_event(loss, tokens, lr, secs))
            if self.step == self.total_steps:
                break  # final eval + save follow
            if cfg.eval_every_steps and self.step % cfg.eval_every_steps == 0:
                eval_loss = self._eval()
                if eval_loss is not None and self._track(eval_loss):
                    self._log(f"early stopping at step {self.step}: no improvement over "
                              f"{self.early.best:.4f} (step {self.early.best_step}) in "
                              f"{self.early.bad_evals} evaluations")
                    early_stopped = True
                    break
            stop = self._stop_requested()
            if stop or self.step % cfg.checkpoint_every_steps == 0:
                self._checkpoint(self._running_metrics("preempted" if stop else "running"))
            if stop:
                self._log(f"stopped at step {self.step} on request; checkpoint saved")
                return {"status": "preempted", "step": self.step}
        return self._finish(attempt_tokens / attempt_secs if attempt_secs > 0 else 0.0,
                            early_stopped)

    # ---- best weights (restore_best) -----------------------------------------------------
    def _track(self, loss: float) -> bool:
        """Early-stopping bookkeeping of the evaluation at self.step; with restore_best keeps a
        copy of the weights when it is a new best. True when early stopping says stop."""
        stop = self.early.update(loss, self.step)
        if self.cfg.restores_best and self.early.best_step == self.step:
            self.best_state = self._weights()  # collective with FSDP (all ranks track alike)
        return stop

    def _weights(self) -> dict[str, torch.Tensor]:
        """CPU copy of the weights restore_best keeps: the adapter's (PEFT names) or the
        model's. FSDP: gathered, complete on rank 0 ({} elsewhere); collective."""
        if self.fsdp:
            from trainer.fsdp import full_model_state
            return full_model_state(self.model)
        state = get_peft_model_state_dict(self.model) if self.cfg.adapter else self.model.state_dict()
        return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    def _restore_best(self) -> int | None:
        """Load the best evaluation's weights into the model if they are not the current ones;
        the step they come from, or None. Same decision on every rank (collective with FSDP)."""
        best = self.early.best_step
        if not self.cfg.restores_best or best is None or best == self.step:
            return None
        if not self.fsdp and self.best_state is None:  # a checkpoint from before restore_best
            self._log(f"restore_best: the weights of step {best} were not kept; exporting step {self.step}")
            return None
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import set_model_state_dict

            from trainer.fsdp import FULL_FROM_RANK0
            for m in self.model.modules():  # an evaluation leaves the root's parameters unsharded
                if hasattr(m, "reshard"):
                    m.reshard()
            # a copy: broadcasting from rank 0 frees the tensors it is given, and the final
            # checkpoint still writes the best weights
            copy = {k: v.clone() for k, v in (self.best_state or {}).items()}
            set_model_state_dict(self.model, copy, options=FULL_FROM_RANK0)
        elif self.cfg.adapter:
            set_peft_model_state_dict(self.model, {k: v.to(self.device) for k, v in self.best_state.items()})
        else:
            self.model.load_state_dict(self.best_state)
        self._log(f"restore_best: exporting the weights of step {best} (eval_loss {self.early.best:.4f}), "
                  f"not those of step {self.step}")
        return best

    def _running_metrics(self, status: str) -> dict:
        return {"status": status, "step": self.step, "total_steps": self.total_steps,
                "train_loss": self._train_loss(), "train_tokens": self.train_tokens}

    def _train_loss(self) -> float | None:
        return sum(self.recent_losses) / len(self.recent_losses) if self.recent_losses else None

    def _elapsed(self) -> float:
        """Training wall time over all attempts so far (s)."""
        return self.train_seconds + time.perf_counter() - self.attempt_start

    def _finish(self, tokens_per_s: float, early_stopped: bool = False) -> dict:
        cfg = self.cfg
        evaluated = self.last_eval is not None and self.last_eval[0] == self.step
        eval_loss = self._eval()
        if eval_loss is not None and not evaluated:
            self._track(eval_loss)
        eval_loss_last, restored = eval_loss, self._restore_best()
        if restored is not None:  # report what is exported: the best weights' loss
            eval_loss = evaluate(self.model, self.val_batches, self.device)
        seconds = self._elapsed()
        gpu_hours = seconds * self.world / 3600.0
        metrics = {
            "status": "succeeded", "steps": self.step, "train_loss": self._train_loss(),
            "eval_loss": eval_loss, "eval_loss_initial": self.eval_loss_initial,
            "perplexity": math.exp(min(eval_loss, 700.0)) if eval_loss is not None else None,
            "best_eval_loss": self.early.best, "best_eval_step": self.early.best_step,
            "early_stopped": early_stopped, "restored_best_step": restored,
            "eval_loss_last": eval_loss_last,
            "tokens_per_s": tokens_per_s, "train_tokens": self.train_tokens,
            "padding_waste": self._padding_waste(),
            "mfu": T.mfu(tokens_per_s / self.world, self.flops_token, self.peak_flops),
            "gpu_mem_peak_mib": T.memory_peak_mib(self.device),
            "train_seconds": seconds, "world_size": self.world, "gpu_hours": gpu_hours,
            "parallelism": "fsdp" if self.fsdp else "ddp" if self.world > 1 else "single",
            "cost_usd": gpu_hours * cfg.price_per_gpu_hour if cfg.price_per_gpu_hour is not None
            else None,
            "output_dir": cfg.output_dir, "resumed_from_step": self.resumed_from,
            "data": self.data_summary,
        }
        # with FSDP every rank must run the same forward passes (they all-gather weights)
        if cfg.eval_generate_examples and (self.rank == 0 or self.fsdp) and self.val_records:
            preds, refs = E.generate_answers(self.model, self.tokenizer,
                                             self.val_records[:cfg.eval_generate_examples],
                                             self.device, cfg.eval_max_new_tokens)
            name = cfg.eval_metric.rpartition(":")[2] if cfg.eval_metric else None
            gen = E.generation_metrics(preds, refs, self.user_metric, name)
            metrics["generation"] = gen
            metrics["exact_match"] = gen["exact_match"]
            self._log(f"generation on {len(preds)} validation examples: " +
                      ", ".join(f"{k} {v:.4g}" for k, v in gen.items()))
        flat = {**metrics, **(metrics.get("generation") or {})}
        metrics["target"] = E.check_target(cfg.target, flat)
        metrics["target_met"] = metrics["target"]["met"]
        if cfg.target:
            self._log("target " + ("met" if metrics["target_met"] else "NOT met") + ": " +
                      json.dumps(metrics["target"]["detail"]))
        full_state = self._full_states()[0] if self.fsdp else None  # collective
        if self.rank == 0:
            X.save_output(self.model, self.tokenizer, cfg.output_dir, state_dict=full_state)
            if cfg.merge and cfg.adapter:
                self._log(f"merged model written to {X.save_merged(cfg, cfg.output_dir)}")
            X.write_card(cfg, metrics, self.data_summary, cfg.output_dir)
        self._checkpoint(metrics)
        self._log(f"done: {self.step} steps, train_loss {metrics['train_loss']}, "
                  f"eval_loss {eval_loss}, saved to {cfg.output_dir}")
        return metrics

    # ---- checkpoints ----------------------------------------------------------------
    def _checkpoint(self, metrics: dict) -> None:
        """Rank 0 writes the state to a temp dir; every rank calls the save hook."""
        rng_states = self._gather_rng_states()
        states = self._full_states() if self.fsdp else None  # collective
        path = None
        if self.rank == 0:
            if self.cfg.scratch_dir:
                Path(self.cfg.scratch_dir).mkdir(parents=True, exist_ok=True)
            path = tempfile.mkdtemp(prefix=f"shoal-job{self.cfg.job_id}-step{self.step}-",
                                    dir=self.cfg.scratch_dir)
            write_checkpoint(path, self, rng_states, states)
        try:
            self.hooks.save_checkpoint(path, metrics)
        finally:
            if path:
                shutil.rmtree(path, ignore_errors=True)
        self._emit({"type": "checkpoint", "step": self.step})

    def _full_states(self) -> tuple[dict, dict]:
        """(model, optimizer) full state dicts of an FSDP model, on rank 0. Collective."""
        from trainer.fsdp import full_model_state, full_optimizer_state
        return full_model_state(self.model), full_optimizer_state(self.model, self.optimizer)

    def _restore(self, path: str) -> None:
        state = read_checkpoint(path, self)
        self.step, self.train_tokens = state["step"], state["train_tokens"]
        self.recent_losses.extend(state["recent_losses"])
        self.eval_loss_initial = state["eval_loss_initial"]
        self.train_seconds = state.get("train_seconds", 0.0)
        self.early.load(state.get("early_stopping"))
        self.resumed_from = self.step
