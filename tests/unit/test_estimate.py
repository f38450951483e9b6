"""The estimator on published model shapes (config.json written out; no weights needed)."""
import json
from pathlib import Path

import pytest

from scheduler.estimate import Shape, adapter_params, estimate

LLAMA3_8B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
             "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16"}
QWEN25_05B = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "num_hidden_layers": 24,
              "num_attention_heads": 14, "num_key_value_heads": 2, "intermediate_size": 4864,
              "tie_word_embeddings": True, "torch_dtype": "bfloat16"}
MISTRAL_7B = {"model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
H100 = 80 * 1024 - 1024


def model(tmp_path: Path, cfg: dict, name: str) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("cfg,published", [
    (LLAMA3_8B, 8_030_261_248),  # meta-llama/Meta-Llama-3-8B
    (QWEN25_05B, 494_032_768),  # Qwen/Qwen2.5-0.5B (tied embeddings, q/k/v biases)
    (MISTRAL_7B, 7_241_732_096),  # mistralai/Mistral-7B-v0.1
])
def test_parameter_counts_match_published_exactly(tmp_path, cfg, published):
    assert Shape.of(cfg).params() == published
    assert estimate(model(tmp_path, cfg, "m"), "lora", 1, 128, 1, H100).params == published


def test_parameter_count_of_the_tiny_model_matches_its_weights():
    tiny = Path(__file__).resolve().parents[2] / "examples/models/tiny-llama"
    from safetensors import safe_open
    with safe_open(str(tiny / "model.safetensors"), "np") as f:
        actual = sum(int(__import__("math").prod(f.get_slice(k).get_shape())) for k in f.keys())
    assert estimate(tiny, "lora", 1, 8, 1, H100).params == actual


def test_lora_adapter_count():
    s = Shape.of(LLAMA3_8B)
    # r=8 on all linears of Llama-3-8B: 32 layers x 8 x (q 8192 + k 5120 + v 5120 + o 8192 + 3 x 18432)
    assert adapter_params(s, 8, "all-linear") == 32 * 8 * (8192 + 5120 + 5120 + 8192 + 3 * 18432) == 20_971_520
    assert adapter_params(s, 16, ["q_proj", "v_proj"]) == 32 * 16 * (8192 + 5120) == 6_815_744
    assert adapter_params(s, 8, ["q_proj"], dora=True) == 32 * (8 * 8192 + 4096)


def test_memory_orders_methods_and_options(tmp_path):
    d = model(tmp_path, LLAMA3_8B, "llama")
    full = estimate(d, "full", 4, 2048, 8, H100)
    lora = estimate(d, "lora", 4, 2048, 1, H100)
    # where the weights dominate (1 x 512 tokens): 4-bit linears < bf16 base < bf16 base + DoRA
    small = {m: estimate(d, m, 1, 512, 1, H100).memory_per_gpu_mib for m in ("qlora", "lora", "dora")}
    assert small["qlora"] < small["lora"] < small["dora"]
    # per token QLoRA keeps more than LoRA (fp32 norms and residual stream after k-bit prep: measured)
    assert estimate(d, "qlora", 4, 2048, 1, H100).breakdown_mib["activations"] > lora.breakdown_mib["activations"]
    # full: 20 B x 8.03e9 / 8 GPUs = 18.7 GiB of states per GPU
    assert full.breakdown_mib["states"] == pytest.approx(8_030_261_248 * 20 / 8 / 2**20)
    # lora: the bf16 base (~15 GiB) dominates the states: 8.03e9 x 2 B + 21M adapters x 16 B
    assert lora.breakdown_mib["states"] == pytest.approx((8_030_261_248 * 2 + 20_971_520 * 16) / 2**20)
    qlora = estimate(d, "qlora", 1, 512, 1, H100)
    assert qlora.breakdown_mib["states"] < 8_000  # 7.0e9 linears x ~0.52 B + 1.05e9 others x 4 B + adapters
    # the allocator's slack: 12 % of the rest, on top of the 1 GiB context
    rest = sum(v for k, v in lora.breakdown_mib.items() if k != "runtime")
    assert lora.breakdown_mib["runtime"] == pytest.approx(1024 + 0.12 * rest)
    ckpt = estimate(d, "lora", 4, 2048, 1, H100, gradient_checkpointing=True)
    assert ckpt.breakdown_mib["activations"] < lora.breakdown_mib["activations"] / 10
    assert ckpt.flops_per_step > lora.flops_per_step  # recomputation costs time
    # batch x length scales activations linearly
    half = estimate(d, "lora", 2, 2048, 1, H100)
    assert half.breakdown_mib["activations"] == pytest.approx(lora.breakdown_mib["activations"] / 2)
    assert estimate(d, "lora", 4, 2048, 1, H100, lora_r=64).trainable_params == 8 * lora.trainable_params


def test_gpus_auto_and_step_time(tmp_path):
    d = model(tmp_path, LLAMA3_8B, "llama")
    # 20 B x 8.03e9 = 161 GB of states: 77 GB per GPU on 2 leaves no room for the rest on 80 GB
    assert estimate(d, "full", 1, 1024, "auto", H100).gpus == 4
    assert estimate(d, "full", 1, 1024, "auto", 40 * 1024 - 1024).gpus == 8  # on 40 GB GPUs
    # QLoRA 8B fits an L4 with gradient checkpointing (without: 23.1 GiB of 23)
    assert estimate(d, "qlora", 1, 1024, "auto", 23 * 1024, gradient_checkpointing=True).gpus == 1
    e = estimate(d, "lora", 4, 2048, 1, H100)
    # 8192 tokens x (4 x 8.03e9 + 12 x 32 x 4096 x 2048) / (989 TFLOPS x 0.35) = 0.836 s
    assert e.step_time_s("H100 80GB") == pytest.approx(0.836, rel=0.01)
    assert e.step_time_s("L4 24GB") > 8 * e.step_time_s("H100 80GB")
    assert e.step_time_s("TPU") is None
    assert e.duration_s(100, "H100 80GB") == pytest.approx(100 * e.step_time_s("H100 80GB"))


def test_bad_inputs_name_the_field(tmp_path):
    d = model(tmp_path, LLAMA3_8B, "llama")
    with pytest.raises(ValueError, match="method: 'prefix'"):
        estimate(d, "prefix", 1, 8, 1, H100)
    with pytest.raises(ValueError, match="precision"):
        estimate(d, "lora", 1, 8, 1, H100, precision="int3")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"config.json:1: invalid JSON"):
        estimate(tmp_path / "bad", "lora", 1, 8, 1, H100)
