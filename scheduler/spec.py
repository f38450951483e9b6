"""Public data model: the job spec users submit and the cluster config admins write.

Every model forbids unknown keys, so a typo (`learning_rte`) is an error naming the field instead
of a silently ignored setting. `load_job_spec` / `load_cluster_config` read YAML and report every
invalid field with its line in the file (see `SpecError`).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# ---------------------------------------------------------------------------------------------
# Job spec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetSpec(_Strict):
    """Data files or folders (JSONL, JSON, Parquet). Validation data comes from `validation` or,
    when that is absent, a seeded `validation_fraction` of `train`."""

    train: str = Field(min_length=1)
    validation: str | None = None
    validation_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)
    format: Literal["auto", "prompt_completion", "chat", "alpaca"] = Field(
        default="auto", description="auto: from the first record's fields")
    max_length_policy: Literal["error", "truncate", "drop"] = Field(
        default="error", description="records longer than hyperparameters.max_length")


class LoraSpec(_Strict):
    r: int = Field(default=8, ge=1, le=1024)
    alpha: int = Field(default=16, ge=1)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class Hyperparameters(_Strict):
    learning_rate: float = Field(default=2e-4, gt=0.0, le=1.0)
    epochs: int = Field(default=1, ge=1, le=1000)
    max_steps: int | None = Field(default=None, ge=1, description="optimizer steps; overrides epochs")
    batch_size: int = Field(default=8, ge=1, le=4096, description="sequences per worker per micro-step")
    grad_accum_steps: int = Field(default=1, ge=1, le=1024)
    max_length: int = Field(default=512, ge=8, le=1_048_576, description="tokens per sequence")
    warmup_steps: int = Field(default=0, ge=0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0)
    max_grad_norm: float = Field(default=1.0, gt=0.0)
    seed: int = Field(default=0, ge=0)
    packing: bool = Field(default=False, description="several examples per sequence, attention kept per example")
    gradient_checkpointing: bool = False


class EvalSpec(_Strict):
    every_steps: int | None = Field(default=None, ge=1, description="validation loss every N steps; always at the end")
    generate_examples: int = Field(default=0, ge=0, description="greedy answers on N validation records at the end")
    max_new_tokens: int = Field(default=32, ge=1, le=4096)
    metric: str | None = Field(default=None, pattern=r"^[^:]+:[A-Za-z_][A-Za-z0-9_]*$",
                               description="'module:function' or 'file.py:function'(predictions, references)")
    early_stopping_patience: int | None = Field(default=None, ge=1, description="evaluations without improvement")
    early_stopping_min_delta: float = Field(default=0.0, ge=0.0)
    restore_best: bool | None = Field(default=None, description="export the weights of the lowest validation "
                                      "loss, not the last step's (default: on with early stopping)")

    @model_validator(mode="after")
    def _needs(self) -> EvalSpec:
        if self.metric is not None and self.generate_examples == 0:
            raise ValueError("metric needs generate_examples > 0 (it scores generated answers)")
        if self.early_stopping_patience is not None and self.every_steps is None:
            raise ValueError("early_stopping_patience needs every_steps (how often to evaluate)")
        if self.restore_best and self.every_steps is None:
            raise ValueError("restore_best needs every_steps (the best of which evaluations?)")
        return self


class ExportSpec(_Strict):
    merge: bool = Field(default=False, description="also write the base model merged with the adapter")


TARGET_METRICS = ("eval_loss", "perplexity", "exact_match", "train_loss")


class Resources(_Strict):
    """`gpus: auto` lets the estimator pick the smallest count whose per-GPU memory need fits."""

    gpus: int | Literal["auto"] = "auto"
    gpu_model: str | None = Field(default=None, description="GPU flavor, e.g. 'H100 80GB'; any if unset")
    cpus_per_gpu: int = Field(default=1, ge=1, le=64)
    shareable: bool = Field(default=False, description="may share a GPU with other shareable jobs")
    memory_gib_per_gpu: float | None = Field(default=None, gt=0, description="overrides the estimator")
    expected_duration_s: float | None = Field(default=None, gt=0, description="expected run time, for backfill")

    @field_validator("gpus")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= 1024:
            raise ValueError("must be between 1 and 1024, or 'auto'")
        return v


class JobSpec(_Strict):
    """One fine-tuning job. Relative paths are resolved against the spec file's folder by the CLI."""

    api_version: Literal["shoal/v1"] = "shoal/v1"
    name: str = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$")
    team: str = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
    user: str | None = Field(default=None, max_length=63)
    priority: int = Field(default=0, ge=-1000, le=1000, description="higher runs first")
    model: str = Field(min_length=1, description="local Hugging Face model directory")
    dataset: DatasetSpec
    method: Literal["lora", "dora", "qlora", "full"] = "lora"
    lora: LoraSpec = LoraSpec()
    hyperparameters: Hyperparameters = Hyperparameters()
    eval: EvalSpec = EvalSpec()
    export: ExportSpec = ExportSpec()
    target: dict[str, float] = Field(default={}, description="metric: value the job should reach (report only)")
    resources: Resources = Resources()
    checkpoint_every_steps: int = Field(default=50, ge=1)
    max_retries: int = Field(default=1, ge=0, le=100, description="relaunches after a failure")
    output: str | None = Field(default=None, description="adapter/model output dir; default under SHOAL_HOME")

    @model_validator(mode="after")
    def _method_fields(self) -> JobSpec:
        if self.method == "full" and "lora" in self.model_fields_set:
            raise ValueError("'lora' settings given but method is 'full'; remove 'lora' or use method: lora")
        if self.method == "full" and self.export.merge:
            raise ValueError("export.merge is for adapters; method 'full' already writes the whole model")
        for name in self.target:  # with eval.metric, any name: the user's function names its results
            if name not in TARGET_METRICS and self.eval.metric is None:
                raise ValueError(f"target: unknown metric {name!r} (known: {', '.join(TARGET_METRICS)}, "
                                 f"or what eval.metric returns)")
            if name == "exact_match" and self.eval.generate_examples == 0:
                raise ValueError("target: exact_match needs eval.generate_examples > 0")
        return self

    def path_fields(self) -> dict[str, str | None]:
        """Every filesystem path in the spec, by field path (used for resolution and checks)."""
        return {
            "model": self.model,
            "dataset.train": self.dataset.train,
            "dataset.validation": self.dataset.validation,
            "output": self.output,
        }

    def with_resolved_paths(self, base: Path) -> JobSpec:
        """Relative paths become absolute against `base` (the spec file's folder)."""

        def res(p: str | None) -> str | None:
            return None if p is None else str((base / Path(p).expanduser()).resolve())

        data = self.model_dump(exclude_unset=True)
        data["model"] = res(self.model)
        data["dataset"] = {**data["dataset"], "train": res(self.dataset.train)}
        if self.dataset.validation is not None:
            data["dataset"]["validation"] = res(self.dataset.validation)
        if self.output is not None:
            data["output"] = res(self.output)
        module, _, func = (self.eval.metric or "").rpartition(":")
        if module.endswith(".py"):
            data["eval"] = {**data["eval"], "metric": f"{res(module)}:{func}"}
        return JobSpec.model_validate(data)


