"""GPU memory estimate for an SFT job from the model directory, method and batch shape.

Rough but conservative (it decides packing and `gpus: auto`; issue #3/#5 refine it):
  weights        bytes of the checkpoint's tensors as stored on disk, re-counted at 2 B/param
                 (bf16 compute) for adapters; full fine-tuning keeps fp32 master weights, grads
                 and AdamW moments: 16 B/param (mixed-precision rule of thumb, ZeRO paper §3)
  activations    ~34·s·b·h bytes per layer without recomputation (Korthikanti et al. 2022, eq. 2)
  adapter states LoRA params (tiny) are covered by a 5 % overhead
  runtime        1 GiB for the CUDA context and allocator slack
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

MIB = 2**20
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


@dataclass(frozen=True)
class Estimate:
    params: int
    memory_per_gpu_mib: int
    gpus: int


def _params(model_dir: Path, cfg: dict) -> int:
    weight_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    if weight_bytes == 0:
        weight_bytes = sum(f.stat().st_size for f in model_dir.glob("*.bin"))
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
    return int(weight_bytes / _DTYPE_BYTES.get(dtype, 4))


def estimate(model_dir: str | Path, method: str, batch_size: int, max_length: int,
             gpus: int | str, usable_mib_per_gpu: float) -> Estimate:
    """Raises ValueError naming the problem if the model directory is unusable."""
    d = Path(model_dir)
    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"model: {d} has no config.json (expected a Hugging Face model directory)")
    cfg = json.loads(cfg_file.read_text())
    params = _params(d, cfg)
    if params == 0:
        raise ValueError(f"model: {d} has no *.safetensors or *.bin weight files")
    hidden = int(cfg.get("hidden_size", 4096))
    layers = int(cfg.get("num_hidden_layers", 32))
    activations = 34 * max_length * batch_size * hidden * layers
    per_param = 16 if method == "full" else 2
    runtime = 1024 * MIB

    def need(n: int) -> float:
        # Full fine-tuning shards states across n GPUs (FSDP); adapters replicate weights (DDP).
        states = params * per_param / (n if method == "full" else 1)
        return (states * 1.05 + activations + runtime) / MIB

    if gpus == "auto":
        n = next((k for k in (1, 2, 4, 8, 16, 32, 64) if need(k) <= usable_mib_per_gpu), None)
        if n is None:
            raise ValueError(
                f"resources.gpus: auto found no GPU count up to 64 whose share of "
                f"{need(64):.0f} MiB fits {usable_mib_per_gpu:.0f} MiB per GPU"
            )
    else:
        n = int(gpus)
    return Estimate(params=params, memory_per_gpu_mib=math.ceil(need(n)), gpus=n)
