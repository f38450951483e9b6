"""Human-readable pending reasons. Pure string formatting: clock times are formatted from epoch
seconds by arithmetic (the policy imports no clock or datetime)."""
from __future__ import annotations

import math


def gib(mib: float) -> str:
    return f"{mib / 1024:.0f} GB" if mib >= 1024 else f"{mib:.0f} MiB"


def clock(t: float, now: float) -> str:
    """'14:05 UTC (in ~12 min)' for an epoch time t."""
    if not math.isfinite(t):
        return "an unknown time"
    hh, mm = int(t // 3600) % 24, int(t // 60) % 60
    mins = max(0, round((t - now) / 60))
    rel = f"in ~{mins} min" if mins < 120 else f"in ~{mins / 60:.1f} h"
    return f"~{hh:02d}:{mm:02d} UTC ({rel})"


def gpu_list(idx: tuple[int, ...]) -> str:
    """(0,1,2,3) -> '0-3'; (0,2,5) -> '0,2,5'."""
    s = sorted(idx)
    if len(s) > 2 and s == list(range(s[0], s[-1] + 1)):
        return f"{s[0]}-{s[-1]}"
    return ",".join(map(str, s))


def where(parts: list[tuple[str, tuple[int, ...]]]) -> str:
    return " + ".join(f"{name} GPU{'s' if len(ix) > 1 else ''} {gpu_list(ix)}" for name, ix in parts)


def jobs(ids: list[int]) -> str:
    return ("job " if len(ids) == 1 else "jobs ") + ", ".join(map(str, ids))


def needs(g: int, m: int, flavors: list[str], one_node: bool) -> str:
    fl = flavors[0] if len(flavors) == 1 else " or ".join(flavors) if flavors else "any"
    return f"{g}× {fl} with {gib(m)} free each" + (" on one node" if one_node else "")
