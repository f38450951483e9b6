"""Prompt/completion data: loading, validation, splitting, encoding, batching.

Loss is computed on completion tokens only: prompt positions carry label -100.
Batch order is a pure function of (seed, epoch, rank, world_size), so a run can
resume at any (epoch, batch index) and see exactly the batches it would have seen.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import torch

IGNORE_INDEX = -100  # label value ignored by the loss


class DatasetError(ValueError):
    """Invalid dataset; `.problems` lists every problem as "<file>:<line>: <problem>"."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        shown = "\n  ".join(self.problems[:50])
        more = f"\n  ... and {len(self.problems) - 50} more" if len(self.problems) > 50 else ""
        super().__init__(f"{len(self.problems)} problem(s) in dataset:\n  {shown}{more}")


def _check_record(line: bytes) -> tuple[dict | None, str | None]:
    """Parse one JSONL line; return (record, None) or (None, problem)."""
    try:
        obj = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "not valid UTF-8"
    except json.JSONDecodeError as e:
        return None, f"invalid JSON ({e.msg} at column {e.colno})"
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    for key in ("prompt", "completion"):
        if key not in obj:
            return None, f"missing field '{key}'"
        if not isinstance(obj[key], str):
            return None, f"field '{key}' must be a string, got {type(obj[key]).__name__}"
    if not obj["completion"]:
        return None, "empty completion"
    return obj, None


def load_pairs(path: str | Path) -> list[dict]:
    """Read a JSONL file of {"prompt", "completion"} records.

    Returns dicts with keys prompt, completion and source ("<file>:<line>").
    Raises DatasetError listing every bad record (or an empty/missing file).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DatasetError([f"{path}: cannot read ({e.strerror})"]) from e
    pairs, problems = [], []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue  # blank lines are allowed
        obj, problem = _check_record(line)
        if problem:
            problems.append(f"{path}:{lineno}: {problem}")
        else:
            pairs.append({"prompt": obj["prompt"], "completion": obj["completion"],
                          "source": f"{path}:{lineno}"})
    if not pairs and not problems:
        problems.append(f"{path}: no records (empty file)")
    if problems:
        raise DatasetError(problems)
    return pairs


def split_pairs(pairs: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """Seeded split into (train, val), each keeping file order.

    val is non-empty when val_fraction > 0 and there are >= 2 pairs; train is never empty.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(pairs)
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    else:
        n_val = 0
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    train = [p for i, p in enumerate(pairs) if i not in val_idx]
    val = [p for i, p in enumerate(pairs) if i in val_idx]
    return train, val


def encode_pair(tokenizer, prompt: str, completion: str, max_length: int,
                where: str = "record") -> dict:
    """Token ids for [bos] prompt completion eos, labels -100 on bos + prompt.

    Longer than max_length: cut from the right; at least one completion token
    must remain, otherwise ValueError naming `where`.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    completion_ids = completion_ids + [tokenizer.eos_token_id]
    if len(prompt_ids) >= max_length:
        raise ValueError(f"{where}: prompt is {len(prompt_ids)} tokens, no room for the "
                         f"completion within max_length={max_length}")
    input_ids = (prompt_ids + completion_ids)[:max_length]
    labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    return {"input_ids": input_ids, "labels": labels[:max_length]}


def encode_pairs(tokenizer, pairs: list[dict], max_length: int) -> list[dict]:
    """encode_pair over a dataset; raises DatasetError listing every failing record."""
    encoded, problems = [], []
    for i, p in enumerate(pairs):
        where = p.get("source", f"record {i}")
        try:
            encoded.append(encode_pair(tokenizer, p["prompt"], p["completion"], max_length, where))
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise DatasetError(problems)
    return encoded


def collate(batch: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded examples into input_ids, attention_mask, labels."""
    width = max(len(ex["input_ids"]) for ex in batch)
    ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, ex in enumerate(batch):
        n = len(ex["input_ids"])
        ids[row, :n] = torch.tensor(ex["input_ids"])
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(ex["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches_per_epoch(n: int, batch_size: int, world_size: int = 1) -> int:
    """Micro-batches each rank sees per epoch."""
    padded = math.ceil(n / world_size) * world_size
    return math.ceil(padded / (batch_size * world_size))


def epoch_batches(n: int, batch_size: int, epoch: int, seed: int,
                  rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """This rank's micro-batches (lists of example indices) for one epoch.

    The permutation depends only on (seed, epoch). With several ranks it is
    padded by wrap-around to a multiple of world_size (as DistributedSampler),
    cut into global batches of batch_size * world_size and each global batch
    is dealt round-robin, so every rank gets the same number of non-empty batches.
    """
    if n == 0:
        return []
    perm = np.random.default_rng([seed, epoch]).permutation(n).tolist()
    padded = math.ceil(n / world_size) * world_size
    perm = [perm[i % n] for i in range(padded)]
    step = batch_size * world_size
    return [perm[i:i + step][rank::world_size] for i in range(0, padded, step)]
