"""Checkpoint files of a training run: what `trainer.loop` writes at each checkpoint and reads to
resume, exactly (weights or adapter, optimizer, scheduler, best weights for restore_best, every
rank's RNG states, the loop's counters). The functions read and set the loop's `_Trainer` fields.

Layout of a checkpoint directory:
  <dir>/adapter/ (PEFT save_pretrained) or <dir>/model.safetensors (full weights),
  optimizer.pt, scheduler.pt, best/weights.safetensors (restore_best), per rank r: rng_rank<r>.json (python, numpy) and
  rng_torch_rank<r>.pt (torch cpu/cuda),
  trainer_state.json (step, epoch, position in the epoch, counters), written last.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file, load_model, save_file, save_model

if TYPE_CHECKING:
    from trainer.loop import _Trainer

STATE_FILE = "trainer_state.json"
BEST_DIR, BEST_FILE = "best", "weights.safetensors"  # restore_best: <dir>/best/weights.safetensors


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, none sharing memory with another (safetensors refuses tied weights)."""
    seen, out = set(), {}
    for k, v in state.items():
        v = v.contiguous()
        out[k] = v.clone() if v.data_ptr() in seen else v
        seen.add(v.data_ptr())
    return out


def _read_best(p: Path, t: "_Trainer") -> None:
    """best_state from the checkpoint (FSDP: rank 0 reads, the others hold {})."""
    f = p / BEST_DIR / BEST_FILE
    if t.fsdp and t.rank != 0:
        t.best_state = {} if t.cfg.restores_best else None
    elif f.is_file():
        t.best_state = load_file(str(f))


def write_checkpoint(path: str, t: _Trainer, rng_states: list[dict],
                     full_states: tuple[dict, dict] | None = None) -> None:
    """Write everything needed to continue `t` exactly into directory `path`.

    rng_states[r] is rank r's rng_state() at this step (ranks draw different
    amounts of randomness, e.g. dropout on differently shaped batches).
    full_states: (model, optimizer) state dicts gathered from FSDP shards."""
    p = Path(path)
    if t.cfg.adapter:
        t.model.save_pretrained(p / "adapter")
    elif full_states is not None:
        save_file({k: v.contiguous() for k, v in full_states[0].items()}, str(p / "model.safetensors"))
    else:
        save_model(t.model, str(p / "model.safetensors"))
    torch.save(full_states[1] if full_states else t.optimizer.state_dict(), p / "optimizer.pt")
    torch.save(t.scheduler.state_dict(), p / "scheduler.pt")
    if t.best_state:  # restore_best: the best evaluation's weights so far
        (p / BEST_DIR).mkdir()
        save_file(_unshared(t.best_state), str(p / BEST_DIR / BEST_FILE))
    for rank, state in enumerate(rng_states):
        _save_rng(p, rank, state)
    epoch, pos = divmod(t.step, t.steps_per_epoch)
    state = {"job_id": t.cfg.job_id, "attempt": t.cfg.attempt, "method": t.cfg.method,
             "step": t.step, "total_steps": t.total_steps, "epoch": epoch,
             "step_in_epoch": pos, "batch_in_epoch": pos * t.cfg.grad_accum_steps,
             "train_tokens": t.train_tokens, "recent_losses": list(t.recent_losses),
             "eval_loss_initial": t.eval_loss_initial, "train_seconds": t._elapsed(),
             "early_stopping": t.early.state()}
    (p / STATE_FILE).write_text(json.dumps(state, indent=1))


def read_checkpoint(path: str, t: _Trainer) -> dict:
    """Load weights, optimizer, scheduler and RNG states into `t`; return the state dict."""
    p = Path(path)
    if not (p / STATE_FILE).is_file():
        raise ValueError(f"checkpoint {p} is incomplete: no {STATE_FILE}")
    state = json.loads((p / STATE_FILE).read_text())
    if state["method"] != t.cfg.method:
        raise ValueError(f"checkpoint {p} is for method {state['method']!r}, "
                         f"config says {t.cfg.method!r}")
    dev = str(t.device)
    if t.fsdp:  # rank 0 reads the full states, every rank takes its shards
        from trainer.fsdp import load_full_state
        full = t.rank == 0
        load_full_state(t.model, t.optimizer,
                        load_file(str(p / "model.safetensors")) if full else {},
                        torch.load(p / "optimizer.pt", weights_only=True) if full else {})
        t.scheduler.load_state_dict(torch.load(p / "scheduler.pt", weights_only=True))
        _load_rng(p, t.rank, t.device)
        _read_best(p, t)
        return state
    if t.cfg.adapter:
        weights = load_file(str(p / "adapter" / "adapter_model.safetensors"), device=dev)
        result = set_peft_model_state_dict(t.model, weights)
        if result.unexpected_keys:
            raise ValueError(f"checkpoint {p}: unexpected adapter keys "
                             f"{result.unexpected_keys[:5]}")
    else:
        load_model(t.model, str(p / "model.safetensors"), device=dev)
    optimizer_state = torch.load(p / "optimizer.pt", map_location=dev, weights_only=True)
    t.optimizer.load_state_dict(optimizer_state)
    t.scheduler.load_state_dict(torch.load(p / "scheduler.pt", weights_only=True))
    _load_rng(p, t.rank, t.device)
    _read_best(p, t)
    return state


def rng_state(device: torch.device) -> dict:
    """This process's python, numpy, torch (and CUDA) RNG states, picklable."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(mt), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _save_rng(p: Path, rank: int, state: dict) -> None:
    """rng_rank<r>.json (python, numpy) + rng_torch_rank<r>.pt (torch cpu, cuda)."""
    (p / f"rng_rank{rank}.json").write_text(
        json.dumps({"python": state["python"], "numpy": state["numpy"]}))
    torch.save({"cpu": state["torch"], "cuda": state["cuda"]}, p / f"rng_torch_rank{rank}.pt")


def _load_rng(p: Path, rank: int, device: torch.device) -> None:
    """Restore this rank's RNG states (rank 0's if the checkpoint has none for it)."""
    rank = rank if (p / f"rng_rank{rank}.json").is_file() else 0
    saved = json.loads((p / f"rng_rank{rank}.json").read_text())
    version, mt, gauss = saved["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    states = torch.load(p / f"rng_torch_rank{rank}.pt", weights_only=True)
    torch.set_rng_state(states["cpu"])
    if device.type == "cuda" and states["cuda"] is not None:
        torch.cuda.set_rng_state(states["cuda"], device)
