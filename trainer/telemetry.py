"""Per-step figures: GPU memory peak and an estimate of model FLOPs utilization (MFU).

FLOPs per trained token (Chowdhery et al. 2022, PaLM, appendix B): 6·N for a forward and a
backward pass over N parameters, plus 12·L·H·T for attention (L layers, hidden H, context T).
With frozen base weights (adapters) the weight-gradient matmuls are skipped: 4·N + 12·L·H·T.
MFU = achieved FLOP/s / the device's dense bf16 peak; None where the peak is unknown (CPU).
"""

from __future__ import annotations

import torch

# Dense (no sparsity) bf16 tensor-core peak FLOP/s, by a substring of the device name.
PEAK_BF16_FLOPS = (
    ("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("GH200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12),
    ("L40", 181e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12), ("4090", 165e12),
    ("V100", 125e12),
)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def flops_per_token(model_config, n_params: int, seq_len: float, adapter: bool) -> float:
    layers = int(getattr(model_config, "num_hidden_layers", 0) or 0)
    hidden = int(getattr(model_config, "hidden_size", 0) or 0)
    return (4 if adapter else 6) * n_params + 12 * layers * hidden * seq_len


def mfu(tokens_per_s: float, flops_token: float, peak: float | None) -> float | None:
    return tokens_per_s * flops_token / peak if peak else None


def memory_peak_mib(device: torch.device) -> float | None:
    """Peak memory allocated by torch on a CUDA device since the last reset; None on CPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20
