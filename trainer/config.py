"""The job's training configuration, shared by the scheduler and the trainer."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TrainConfig(BaseModel):
    """Everything one training attempt needs; JSON round-trips via
    `model_dump(mode="json")` / `TrainConfig.model_validate(d)`."""

    model_config = ConfigDict(extra="forbid")

    job_id: int
    attempt: int = Field(0, ge=0)
    model_path: str  # local Hugging Face model directory
    train_path: str  # data file or directory (JSONL / JSON / Parquet), see trainer.formats
    val_path: str | None = None
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)  # only when val_path is None
    data_format: Literal["auto", "prompt_completion", "chat", "alpaca"] = "auto"
    max_length_policy: Literal["error", "truncate", "drop"] = "truncate"  # records > max_length
    packing: bool = False  # several examples per row (attention kept per example)
    method: Literal["lora", "dora", "qlora", "full"] = "lora"
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    lora_target_modules: list[str] | Literal["all-linear"] = "all-linear"
    learning_rate: float = Field(2e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(0, ge=0)  # optimizer steps
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)  # optimizer steps; overrides epochs
    batch_size: int = Field(8, ge=1)  # examples per micro-batch per worker
    grad_accum_steps: int = Field(1, ge=1)  # micro-batches per optimizer step
    max_length: int = Field(256, ge=2)  # tokens per example (prompt + completion)
    max_grad_norm: float = Field(1.0, ge=0.0)  # 0 disables clipping
    seed: int = 0
    checkpoint_every_steps: int = Field(50, ge=1)  # optimizer steps
    eval_every_steps: int | None = Field(None, ge=1)  # optimizer steps
    gradient_checkpointing: bool = False
    # generation metrics on up to N validation examples at the end (0: off): exact match
    # of the generated completion, plus `eval_metric` "module:function" or "file.py:function"
    # called as fn(predictions: list[str], references: list[str]) -> float | dict[str, float]
    eval_generate_examples: int = Field(0, ge=0)
    eval_max_new_tokens: int = Field(32, ge=1)
    eval_metric: str | None = None
    early_stopping_patience: int | None = Field(None, ge=1)  # evals without improvement
    early_stopping_min_delta: float = Field(0.0, ge=0.0)  # an improvement is a drop > this
    # export the weights of the best evaluation (lowest validation loss) instead of the last
    # step's, like HF `load_best_model_at_end`. None: on exactly when early stopping is on.
    restore_best: bool | None = None
    # {"eval_loss": max, "perplexity": max, "exact_match": min, "<user metric>": min}
    target: dict[str, float] = Field(default_factory=dict)
    merge: bool = False  # also write the base model merged with the adapter (output/merged)
    price_per_gpu_hour: float | None = Field(None, ge=0.0)  # USD; for the model card's cost
    job_name: str | None = None  # for the model card
    output_dir: str  # final adapter (lora) or model (full) + tokenizer
    # output_dir must lie under this folder (the scheduler's storage root); None: not checked
    storage_root: str | None = None
    gpu_indices: list[int] = Field(default_factory=list)  # one per local worker
    # multi-node gang: Ray node id -> that node's physical GPU indices (one per worker there);
    # empty for a single node (gpu_indices). trainer.ray_worker picks the worker's own.
    gpu_indices_by_node: dict[str, list[int]] = Field(default_factory=dict)
    torch_threads: int | None = Field(None, ge=1)
    scratch_dir: str | None = None  # where checkpoints are staged before Ray persists them (default: system temp)

    @model_validator(mode="after")
    def _check_lora_targets(self) -> "TrainConfig":
        if isinstance(self.lora_target_modules, list) and not self.lora_target_modules:
            raise ValueError("lora_target_modules must not be empty")
        if self.eval_metric is not None and ":" not in self.eval_metric:
            raise ValueError("eval_metric must be 'module:function' or 'file.py:function'")
        if self.restore_best and self.eval_every_steps is None:
            raise ValueError("restore_best needs eval_every_steps (the best of which evaluations?)")
        return self

    @property
    def restores_best(self) -> bool:
        """Whether the exported weights are those of the best evaluation."""
        return self.restore_best if self.restore_best is not None \
            else self.early_stopping_patience is not None

    @property
    def adapter(self) -> bool:
        """True for the peft methods (lora, dora, qlora)."""
        return self.method != "full"
