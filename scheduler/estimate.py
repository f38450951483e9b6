"""GPU memory and step-time estimate for an SFT job from the model's config.json (no weights
needed), the method, LoRA rank/targets, batch shape, gradient checkpointing and precision.

Parameters (decoder-only transformers: Llama, Mistral, Qwen2, ... shapes; exact for these):
  embeddings     V·h
  per layer      attention  h·(H·d) + 2·h·(K·d) + (H·d)·h      (H heads, K key/value heads (GQA), d head_dim)
                            + biases: q/k/v (H·d + 2·K·d) when attention_bias or model_type qwen2
                 MLP        3·h·I (gate, up, down; SwiGLU) (+ 2·I + h with mlp_bias)
                 norms      2·h (RMSNorm weights)
  final norm     h
  lm_head        V·h unless tie_word_embeddings
  Without those keys in config.json the count falls back to the weight files' bytes / dtype size.

Memory per GPU worker (bytes), calibrated against the peaks measured on an H200 (torch 2.11,
transformers 5.23, peft 0.21, bf16 autocast, SDPA) by `benchmarks/memory_estimate.py`: 15 cases over
four model shapes x methods x batch shapes x checkpointing, where the estimate must cover torch's peak
reserved memory + the CUDA context (NVML's figure for the process). Measured cover 1.05-1.34 (the
structural formula used before, 16 B/param and 2·(4h + 2·K·d + 3I) of activations, gave 0.57-0.93:
it under-promised every case, which packing turns into OOMs). Table in docs/policy.md.
  full           20 B/param: fp32 weights 4 + grads 4 + AdamW m and v 8 (Shoal trains fp32 master
                 weights under bf16 autocast), + 4 for what is alive beside them at the peak
                 (AdamW's foreach temporaries at the step, autocast's bf16 weight copies in the
                 forward); sharded over the job's GPUs (FSDP / ZeRO-3, Rajbhandari et al. 2020)
  lora / dora    frozen base at the compute precision (2 B bf16/fp16, 4 B fp32) on every GPU (DDP);
                 adapters r·(d_in + d_out) per targeted linear (DoRA adds d_out magnitudes) trained
                 in fp32 with AdamW: 16 B per adapter param (Hu et al. 2021; Liu et al. 2024)
  qlora          like lora but all decoder linears are stored in 4-bit NF4 with double
                 quantization: 0.5 B + ~0.127 bit/param of constants (Dettmers et al. 2023);
                 embeddings, norms and lm_head at 4 B (peft's prepare_model_for_kbit_training
                 keeps them in fp32)
  activations    per layer per token (bf16; x2 for fp32): 6·h + 5·I + 24·K·d, fitted on three
                 shapes (h 1024/2048, I 2048-5632, MHA and GQA) with fused SDPA attention (no s²
                 term; b x s at equal tokens measured equal); adapters add what PEFT keeps per
                 targeted linear: 3.5 B x its d_in (LoRA), 6 B (QLoRA: fp32 norms and casts
                 around the 4-bit matmuls), and DoRA 4 B x its d_out more (the base and adapter
                 outputs its magnitude scaling keeps). Without the Llama keys: the general 34·h of
                 Korthikanti et al. 2022 (eq. 2, s² term dropped). Gradient checkpointing keeps
                 each layer's input (2h) plus one layer recomputed.
  logits         s·b·V·(2 + 4 + 4 + 1): bf16 logits, fp32 upcast for the loss and its gradient
                 (measured 10.6)
  runtime        1 GiB (CUDA context: 760 MiB measured) + 12 % of the rest: the caching
                 allocator reserved 3-32 % more than its peak allocation

Step time: FLOPs per token ≈ 6·P + 12·L·h·s for full fine-tuning (Kaplan et al. 2020, forward 2P,
backward 4P, attention 12·L·h·s); with adapters the frozen weights need no weight gradients:
4·P; gradient checkpointing re-runs the forward: +2·P. Time = FLOPs / (peak dense bf16 TFLOPS of
the GPU × MFU); MFU defaults to 0.35, a typical fine-tuning utilization. These are estimates for
packing and backfill; a user's `resources.memory_gib_per_gpu` overrides the memory figure.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

MIB = 2**20
GIB = 2**30
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
METHODS = ("full", "lora", "qlora", "dora")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Full fine-tuning: fp32 weights 4 + grads 4 + AdamW m and v 8, plus 4 for what is alive beside
# them at the peak (AdamW's foreach temporaries at the step, or autocast's bf16 weight copies).
FULL_BYTES_PER_PARAM = 20
# The caching allocator reserves more than it hands out: measured 3-32 % over the peak allocated.
ALLOCATOR_SLACK = 0.12
# Peak dense bf16 tensor TFLOPS (vendor data sheets, no sparsity).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}


@dataclass(frozen=True)
class Shape:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool

    @classmethod
    def of(cls, cfg: dict) -> Shape | None:
        """The shape from a config.json, or None when it lacks the keys of a Llama-like model."""
        need = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        if any(k not in cfg for k in need):
            return None
        h, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        bias = bool(cfg.get("attention_bias", False))
        return cls(int(cfg["vocab_size"]), h, int(cfg["num_hidden_layers"]), heads,
                   int(cfg.get("num_key_value_heads") or heads), int(cfg.get("head_dim") or h // heads),
                   int(cfg["intermediate_size"]), bool(cfg.get("tie_word_embeddings", False)),
                   bias or cfg.get("model_type") == "qwen2", bias, bool(cfg.get("mlp_bias", False)))

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each decoder linear."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_linear_params(self) -> int:
        return sum(a * b for a, b in self.linear_dims().values())

    def params(self) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        per_layer = self.layer_linear_params() + 2 * self.hidden
        per_layer += (q + 2 * kv) if self.qkv_bias else 0
        per_layer += self.hidden if self.o_bias else 0
        per_layer += (2 * self.intermediate + self.hidden) if self.mlp_bias else 0
        embed = self.vocab * self.hidden
        return embed + self.layers * per_layer + self.hidden + (0 if self.tied else embed)


@dataclass(frozen=True)
class Estimate:
    params: int
    memory_per_gpu_mib: int
    gpus: int
    trainable_params: int = 0
    breakdown_mib: dict[str, float] = field(default_factory=dict)  # per GPU: states, activations, ...
    flops_per_step: float = 0.0  # per worker (one micro-batch of batch_size x max_length tokens)

    def step_time_s(self, gpu_model: str, mfu: float = 0.35) -> float | None:
        """Seconds per micro-step on `gpu_model` (e.g. 'H100 80GB'), None for an unknown GPU."""
        peak = next((v for k, v in PEAK_TFLOPS.items() if gpu_model.upper().startswith(k)), None)
        return None if peak is None else self.flops_per_step / (peak * 1e12 * mfu)

    def duration_s(self, steps: int, gpu_model: str, mfu: float = 0.35) -> float | None:
        t = self.step_time_s(gpu_model, mfu)
        return None if t is None else steps * t


def _file_params(model_dir: Path, cfg: dict) -> int:
    weight_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    if weight_bytes == 0:
        weight_bytes = sum(f.stat().st_size for f in model_dir.glob("*.bin"))
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
    return int(weight_bytes / _DTYPE_BYTES.get(dtype, 4))


def adapter_params(shape: Shape, r: int, targets: list[str] | str, dora: bool = False) -> int:
    dims = shape.linear_dims()
    names = list(LINEARS) if targets == "all-linear" else [t for t in targets if t in dims]
    per_layer = sum(r * (dims[n][0] + dims[n][1]) + (dims[n][1] if dora else 0) for n in names)
    return shape.layers * per_layer


def estimate(model_dir: str | Path, method: str, batch_size: int, max_length: int,
             gpus: int | str, usable_mib_per_gpu: float, *, lora_r: int = 8,
             lora_targets: list[str] | str = "all-linear", gradient_checkpointing: bool = False,
             precision: str = "bf16") -> Estimate:
    """Raises ValueError naming the problem if the model directory or an argument is unusable."""
    if method not in METHODS:
        raise ValueError(f"method: {method!r} is not one of {', '.join(METHODS)}")
    if precision not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"precision: {precision!r} is not bf16, fp16 or fp32")
    d = Path(model_dir)
    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"model: {d} has no config.json (expected a Hugging Face model directory)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"model: {cfg_file}:{e.lineno}: invalid JSON ({e.msg})") from None
    shape = Shape.of(cfg)
    params = shape.params() if shape else _file_params(d, cfg)
    if params == 0:
        raise ValueError(f"model: {d} has no *.safetensors or *.bin weight files and its config.json lacks "
                         "the shape keys (vocab_size, hidden_size, num_hidden_layers, ...)")
    hidden = shape.hidden if shape else int(cfg.get("hidden_size", 4096))
    layers = shape.layers if shape else int(cfg.get("num_hidden_layers", 32))
    tokens = batch_size * max_length
    act_bytes = 2 if precision != "fp32" else 4

    # Activations kept for backward, per token per layer (bytes; fitted on measured peaks, see
    # the module docstring): the block's own tensors, plus what PEFT keeps per adapted linear.
    if shape:
        kv = shape.kv_heads * shape.head_dim
        per_layer = (6 * shape.hidden + 5 * shape.intermediate + 24 * kv) * act_bytes / 2
        if method != "full":
            dims = shape.linear_dims()
            names = list(LINEARS) if lora_targets == "all-linear" else [t for t in lora_targets if t in dims]
            d_in, d_out = sum(dims[n][0] for n in names), sum(dims[n][1] for n in names)
            per_layer += d_in * (6.0 if method == "qlora" else 3.5) + (4 * d_out if method == "dora" else 0)
    else:
        per_layer = 34 * hidden * act_bytes / 2
    if gradient_checkpointing:
        activations = tokens * (layers * act_bytes * hidden + per_layer)
    else:
        activations = tokens * layers * per_layer
    logits = tokens * (shape.vocab if shape else 32000) * (act_bytes + 4 + 4 + 1)

    trainable = params if method == "full" else (
        adapter_params(shape, lora_r, lora_targets, dora=method == "dora") if shape
        else int(params * 0.005))  # ~0.5 % without the shape
    base_bytes = 4 if precision == "fp32" else 2
    if method == "qlora":
        linear = shape.layers * shape.layer_linear_params() if shape else int(params * 0.9)
        frozen = linear * (0.5 + 0.127 / 8) + (params - linear) * 4  # the rest in fp32 (k-bit prep)
    else:
        frozen = params * base_bytes

    def need(n: int) -> tuple[float, dict[str, float]]:
        states = params * FULL_BYTES_PER_PARAM / n if method == "full" else frozen + trainable * 16
        parts = {"states": states, "activations": activations, "logits": logits}
        parts["runtime"] = GIB + ALLOCATOR_SLACK * sum(parts.values())
        return sum(parts.values()) / MIB, {k: v / MIB for k, v in parts.items()}

    if gpus == "auto":
        n = next((k for k in (1, 2, 4, 8, 16, 32, 64) if need(k)[0] <= usable_mib_per_gpu), None)
        if n is None:
            raise ValueError(
                f"resources.gpus: auto found no GPU count up to 64 whose share of "
                f"{need(64)[0]:.0f} MiB fits {usable_mib_per_gpu:.0f} MiB per GPU"
            )
    else:
        n = int(gpus)
    total, parts = need(n)
    per_token = (6 if method == "full" else 4) * params + (2 * params if gradient_checkpointing else 0)
    attention = 12 * layers * hidden * max_length
    return Estimate(params=params, memory_per_gpu_mib=math.ceil(total), gpus=n, trainable_params=trainable,
                    breakdown_mib=parts, flops_per_step=tokens * (per_token + attention))


def training_positions(summary: dict, *, epochs: int, max_steps: int | None, batch_size: int,
                       grad_accum_steps: int, gpus: int, packing: bool) -> int:
    """Token positions (real + padding) a job pushes through the model, from the data check's
    summary (trainer.data.summarize: examples, tokens, max_tokens, histogram, max_length).

    Packing fills rows with real tokens (padding ~0). Plain padding pads each batch to its longest
    example: the expected maximum of a random batch, from the length histogram at each bucket's
    upper edge (an upper-side estimate). max_steps (optimizer steps) overrides epochs, as in the
    trainer."""
    examples = int(summary.get("examples") or 0)
    if examples == 0:
        return 0
    per_step = batch_size * grad_accum_steps * gpus  # examples (or packed rows) per optimizer step
    if packing:  # rows of ~max_length real tokens (best-fit packing leaves little room)
        if max_steps is not None:
            return int(max_steps * per_step * summary.get("max_length", 0))
        return int(epochs * summary["tokens"])
    per_example = summary["tokens"] / examples
    if batch_size > 1:  # a batch of one is never padded
        per_example = max(per_example, _batch_max(summary, batch_size))
    seen = max_steps * per_step if max_steps is not None else epochs * examples
    return int(seen * per_example)


def _batch_max(summary: dict, batch_size: int) -> float:
    """Expected longest example of a random batch of batch_size: sum over length buckets of the
    bucket's upper edge (capped by max_tokens and max_length) times P(the batch's longest example
    falls in it) = F_k^b - F_(k-1)^b, F the cumulative share of examples up to bucket k."""
    hist = summary.get("histogram") or {}
    total = sum(hist.values())
    cap = min(summary.get("max_tokens") or 0, summary.get("max_length") or 10**9)
    if not total:
        return cap
    expected, below = 0.0, 0.0
    for bucket, n in hist.items():  # "<=32", ..., ">32768", in ascending order
        upto = below + n / total
        edge = min(int(bucket.lstrip("<=>")), cap) if bucket.startswith("<=") else cap
        expected += edge * (upto ** batch_size - below ** batch_size)
        below = upto
    return expected


def data_duration_s(est: Estimate, positions: int, gpus: int, batch_size: int, max_length: int,
                    gpu_model: str, mfu: float = 0.35) -> float | None:
    """Seconds to train `positions` token positions (training_positions) on `gpus` GPUs of
    `gpu_model` at `mfu`; the per-token FLOPs are est's (one micro-batch of batch_size x
    max_length). None for an unknown GPU model."""
    step = est.step_time_s(gpu_model, mfu)
    if step is None:
        return None
    return positions * step / (batch_size * max_length) / max(gpus, 1)
