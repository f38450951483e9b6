"""Fully sharded data parallel (torch FSDP2, `fully_shard`) for full fine-tuning on several workers.

Each decoder layer and then the whole model are sharded over all ranks, so parameters,
gradients and AdamW states are split world-size ways (ZeRO-3); on CPU the mesh is "cpu" and
collectives go through gloo. Checkpoints hold FULL (unsharded) state dicts gathered on rank 0,
so a checkpoint reads back like a single-worker one (same keys) and the final model is a
normal Hugging Face directory.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
FULL_FROM_RANK0 = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)


def shard(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Shard `model` in place over the default process group; returns it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    inner = getattr(model, "model", None)
    for layer in getattr(inner, "layers", []):  # decoder blocks: one all-gather unit each
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_model_state(model) -> dict:
    """The unsharded state dict on CPU (complete on rank 0). Collective: call on every rank."""
    return get_model_state_dict(model, options=FULL)


def full_optimizer_state(model, optimizer) -> dict:
    """The unsharded optimizer state (keyed by parameter name). Collective."""
    return get_optimizer_state_dict(model, optimizer, options=FULL)


def load_full_state(model, optimizer, model_state: dict, optimizer_state: dict) -> None:
    """Rank 0 passes full state dicts, other ranks {}; every rank gets its shards. Collective."""
    set_model_state_dict(model, model_state, options=FULL_FROM_RANK0)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=FULL_FROM_RANK0)
