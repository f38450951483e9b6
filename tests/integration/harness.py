"""Drives a real Shoal server the way a user does: the `shoal` CLI in a subprocess, with its own
SHOAL_HOME, on a free port."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from scheduler.client import Client

REPO = Path(__file__).resolve().parents[2]
SHOAL = [sys.executable, "-m", "scheduler.cli"]


class ShoalServer:
    def __init__(self, home: Path, config: dict | None = None):
        self.home = home
        self.env = {**os.environ, "SHOAL_HOME": str(home)}
        self.config_path = None
        if config is not None:
            self.config_path = home.parent / f"{home.name}-cluster.yaml"
            self.config_path.write_text(yaml.safe_dump(config))

    def cli(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        proc = subprocess.run([*SHOAL, *args], env=self.env, cwd=REPO, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"shoal {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def up(self, *extra: str) -> Client:
        """`shoal up` (plus `extra` arguments, e.g. "--ray-address", ADDR)."""
        args = ["up", "--port", "0"] + (["--config", str(self.config_path)] if self.config_path else []) + list(extra)
        self.cli(*args)
        return self.client()

    def client(self) -> Client:
        """An SDK client with the server's admin token (what the CLI finds in SHOAL_HOME)."""
        return Client(json.loads((self.home / "daemon.json").read_text())["url"],
                      token=(self.home / "admin.token").read_text().strip())

    def down(self) -> None:
        self.cli("down", check=False)

    def pid(self) -> int:
        return json.loads((self.home / "daemon.json").read_text())["pid"]

    def log(self) -> str:
        p = self.home / "shoal.log"
        return p.read_text(errors="replace") if p.exists() else ""


def example_spec(changes: dict, none_removes: bool = False) -> dict:
    """The example spec (absolute paths) as a dict, with dotted-key changes; with `none_removes`
    a None value removes the key instead of setting it to null."""
    spec = yaml.safe_load((REPO / "examples" / "tiny-lora.yaml").read_text())
    base = REPO / "examples"
    spec["model"] = str(base / spec["model"])
    spec["dataset"] = {k: str(base / v) for k, v in spec["dataset"].items()}
    for key, value in changes.items():
        target = spec
        *parents, leaf = key.split(".")
        for p in parents:
            target = target.setdefault(p, {})
        if value is None and none_removes:
            target.pop(leaf, None)
        else:
            target[leaf] = value
    return spec


def write_spec(path: Path, **changes) -> Path:
    """The example spec with some fields changed; paths made absolute."""
    path.write_text(yaml.safe_dump(example_spec(changes)))
    return path
