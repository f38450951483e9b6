"""Checks a submitted spec against the cluster before anything is queued: the team exists, paths
exist, the dataset parses, the estimate fits some GPU, the job could ever fit. Every problem is
collected (not just the first) and reported together, each naming its field."""
from __future__ import annotations

import math
import os
import stat
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from scheduler.estimate import data_duration_s, estimate, training_positions
from scheduler.policy import Cohort, JobRequest, NodeView, PolicySettings, TeamQuota, never_fits
from scheduler.spec import ClusterConfig, JobSpec


class SubmitError(ValueError):
    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass(frozen=True)
class Admission:
    gpus: int
    memory_per_gpu_mib: int
    train_records: int
    validation_records: int | None
    # from the data check's summary: token positions the training pushes through the model
    # (real + padding, all epochs) and the compute time that takes on the cluster's GPU model at
    # the estimator's MFU; None without a tokenizer or for a GPU model of unknown peak
    train_positions: int | None = None
    estimated_duration_s: float | None = None


_LOOK = threading.local()  # .memo: path -> os.stat result (None: missing) during one check;
# .warm_only: raise Cold instead of parsing a file the caches do not hold


class Cold(Exception):
    """`check_submission(..., warm_only=True)` would have to parse a file it has not seen (a
    dataset, a tokenizer, a model config): call it again without warm_only, off the event loop."""


@contextmanager
def _one_look(warm_only: bool = False):
    """Within one check every file is stat'ed once (a submit looks at the model folder, its
    config and tokenizer files and the datasets from several checks: ~20 stats became ~8)."""
    outer, outer_warm = getattr(_LOOK, "memo", None), getattr(_LOOK, "warm_only", False)
    _LOOK.memo = {} if outer is None else outer
    _LOOK.warm_only = warm_only
    try:
        yield
    finally:
        _LOOK.memo, _LOOK.warm_only = outer, outer_warm


def _cold() -> None:
    if getattr(_LOOK, "warm_only", False):
        raise Cold()


def _trainer_model():
    """trainer.model (imports torch and transformers: seconds, once; a cold step)."""
    if "trainer.model" not in sys.modules:
        _cold()
    import trainer.model

    return trainer.model


def _stat(path: str) -> os.stat_result | None:
    memo = getattr(_LOOK, "memo", None)
    if memo is not None and path in memo:
        return memo[path]
    try:
        st = os.stat(path)
    except OSError:
        st = None
    if memo is not None:
        memo[path] = st
    return st


def _is_file(path: str) -> bool:
    st = _stat(path)
    return st is not None and stat.S_ISREG(st.st_mode)


def _is_dir(path: str) -> bool:
    st = _stat(path)
    return st is not None and stat.S_ISDIR(st.st_mode)


def _file_key(p: Path | str) -> tuple | None:
    """Identity of a file's content for caching: (path, size, mtime, inode); None if it is missing."""
    path = str(p)
    st = _stat(path)
    return None if st is None else (path, st.st_size, st.st_mtime_ns, st.st_ino)


# Dataset checks (records, summary, problems) by file identity and the settings that matter: a
# dataset submitted again (retries, sweeps, the API benchmark) is parsed once, again only when it changes.
_DATASETS: dict[tuple, tuple[int | None, dict | None, tuple[str, ...]]] = {}


def storage_root() -> Path:
    """Where job outputs may be written: SHOAL_STORAGE_ROOT, else SHOAL_HOME (default ~/.shoal)."""
    root = os.environ.get("SHOAL_STORAGE_ROOT") or os.environ.get("SHOAL_HOME") or "~/.shoal"
    return Path(root).expanduser().resolve()


_PARSE_LOCK = threading.Lock()


def _parse_dataset(p: Path, fmt, max_length: int, policy, tokenizer) -> tuple[int | None, dict | None, tuple[str, ...]]:
    from trainer.data import DatasetError, collect_records, prepare  # heavy import only when checking

    if tokenizer is None:
        records, _, found = collect_records(p, fmt)
        return (len(records), None, ()) if not found else (None, None, tuple(found))
    try:
        _, _, summary = prepare(p, tokenizer, fmt, max_length, policy)
        return summary["records"], summary, ()
    except DatasetError as e:
        return None, None, tuple(e.problems)


