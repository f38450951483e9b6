"""Shared fixtures. `tiny_model` is the demo's tiny Llama (built offline by `make assets`, or
here if missing) loaded through the same code path as a user's model directory."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "examples" / "models" / "tiny-llama"
DATA = REPO / "examples" / "data" / "tiny-sft"


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    if not (TINY / "config.json").exists():
        subprocess.run([sys.executable, "-m", "trainer.tiny", str(TINY), "--data",
                        str(DATA / "train.jsonl"), str(DATA / "val.jsonl")], check=True)
    return TINY


@pytest.fixture(autouse=True)
def _no_shoal_env(monkeypatch):
    # Tests must never talk to a developer's running Shoal.
    for var in ("SHOAL_URL", "SHOAL_HOME", "SHOAL_TOKEN", "SHOAL_CONFIG", "SHOAL_SECRET"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", "/nonexistent-shoal-test-config")  # not ~/.config/shoal
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