# ---------------------------------------------------------------------------------------------
# Cluster config


class GpuModel(_Strict):
    memory_gib: float = Field(gt=0)
    price_per_hour: float = Field(default=0.0, ge=0, description="USD per GPU-hour")


class TeamConfig(_Strict):
    gpus: int = Field(ge=0, description="nominal GPU quota: GPUs the team is guaranteed")
    gpus_by_model: dict[str, int] = Field(default={}, description="nominal per GPU flavor (optional)")
    cohort: str | None = Field(default=None, description="cohort whose idle quota it may borrow")
    borrowing_limit: int | None = Field(default=None, ge=0, description="GPUs above nominal; None = any")
    lending_limit: int | None = Field(default=None, ge=0, description="idle nominal GPUs lent; None = all")
    weight: float = Field(default=1.0, gt=0, description="fair-share weight")
    budget_usd: float | None = Field(default=None, ge=0, description="$ per budget period; None = none")


class CohortConfig(_Strict):
    parent: str | None = None


class LocalCluster(_Strict):
    """The embedded cluster: this machine's Ray node declares `gpus` logical GPUs backed by a
    FakeGpuReader (`reader: fake`) or by the real GPUs read through NVML (`reader: nvml`)."""

    gpus: int = Field(default=8, ge=0, le=64)
    gpu_model: str = "H100 80GB"
    reader: Literal["fake", "nvml"] = "fake"


