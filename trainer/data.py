"""SFT data: tokenization with loss masks, length policy, validation summary, packing, batching.

Records come from `trainer.formats` ({"prompt", "completion"} or {"messages"}). Loss is
computed on completion / assistant tokens only: every other position carries label -100.
Prompt/completion records are encoded as [bos] prompt completion eos; chat records with
the model's chat template (`tokenizer.apply_chat_template`).

Batch order is a pure function of (seed, epoch, rank, world_size), so a run can resume
at any (epoch, batch index) and see exactly the batches it would have seen.

Packing (`pack`) puts several examples into one row of at most max_length tokens (best-fit
decreasing); position_ids restart at 0 for each example and no 2-D attention mask is
passed, so transformers builds a block-diagonal causal mask (sdpa/eager) or uses varlen
flash attention: attention and loss stay inside each example.
"""

from __future__ import annotations

import bisect
import math
import random
import re
from pathlib import Path

import numpy as np
import torch

from trainer.formats import DatasetError, collect_records, load_records  # noqa: F401 - re-exported

IGNORE_INDEX = -100  # label value ignored by the loss
POLICIES = ("error", "truncate", "drop")
HIST_EDGES = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


class ChatTemplateError(ValueError):
    """Chat data, but the tokenizer has no usable chat template."""


def load_pairs(path: str | Path) -> list[dict]:
    """Prompt/completion records of a file or directory (see trainer.formats)."""
    return load_records(path, "prompt_completion")[0]


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


# ---- tokenization -------------------------------------------------------------------------
def encode_pair(tokenizer, prompt: str, completion: str, max_length: int,
                where: str = "record") -> dict:
    """Token ids for [bos] prompt completion eos, labels -100 on bos + prompt.

    Longer than max_length: cut from the right; at least one completion token
    must remain, otherwise ValueError naming `where`.
    """
    ids, labels = _pair_ids(tokenizer, prompt, completion)
    return _truncate(ids, labels, max_length, where)


def _pair_ids(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    completion_ids = completion_ids + [tokenizer.eos_token_id]
    return prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids


def _truncate(ids: list[int], labels: list[int], max_length: int, where: str) -> dict:
    ids, labels = ids[:max_length], labels[:max_length]
    if all(x == IGNORE_INDEX for x in labels[1:]):  # labels[0] is never predicted
        first = next((i for i, x in enumerate(labels) if x != IGNORE_INDEX), None)
        raise ValueError(f"{where}: prompt is {first if first is not None else len(ids)} tokens, "
                         f"no room for the completion within max_length={max_length}")
    return {"input_ids": ids, "labels": labels}


def chat_ids(tokenizer, messages: list[dict], where: str = "record") -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation rendered with the tokenizer's chat template;
    labels are the ids on the text of every assistant message (as the template renders it,
    from the end of the generation prompt to the end of the turn), -100 elsewhere.

    Spans are found on the rendered text: the text of messages[:i] with the generation
    prompt must be a prefix of the text of messages[:i+1], which must be a prefix of the
    whole conversation. Each span is tokenized on its own, so a label boundary never
    falls inside a token, and the context matches what generation sees.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            "the dataset is chat-formatted (messages) but the model's tokenizer has no chat "
            "template (tokenizer_config.json 'chat_template'); add one to the model directory "
            "or convert the data to prompt/completion")

    def render(msgs: list[dict], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False,
                                             add_generation_prompt=generation_prompt)

    full = render(messages, False)
    cuts: list[tuple[int, int]] = []  # (start, end) of assistant spans in `full`
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, upto = (render(messages[:i], True) if i else ""), render(messages[:i + 1], False)
        start, end = len(before), len(upto)
        if not (upto.startswith(before) and full.startswith(upto)) or (cuts and start < cuts[-1][1]):
            raise ChatTemplateError(
                f"{where}: the chat template does not render conversations prefix by prefix "
                f"(message {i}), so assistant tokens cannot be located")
        cuts.append((start, end))
    ids: list[int] = []
    labels: list[int] = []
    pos = 0
    for start, end in cuts + [(len(full), len(full))]:
        for text, train in ((full[pos:start], False), (full[start:end], True)):
            if text:
                piece = tokenizer(text, add_special_tokens=False)["input_ids"]
                ids += piece
                labels += piece if train else [IGNORE_INDEX] * len(piece)
        pos = end
    return ids, labels


def encode_record(tokenizer, rec: dict, max_length: int, policy: str = "truncate") -> dict | None:
    """Encode one record (prompt/completion or chat) under the length policy:
    error -> ValueError naming the record; truncate -> cut from the right (ValueError if
    no label would remain); drop -> None. The result has "input_ids", "labels", "n_full"
    (length before truncation)."""
    if policy not in POLICIES:
        raise ValueError(f"max_length_policy must be one of {POLICIES}, got {policy!r}")
    where = rec.get("source", "record")
    if "messages" in rec:
        ids, labels = chat_ids(tokenizer, rec["messages"], where)
    else:
        ids, labels = _pair_ids(tokenizer, rec["prompt"], rec["completion"])
    n = len(ids)
    if n > max_length:
        if policy == "drop":
            return None
        if policy == "error":
            raise ValueError(f"{where}: record is {n} tokens, longer than max_length={max_length} "
                             f"(raise hyperparameters.max_length or set "
                             f"dataset.max_length_policy: truncate | drop)")
    out = _truncate(ids, labels, max_length, where)
    out["n_full"] = n
    return out


def encode_pairs(tokenizer, pairs: list[dict], max_length: int, policy: str = "truncate") -> list[dict]:
    """encode_record over a dataset; raises DatasetError listing every failing record."""
    return encode_dataset(tokenizer, pairs, max_length, policy)[0]


