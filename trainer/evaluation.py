"""Evaluation beyond the loss: generation metrics, the user's metric hook, targets, early stopping."""

from __future__ import annotations

import importlib
import importlib.util
import math
from pathlib import Path
from typing import Callable

import torch

from trainer import data as D

# Metrics where lower is better; every other target is a minimum to reach.
LOWER_IS_BETTER = ("eval_loss", "perplexity", "train_loss")


def load_metric(spec: str) -> Callable:
    """The function named by "package.module:function" or "path/to/file.py:function"."""
    module_name, _, func_name = spec.rpartition(":")
    if not module_name or not func_name:
        raise ValueError(f"eval metric {spec!r}: expected 'module:function' or 'file.py:function'")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise ValueError(f"eval metric {spec!r}: file {path} does not exist")
            loader = importlib.util.spec_from_file_location(f"shoal_user_metric_{path.stem}", path)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"eval metric {spec!r}: cannot import {module_name}: {e}") from e
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise ValueError(f"eval metric {spec!r}: {module_name} has no function {func_name!r}")
    return fn


def prompt_and_reference(tokenizer, rec: dict) -> tuple[list[int], str]:
    """(prompt token ids as training encodes them, reference answer) of one record.

    Chat: the conversation up to its last assistant message, with the generation prompt;
    the reference is that message's content.
    """
    if "messages" in rec:
        msgs = rec["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        text = tokenizer.apply_chat_template(msgs[:last], tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"], msgs[last]["content"]
    ids = tokenizer(rec["prompt"], add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    return ids, rec["completion"]


@torch.no_grad()
def generate_answers(model, tokenizer, records: list[dict], device: torch.device,
                     max_new_tokens: int) -> tuple[list[str], list[str]]:
    """Greedy answers for `records`; (predictions, references), special tokens removed."""
    was_training = model.training
    model.eval()
    preds, refs = [], []
    for rec in records:
        ids, ref = prompt_and_reference(tokenizer, rec)
        inp = torch.tensor([ids], device=device)
        out = model.generate(input_ids=inp, attention_mask=torch.ones_like(inp), do_sample=False,
                             max_new_tokens=max_new_tokens, use_cache=True,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        preds.append(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True))
        refs.append(ref)
    model.train(was_training)
    return preds, refs


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Share of predictions equal to their reference after stripping surrounding whitespace."""
    if not references:
        return math.nan
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(references)


def generation_metrics(predictions: list[str], references: list[str],
                       user_metric: Callable | None, user_metric_name: str | None) -> dict:
    """exact_match plus the user's metric (a float, stored under its function name, or a dict)."""
    out = {"exact_match": exact_match(predictions, references), "generated": len(predictions)}
    if user_metric is not None:
        value = user_metric(predictions, references)
        if isinstance(value, dict):
            out.update({str(k): float(v) for k, v in value.items()})
        else:
            out[user_metric_name or "user_metric"] = float(value)
    return out


def check_target(target: dict[str, float], metrics: dict) -> dict:
    """{"met": bool or None (no target), "detail": {name: {target, value, met, goal}}}."""
    if not target:
        return {"met": None, "detail": {}}
    detail = {}
    for name, wanted in target.items():
        value = metrics.get(name)
        lower = name in LOWER_IS_BETTER or name.endswith("loss")
        ok = value is not None and not (isinstance(value, float) and math.isnan(value)) and (
            value <= wanted if lower else value >= wanted)
        detail[name] = {"target": wanted, "value": value, "met": bool(ok),
                        "goal": "at most" if lower else "at least"}
    return {"met": all(d["met"] for d in detail.values()), "detail": detail}


class EarlyStopping:
    """Stop after `patience` evaluations without the loss dropping by more than `min_delta`."""

    def __init__(self, patience: int | None, min_delta: float = 0.0):
        self.patience, self.min_delta = patience, min_delta
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0

    def update(self, loss: float, step: int) -> bool:
        """Record an evaluation; True when training should stop."""
        if self.best is None or loss < self.best - self.min_delta:
            self.best, self.best_step, self.bad_evals = loss, step, 0
        else:
            self.bad_evals += 1
        return self.patience is not None and self.bad_evals >= self.patience

    def state(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals}

    def load(self, state: dict | None) -> None:
        if state:
            self.best, self.best_step, self.bad_evals = state["best"], state["best_step"], state["bad_evals"]


def eval_batches(examples: list[dict], batch_size: int, pad_token_id: int) -> list[dict]:
    return [D.collate(examples[i:i + batch_size], pad_token_id)
            for i in range(0, len(examples), batch_size)]