class NodeGroup(_Strict):
    """`count` identical nodes (for the simulator and for describing a multi-node cluster)."""

    count: int = Field(ge=1, le=100_000, description="number of identical nodes")
    gpus_per_node: int = Field(ge=1, le=64)
    gpu_model: str = Field(min_length=1, description="a key of gpu_models")
    cpus: int | None = Field(default=None, ge=1, description="CPUs per node offered to jobs; None = not limited")
    name: str | None = Field(default=None, pattern=r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$",
                             description="node name prefix; default: the group's position")


class SchedulerSettings(_Strict):
    interval_s: float = Field(default=0.5, gt=0, le=60)
    forecast_interval_s: float = Field(default=30.0, ge=0, description="how often the estimated starts of the "
                                       "whole queue are recomputed (0 = only the reserved job gets one)")
    memory_headroom_mib: int = Field(default=1024, ge=0)
    stop_grace_s: float = Field(default=60.0, ge=0, description="checkpoint wait when stopping jobs")
    share_max_utilization: float = Field(default=0.8, ge=0, le=1, description="GPU sharing only below this")
    min_runtime_s: float = Field(default=300.0, ge=0, description="no preemption before this runtime")
    preempt_backoff: float = Field(default=2.0, ge=1.0, le=16.0, description="a job restarted k times is not "
                                   "preempted for quota reclaim or LAS before it ran min_runtime_s x this ** k "
                                   "(1 = min_runtime_s always)")
    aging_s: float = Field(default=3600.0, gt=0, description="bounds how long a feasible job waits")
    backfill: bool = True
    preemption: bool = True
    over_budget: Literal["no-borrowing", "none"] = "no-borrowing"
    fair_share_half_life_s: float = Field(default=7 * 86400.0, gt=0, description="usage decay half-life")
    budget_period: Literal["day", "week", "month"] = "month"
    fair_share_band: float = Field(default=1.0, ge=0, description="teams within one band of usage/entitlement "
                                   "rank as equals (then shortest work first); 0 = strict fair share")
    fair_share_history_weight: float = Field(default=0.5, ge=0, le=1, description="weight of decayed usage in "
                                             "the fair share (the rest: GPUs held now)")
    aging_ratio: float = Field(default=16.0, ge=0, description="a job's wait bound is aging_s + this x its "
                               "expected (or attained) run time")
    max_preemptions_per_cycle: int = Field(default=16, ge=0)
    defrag_factor: float = Field(default=2.0, ge=0, description="> 0: running jobs on one node move to free "
                                 "GPUs on other nodes so that a gang waiting for a whole node starts now, when "
                                 "its wait (GPUs x time) is at least this many times their restart cost; 0 = off")
    las_preempt_factor: float = Field(default=0.0, ge=0, description="> 0: a waiting job may preempt a running "
                                      "one that attained this many times more GPU-seconds; 0 = off")
    share_max_duration_s: float = Field(default=7200.0, ge=0, description="a shareable job expected to run "
                                        "longer than this does not join a shared GPU (co-tenants slow each other)")
    share_max_jobs: int = Field(default=2, ge=0, description="at most this many shareable jobs share one GPU "
                                "(co-tenants slow each other: each runs at a fraction of its speed alone); "
                                "0 = no limit but memory and share_max_utilization")
    preempt_grace_s: float = Field(default=3600.0, ge=0, description="a job whose GPUs are expected to free up "
                                   "within this many seconds waits for them instead of preempting (0 = always preempt)")
    makespan_guard: bool = Field(default=True, description="a waiting job longer than the backlog's drain time "
                                 "(it would set the makespan) goes first in its priority level")
    multi_node: bool = Field(default=True, description="a gang too big for any one node runs on the fewest "
                             "nodes (one GPU model, all GPUs at once); a job that fits one node always gets one. "
                             "false: such a job waits (or is rejected) instead")