def _check_dataset(field: str, path: str | None, spec: JobSpec, tokenizer,
                   problems: list[str]) -> tuple[int | None, dict | None]:
    """(records, summary) of one dataset path; every bad record goes to `problems` as
    '<field>: <file>:<line>: <problem>'. Without a tokenizer only the records are checked."""
    if path is None:
        return None, None
    if _stat(path) is None:
        problems.append(f"{field}: {path} does not exist (a data file or a folder of them)")
        return None, None
    ds, hp = spec.dataset, spec.hyperparameters
    ident = _file_key(path) if _is_file(path) else (path, tuple(sorted(map(_file_key, Path(path).rglob("*")), key=str)))
    key = (ident, ds.format, hp.max_length, ds.max_length_policy,
           _tokenizer_ident(spec) if tokenizer is not None else None)
    if key not in _DATASETS:
        _cold()
        with _PARSE_LOCK:  # one parse at a time: the cached tokenizer is shared between threads
            if key not in _DATASETS:
                if len(_DATASETS) > 4096:
                    _DATASETS.clear()
                _DATASETS[key] = _parse_dataset(Path(path), ds.format, hp.max_length, ds.max_length_policy, tokenizer)
    count, summary, errs = _DATASETS[key]
    problems.extend(f"{field}: {x}" for x in errs)
    return count, summary


_ESTIMATES: dict[tuple, object] = {}


def _estimate(model: str, *args, **kwargs):
    """`estimate`, cached by the model folder's identity (its config.json and the folder's
    mtime, which changes when weight files come or go) and the other arguments."""
    key = (_file_key(os.path.join(model, "config.json")), _file_key(model), *args, *sorted(kwargs.items()))
    if key not in _ESTIMATES:
        _cold()
        if len(_ESTIMATES) > 4096:
            _ESTIMATES.clear()
        _ESTIMATES[key] = estimate(model, *args, **kwargs)  # a ValueError is not cached
    return _ESTIMATES[key]


def check_paths(spec: JobSpec, roots: list[str]) -> list[str]:
    """The sandbox: every path of the spec must be absolute, free of '..', and (when `roots` are
    configured) inside one of them after resolving symlinks, so a link cannot lead outside."""
    problems = []
    resolved_roots = [Path(r).expanduser().resolve() for r in roots]
    for field, value in spec.path_fields().items():
        if value is None:
            continue
        if ".." in value.split("/"):  # the components Path(value).parts has, without building it
            problems.append(f"{field}: {value!r} may not contain '..'")
            continue
        if not resolved_roots:
            continue
        p = Path(value)
        real = p.resolve()
        if not any(real.is_relative_to(r) for r in resolved_roots):
            via = f" (it resolves to {real})" if real != p else ""
            problems.append(f"{field}: {value!r} is outside the storage roots{via}; allowed: "
                            f"{', '.join(map(str, resolved_roots))}")
    return problems


@dataclass(frozen=True)
class Files:
    train_records: int
    validation_records: int | None
    train_summary: dict | None = None  # records, tokens, length histogram (trainer.data.summarize)
    validation_summary: dict | None = None


_TOKENIZERS: dict[tuple, tuple[object | None, str | None]] = {}


def _tokenizer_ident(spec: JobSpec) -> tuple | None:
    """Identity of the model folder's tokenizer files (path, size, mtime, inode of each); None
    when it has none."""
    memo = getattr(_LOOK, "memo", None)
    if memo is not None and ("tokenizer", spec.model) in memo:  # asked up to 3 times per check
        return memo[("tokenizer", spec.model)]
    keys = tuple(_file_key(f"{spec.model}/{f}") for f in _trainer_model().TOKENIZER_FILES)
    ident = (spec.model, keys) if any(k is not None for k in keys) else None
    if memo is not None:
        memo[("tokenizer", spec.model)] = ident
    return ident