def encode_dataset(tokenizer, records: list[dict], max_length: int,
                   policy: str = "truncate") -> tuple[list[dict], dict]:
    """(encoded examples, summary); DatasetError lists every record that fails the policy.

    summary: records, examples (kept), dropped, truncated, tokens (kept, after truncation),
    label_tokens, max_tokens / mean_tokens (before truncation), histogram of lengths
    before truncation {"<=32": n, ..., ">32768": n}, max_length, policy.
    """
    encoded, problems, lengths = [], [], []
    dropped = truncated = 0
    for i, rec in enumerate(records):
        rec = rec if "source" in rec else {**rec, "source": f"record {i}"}
        try:
            enc = encode_record(tokenizer, rec, max_length, policy)
        except ChatTemplateError as e:
            raise DatasetError([str(e)]) from e  # the same for every record: say it once
        except ValueError as e:
            problems.append(str(e))
            continue
        if enc is None:
            dropped += 1
            continue
        enc["index"] = i  # position in `records`
        lengths.append(enc["n_full"])
        truncated += enc["n_full"] > max_length
        encoded.append(enc)
    if problems:
        raise DatasetError(problems)
    return encoded, summarize(encoded, lengths, dropped, truncated, max_length, policy)


def summarize(encoded: list[dict], lengths: list[int], dropped: int, truncated: int,
              max_length: int, policy: str) -> dict:
    hist: dict[str, int] = {}
    for n in lengths:
        edge = next((e for e in HIST_EDGES if n <= e), None)
        key = f"<={edge}" if edge else f">{HIST_EDGES[-1]}"
        hist[key] = hist.get(key, 0) + 1
    order = [f"<={e}" for e in HIST_EDGES] + [f">{HIST_EDGES[-1]}"]
    return {
        "records": len(encoded) + dropped, "examples": len(encoded), "dropped": dropped,
        "truncated": truncated, "tokens": sum(len(e["input_ids"]) for e in encoded),
        "label_tokens": sum(sum(x != IGNORE_INDEX for x in e["labels"][1:]) for e in encoded),
        "max_tokens": max(lengths, default=0),
        "mean_tokens": round(sum(lengths) / len(lengths), 2) if lengths else 0.0,
        "histogram": {k: hist[k] for k in order if k in hist},
        "max_length": max_length, "policy": policy,
    }


def prepare(path: str | Path, tokenizer, fmt: str, max_length: int,
            policy: str) -> tuple[list[dict], list[dict], dict]:
    """(records, encoded, summary) for a data file/dir; DatasetError lists every problem
    (format problems and length problems together)."""
    records, fmt, problems = collect_records(path, fmt)
    try:
        encoded, summary = encode_dataset(tokenizer, records, max_length, policy)
    except DatasetError as e:
        problems += e.problems
    if problems:
        raise DatasetError(sorted(problems, key=_where))
    summary["format"] = fmt
    return records, encoded, summary


def _where(problem: str) -> tuple[str, int]:
    """Sort key of a problem: (file, line or row), so the report follows the file."""
    m = re.match(r"^(.*?):(?:row )?(\d+): ", problem)
    return (m.group(1), int(m.group(2))) if m else (problem, 0)


# ---- packing and batching ----------------------------------------------------------------------
def pack(examples: list[dict], max_length: int) -> list[dict]:
    """Best-fit-decreasing packing of examples into rows of at most max_length tokens.

    Each row: input_ids, labels (the first label of every example is -100: it is never
    predicted inside its own example, and must not be predicted from the previous one),
    position_ids restarting at 0 per example, lengths. Deterministic (stable sort).
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    rows: list[list[int]] = []  # example indices per row
    free: list[tuple[int, int]] = []  # sorted (room left, row index)
    for i in order:
        n = len(examples[i]["input_ids"])
        if n > max_length:
            raise ValueError(f"example {i} has {n} tokens > max_length={max_length}")
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, r = free.pop(at)
            rows[r].append(i)
        else:
            room, r = max_length, len(rows)
            rows.append([i])
        if room - n > 0:
            bisect.insort(free, (room - n, r))
    return [_join([examples[i] for i in sorted(r)]) for r in rows]


def _join(exs: list[dict]) -> dict:
    ids, labels, pos, lengths = [], [], [], []
    for ex in exs:
        n = len(ex["input_ids"])
        ids += ex["input_ids"]
        labels += [IGNORE_INDEX] + list(ex["labels"][1:])
        pos += list(range(n))
        lengths.append(n)
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "lengths": lengths}


def collate(batch: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples (or packed rows) into one batch.

    Plain examples: input_ids, attention_mask, labels. Packed rows (with position_ids):
    input_ids, position_ids, labels and no attention_mask (the model derives the
    block-diagonal mask from position_ids); the padded tail is its own sequence
    (positions from 0) with labels -100. Both carry seq_mask (1 on real tokens).
    """
    width = max(len(ex["input_ids"]) for ex in batch)
    packed = "position_ids" in batch[0]
    ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ex in enumerate(batch):
        n = len(ex["input_ids"])
        ids[row, :n] = torch.tensor(ex["input_ids"])
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(ex["labels"])
        if packed:
            pos[row, :n] = torch.tensor(ex["position_ids"])
            pos[row, n:] = torch.arange(width - n)
    if packed:
        return {"input_ids": ids, "position_ids": pos, "labels": labels, "seq_mask": mask}
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "seq_mask": mask}


def padding_waste(batches: list[dict]) -> float:
    """Fraction of batch positions that are padding."""
    total = sum(b["seq_mask"].numel() for b in batches)
    return 1.0 - sum(int(b["seq_mask"].sum()) for b in batches) / total if total else 0.0


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
