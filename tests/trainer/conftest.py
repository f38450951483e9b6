"""Shared fixtures: a tiny offline model built once per session from the example data."""

from pathlib import Path

import pytest
import torch

from trainer.model import load_tokenizer
from trainer.tiny import build_tiny_model, read_texts

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "examples" / "data" / "tiny-sft"

# One intra-op thread: the tiny model gains nothing from more, and on a shared 2-core
# machine oversubscribed threads made each forward pass ~15x slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    texts = read_texts([str(DATA / "train.jsonl"), str(DATA / "val.jsonl")])
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), texts, seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)