def _load_tokenizer(spec: JobSpec, problems: list[str]):
    """The model's tokenizer, for token-level checks (lengths, chat template); None if the
    folder has no tokenizer files (then only the records' fields are checked here). Loaded once
    per tokenizer files' identity: loading one costs milliseconds, far more than a submit."""
    ident = _tokenizer_ident(spec)
    if ident is None:
        return None
    if ident not in _TOKENIZERS:
        _cold()
        if len(_TOKENIZERS) > 16:
            _TOKENIZERS.clear()
        try:
            _TOKENIZERS[ident] = (_trainer_model().load_tokenizer(spec.model), None)
        except Exception as e:  # noqa: BLE001 - any failure to load is the user's model dir
            _TOKENIZERS[ident] = (None, f"model: {spec.model}: cannot load its tokenizer ({e})")
    tokenizer, problem = _TOKENIZERS[ident]
    if problem:
        problems.append(problem)
    return tokenizer


def _file_problems(spec: JobSpec, problems: list[str]) -> Files:
    """Checks that need only the spec's files: the model directory, every dataset record
    (format, fields, length under the spec's policy, with the model's tokenizer), the method
    on this software, the output folder."""
    tokenizer = None
    if not _is_dir(spec.model):
        problems.append(f"model: {spec.model} is not a directory (a local Hugging Face model folder)")
    elif not _is_file(os.path.join(spec.model, "config.json")):
        problems.append(f"model: {spec.model} has no config.json (expected a Hugging Face model directory)")
    else:
        tokenizer = _load_tokenizer(spec, problems)
    n_train, s_train = _check_dataset("dataset.train", spec.dataset.train, spec, tokenizer, problems)
    n_val, s_val = _check_dataset("dataset.validation", spec.dataset.validation, spec, tokenizer, problems)
    if n_train is not None and spec.dataset.validation is None and n_train < 2:
        problems.append("dataset.train: needs at least 2 records to split off a validation set")
    try:
        _trainer_model().check_method_supported(spec.method)
    except ValueError as e:
        problems.append(str(e))
    if spec.output is not None:
        root = storage_root()
        if not Path(spec.output).expanduser().resolve().is_relative_to(root):
            problems.append(f"output: {spec.output} is outside the storage root {root} (SHOAL_STORAGE_ROOT, "
                            f"else SHOAL_HOME); choose a folder under it, or leave output unset for "
                            f"<SHOAL_HOME>/jobs/<id>/output")
    return Files(n_train or 0, n_val, s_train, s_val)


def check_files(spec: JobSpec) -> Files:
    """`shoal validate`: the file checks alone, on the user's machine."""
    problems: list[str] = []
    with _one_look():
        files = _file_problems(spec, problems)
    if problems:
        raise SubmitError(problems)
    return files


def check_submission(spec: JobSpec, config: ClusterConfig, nodes: tuple[NodeView, ...],
                     quotas: tuple[TeamQuota, ...], *, warm_only: bool = False) -> Admission:
    """Every check of a submission (SubmitError lists the problems). `warm_only`: raise Cold
    rather than parse a dataset, tokenizer or model config not seen before (the API's event
    loop checks warm specs itself and hands cold ones to a worker thread)."""
    with _one_look(warm_only):
        return _check_submission(spec, config, nodes, quotas)


# never_fits answers by (the exact nodes, quotas and cohorts objects, the request's shape). The API
# hands the same context objects for a second, so a burst of similar submits asks the policy
# once; the entry keeps its objects alive, so their ids cannot be reused while it is cached.
_COHORTS: dict[int, tuple[object, tuple[Cohort, ...]]] = {}


def _cohorts(config: ClusterConfig) -> tuple[Cohort, ...]:
    """The config's cohorts as the policy's tuple, the same object for the same config object."""
    hit = _COHORTS.get(id(config))
    if hit is None or hit[0] is not config:
        if len(_COHORTS) > 64:
            _COHORTS.clear()
        hit = _COHORTS[id(config)] = (config, tuple(Cohort(n, c.parent) for n, c in sorted(config.cohorts.items())))
    return hit[1]


