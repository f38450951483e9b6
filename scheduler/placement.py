"""A job's placement as the store keeps it (`JobRecord.placement`, a JSON dict).

    {"node_id": ..., "node": ..., "gpu_indices": [...], "gpu_model": ...,
     "parts": [{"node_id": ..., "node": ..., "gpu_indices": [...]}, ...]}

`node_id` / `node` / `gpu_indices` are the first (or only) node, so readers that know one node
keep working; `parts` lists EVERY node of the gang, the first equal to them. Placements written
before multi-node gangs (and single-node ones) may have no `parts`: the helpers here read both.
A gang never mixes GPU models, so `gpu_model` is the flavor of every part.
"""
from __future__ import annotations

Part = tuple[str, tuple[int, ...]]  # (node_id, GPU indices on that node)


def parts(placement: dict | None) -> list[Part]:
    """Every (node_id, gpu_indices) of the placement; [] when there is none."""
    return [(node_id, ix) for node_id, _, ix in named_parts(placement)]


def named_parts(placement: dict | None) -> list[tuple[str, str, tuple[int, ...]]]:
    """Every (node_id, node name, gpu_indices); the name falls back to the id."""
    if not placement:
        return []
    listed = placement.get("parts") or [placement]
    return [(p.get("node_id"), p.get("node") or p.get("node_id"), tuple(p.get("gpu_indices", ()))) for p in listed]


def node_ids(placement: dict | None) -> list[str]:
    return [n for n, _ in parts(placement)]


def gpu_count(placement: dict | None) -> int:
    """GPUs the job holds on all its nodes."""
    return sum(len(ix) for _, ix in parts(placement))


def describe(placement: dict | None) -> str:
    """'node-a GPU 0,1 + node-b GPU 0,1' (what `shoal status` and the events say)."""
    return " + ".join(f"{name} GPU {','.join(map(str, ix))}" for _, name, ix in named_parts(placement)) or "-"


def record(named: list[tuple[str, str, tuple[int, ...]]], gpu_model: str | None) -> dict:
    """The stored dict for these (node_id, name, gpu_indices) parts, first part first. A single
    node gets no `parts` key (exactly the pre-multi-node shape)."""
    node_id, name, ix = named[0]
    out = {"node_id": node_id, "node": name, "gpu_indices": list(ix), "gpu_model": gpu_model}
    if len(named) > 1:
        out["parts"] = [{"node_id": n, "node": nm, "gpu_indices": list(i)} for n, nm, i in named]
    return out