class ClusterConfig(_Strict):
    gpu_models: dict[str, GpuModel] = {
        "H100 80GB": GpuModel(memory_gib=80, price_per_hour=2.49),
    }
    local: LocalCluster = LocalCluster()
    teams: dict[str, TeamConfig] = {"default": TeamConfig(gpus=8)}
    cohorts: dict[str, CohortConfig] = {}
    scheduler: SchedulerSettings = SchedulerSettings()
    nodes: list[NodeGroup] = Field(default=[], description="node groups (the simulator's cluster)")
    storage_roots: list[str] = Field(default=[], description=(
        "folders job specs may read (model, dataset) and write (output) under; paths are resolved "
        "(symlinks followed) before the check. Empty: no confinement (single-user embedded default)"))

    @model_validator(mode="after")
    def _known_model(self) -> ClusterConfig:
        if self.local.gpu_model not in self.gpu_models:
            raise ValueError(
                f"local.gpu_model {self.local.gpu_model!r} is not in gpu_models "
                f"({', '.join(sorted(self.gpu_models))}); add it there with its memory_gib"
            )
        for i, group in enumerate(self.nodes):
            if group.gpu_model not in self.gpu_models:
                raise ValueError(
                    f"nodes.{i}.gpu_model {group.gpu_model!r} is not in gpu_models "
                    f"({', '.join(sorted(self.gpu_models))}); add it there with its memory_gib"
                )
        names = [g.name for g in self.nodes if g.name]
        if len(names) != len(set(names)):
            raise ValueError(f"nodes: node group names must be unique (got {', '.join(names)})")
        return self


# ---------------------------------------------------------------------------------------------
# Loading YAML with line numbers


class SpecError(ValueError):
    """Invalid spec or config. `problems` lists every invalid field as 'file:line: field: message'."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def _line_index(text: str) -> dict[tuple, int]:
    """Map each key path in a YAML mapping tree to its 1-based line (best effort)."""
    lines: dict[tuple, int] = {}

    def walk(node: Any, path: tuple) -> None:
        lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                child = path + (key.value,)
                lines[child] = key.start_mark.line + 1
                walk(value, child)
                lines[child] = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, path + (i,))

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


_UNION_TAG = re.compile(r"^(literal\[.*\]|function-\w+|int|str|float|bool|none|list\[.*\]|dict\[.*\])$")


def format_validation_error(exc: ValidationError, source: str = "", text: str | None = None) -> list[str]:
    """One line per invalid field: '<source>:<line>: <field.path>: <message>'. A field that
    failed every member of a union (e.g. `gpus: int | 'auto'`) gets one line with all options."""
    index = _line_index(text) if text else {}
    by_field: dict[tuple, list[str]] = {}
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and _UNION_TAG.match(p)))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see the spec reference in README)"
        by_field.setdefault(loc, []).append(msg)
    out = []
    for loc, msgs in by_field.items():
        field = ".".join(str(p) for p in loc) or "(spec)"
        line = next((index[loc[:i]] for i in range(len(loc), -1, -1) if loc[:i] in index), None)
        where = f"{source}:{line}: " if source and line else (f"{source}: " if source else "")
        out.append(f"{where}{field}: {'; or '.join(msgs)}")
    return out


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f"{mark.line + 1}" if mark else "?"
        raise SpecError([f"{source}:{line}: invalid YAML: {getattr(e, 'problem', e)}"]) from None


def _validate(model: type[BaseModel], data: Any, source: str, text: str | None) -> Any:
    if not isinstance(data, dict):
        raise SpecError([f"{source}:1: expected a mapping of fields, got {type(data).__name__}"])
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise SpecError(format_validation_error(e, source, text)) from None


def parse_job_spec(text: str, source: str = "<spec>") -> JobSpec:
    return _validate(JobSpec, _parse_yaml(text, source), source, text)


def load_job_spec(path: str | Path) -> JobSpec:
    """Read a job spec file; relative paths inside it are resolved against its folder."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise SpecError([f"{p}: cannot read: {e.strerror}"]) from None
    return parse_job_spec(text, str(p)).with_resolved_paths(p.resolve().parent)


def load_cluster_config(path: str | Path | None) -> ClusterConfig:
    if path is None:
        return ClusterConfig()
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise SpecError([f"{p}: cannot read: {e.strerror}"]) from None
    return _validate(ClusterConfig, _parse_yaml(text, str(p)) or {}, str(p), text)

