"""Faults injected into running fake GPUs from a file: how a test or a failure drill makes a fake
GPU report an XID or ECC error while Shoal runs. The daemon watches `SHOAL_HOME/fake-faults.jsonl`
when its GPU reader is fake (never with NVML). One JSON object per line, the fields of a scenario
fault (`monitoring.scenario.Fault`) except `at_s` (a line applies when it is read):

    {"node": "<Ray node id, or a unique prefix of 6+ characters>", "gpu": 0, "xid": 79}
    {"node": "3f9a1c0d", "gpu": 1, "ecc_uncorrected": 1}

Lines apply once each, in order, as they are appended (a line counts once it ends with a newline).
A line that does not parse is logged as an error naming its line number and field, and skipped; a
line naming a node that is not known yet waits (logged once) until the node appears.
"""
from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from pydantic import ValidationError

from monitoring.gpu import FakeGpuReader
from monitoring.scenario import Fault, inject

log = logging.getLogger("shoal.faults")


def parse_fault_line(line: str) -> Fault:
    """One line of a fault file -> Fault; ValueError naming the field otherwise."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object of fault fields, got {type(data).__name__}")
    if "at_s" in data:
        raise ValueError("at_s: not used in a fault file (a line applies when it is read)")
    try:
        return Fault.model_validate(data)
    except ValidationError as e:
        raise ValueError("; ".join(f"{'.'.join(map(str, err['loc'])) or 'line'}: {err['msg']}"
                                   for err in e.errors())) from None


class FaultFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._done = 0  # complete lines consumed (applied or rejected)
        self._waiting_logged: set[int] = set()

    @staticmethod
    def _resolve(ref: str, readers: dict) -> str | None:
        if ref in readers:
            return ref
        hits = [nid for nid in list(readers) if len(ref) >= 6 and nid.startswith(ref)]
        return hits[0] if len(hits) == 1 else None

    def apply(self, readers: dict[str, FakeGpuReader]) -> list[Fault]:
        """Apply the lines appended since the last call to `readers` ({node id: reader}); returns
        the faults applied."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        lines = text.split("\n")[:-1]  # the part after the last newline is still being written
        applied = []
        while self._done < len(lines):
            number, line = self._done + 1, lines[self._done].strip()
            where = f"{self.path}:{number}"
            if line:
                try:
                    fault = parse_fault_line(line)
                    node = self._resolve(fault.node, readers)
                    if node is None:
                        if number not in self._waiting_logged:
                            self._waiting_logged.add(number)
                            log.warning("%s: node: %r is not a known node (yet); known: %s", where, fault.node,
                                        ", ".join(sorted(readers)) or "none")
                        break
                    inject(readers[node], fault)
                except (ValueError, IndexError, AttributeError) as e:  # bad line, no such GPU, not a fake
                    log.error("%s: fault not applied: %s", where, e)
                else:
                    log.warning("%s: injected %s on node %s", where, fault.model_dump(exclude_defaults=True), node)
                    applied.append(fault)
            self._done += 1
        return applied

    def watch(self, readers: dict[str, FakeGpuReader], stop: threading.Event,
              interval_s: float = 0.5) -> threading.Thread:
        """Apply new lines every `interval_s` until `stop` (a daemon thread)."""
        def loop() -> None:
            while not stop.wait(interval_s):
                try:
                    self.apply(readers)
                except Exception:  # noqa: BLE001 - a drill helper must never take the server down
                    log.exception("fault file %s", self.path)

        thread = threading.Thread(target=loop, name="shoal-fault-file", daemon=True)
        thread.start()
        return thread