_NEVER_FITS: dict[tuple, tuple[object, object, object, str | None]] = {}


def _never_fits(req: JobRequest, nodes, quotas, cohorts, headroom_mib: int, multi_node: bool = False) -> str | None:
    key = (id(nodes), id(quotas), id(cohorts), headroom_mib, multi_node, req.team, req.priority, req.gpus,
           req.memory_per_gpu_mib, req.gpu_model, req.cpus_per_gpu, req.shareable)
    hit = _NEVER_FITS.get(key)
    if hit is not None and hit[0] is nodes and hit[1] is quotas and hit[2] is cohorts:
        return hit[3]
    why = never_fits(req, nodes, quotas, cohorts, PolicySettings(multi_node=multi_node), headroom_mib)
    if len(_NEVER_FITS) > 256:
        _NEVER_FITS.clear()
    _NEVER_FITS[key] = (nodes, quotas, cohorts, why)
    return why


def _check_submission(spec: JobSpec, config: ClusterConfig, nodes: tuple[NodeView, ...],
                      quotas: tuple[TeamQuota, ...]) -> Admission:
    problems: list[str] = check_paths(spec, config.storage_roots)
    if problems:  # never open a file outside the sandbox, not even to check it
        raise SubmitError(problems)
    files = _file_problems(spec, problems)
    if spec.team not in config.teams:
        problems.append(f"team: {spec.team!r} is not a team of this cluster "
                        f"(known: {', '.join(sorted(config.teams))})")
    flavor = spec.resources.gpu_model
    if flavor is not None and flavor not in config.gpu_models:
        problems.append(f"resources.gpu_model: {flavor!r} is not a GPU model of this cluster "
                        f"(known: {', '.join(sorted(config.gpu_models))})")
    models = [config.gpu_models[flavor]] if flavor in config.gpu_models else list(config.gpu_models.values())
    usable = max(m.memory_gib for m in models) * 1024 - config.scheduler.memory_headroom_mib
    est = None
    if _is_file(os.path.join(spec.model, "config.json")):
        try:
            hp = spec.hyperparameters
            est = _estimate(spec.model, spec.method, hp.batch_size, hp.max_length, spec.resources.gpus, usable,
                            lora_r=spec.lora.r, lora_targets=tuple(spec.lora.target_modules)
                            if isinstance(spec.lora.target_modules, list) else spec.lora.target_modules)
        except ValueError as e:
            problems.append(str(e))
    if est is not None and spec.resources.memory_gib_per_gpu is not None:  # the user's figure wins
        est = replace(est, memory_per_gpu_mib=math.ceil(spec.resources.memory_gib_per_gpu * 1024))
    if est is not None and spec.team in config.teams:
        req = JobRequest(0, spec.team, spec.priority, 0.0, est.gpus, est.memory_per_gpu_mib, flavor,
                         spec.resources.cpus_per_gpu, shareable=spec.resources.shareable)
        if (why := _never_fits(req, nodes, quotas, _cohorts(config),
                               config.scheduler.memory_headroom_mib, config.scheduler.multi_node)) is not None:
            problems.append(f"resources: can never run here: {why}")
    if problems:
        raise SubmitError(problems)
    assert est is not None
    positions = duration = None
    if files.train_summary:
        hp = spec.hyperparameters
        positions = training_positions(files.train_summary, epochs=hp.epochs, max_steps=hp.max_steps,
                                       batch_size=hp.batch_size, grad_accum_steps=hp.grad_accum_steps,
                                       gpus=est.gpus, packing=hp.packing)
        gpu_model = flavor if flavor in config.gpu_models else next(iter(sorted(config.gpu_models)), None)
        if gpu_model is not None:
            duration = data_duration_s(est, positions, est.gpus, hp.batch_size, hp.max_length, gpu_model)
    return Admission(est.gpus, est.memory_per_gpu_mib, files.train_records, files.validation_records,
                     positions, duration)
