"""Checks a submitted spec against the cluster before anything is queued: the team exists, paths
exist, the dataset parses, the estimate fits some GPU, the job could ever fit. Every problem is
collected (not just the first) and reported together, each naming its field."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

from scheduler.estimate import estimate
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


def _file_key(p: Path) -> tuple | None:
    """Identity of a file's content for caching: (path, size, mtime); None if it is missing."""
    try:
        st = p.stat()
    except OSError:
        return None
    return (str(p), st.st_size, st.st_mtime_ns, st.st_ino)


# Dataset checks (records, summary, problems) by file identity and the settings that matter: a
# dataset submitted again (retries, sweeps, the API benchmark) is parsed once, again only when it changes.
_DATASETS: dict[tuple, tuple[int | None, dict | None, tuple[str, ...]]] = {}


def storage_root() -> Path:
    """Where job outputs may be written: SHOAL_STORAGE_ROOT, else SHOAL_HOME (default ~/.shoal)."""
    root = os.environ.get("SHOAL_STORAGE_ROOT") or os.environ.get("SHOAL_HOME") or "~/.shoal"
    return Path(root).expanduser().resolve()


def _check_dataset(field: str, path: str | None, spec: JobSpec, tokenizer,
                   problems: list[str]) -> tuple[int | None, dict | None]:
    """(records, summary) of one dataset path; every bad record goes to `problems` as
    '<field>: <file>:<line>: <problem>'. Without a tokenizer only the records are checked."""
    if path is None:
        return None, None
    from trainer.data import DatasetError, collect_records, prepare  # heavy import only when checking

    p = Path(path)
    if not p.exists():
        problems.append(f"{field}: {path} does not exist (a data file or a folder of them)")
        return None, None
    ds, hp = spec.dataset, spec.hyperparameters
    ident = _file_key(p) if p.is_file() else (str(p), tuple(sorted(map(_file_key, p.rglob("*")), key=str)))
    key = (ident, ds.format, hp.max_length, ds.max_length_policy, spec.model if tokenizer is not None else None)
    if key not in _DATASETS:
        if len(_DATASETS) > 4096:
            _DATASETS.clear()
        if tokenizer is None:
            records, _, found = collect_records(p, ds.format)
            _DATASETS[key] = (len(records), None, ()) if not found else (None, None, tuple(found))
        else:
            try:
                _, _, summary = prepare(p, tokenizer, ds.format, hp.max_length, ds.max_length_policy)
                _DATASETS[key] = (summary["records"], summary, ())
            except DatasetError as e:
                _DATASETS[key] = (None, None, tuple(e.problems))
    count, summary, errs = _DATASETS[key]
    problems.extend(f"{field}: {x}" for x in errs)
    return count, summary


_ESTIMATES: dict[tuple, object] = {}


def _estimate(model: str, *args, **kwargs):
    """`estimate`, cached by the model folder's identity (its config.json and the folder's
    mtime, which changes when weight files come or go) and the other arguments."""
    key = (_file_key(Path(model) / "config.json"), _file_key(Path(model)), *args, *sorted(kwargs.items()))
    if key not in _ESTIMATES:
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
        p = Path(value)
        if ".." in p.parts:
            problems.append(f"{field}: {value!r} may not contain '..'")
            continue
        if not resolved_roots:
            continue
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


def _load_tokenizer(spec: JobSpec, problems: list[str]):
    """The model's tokenizer, for token-level checks (lengths, chat template); None if the
    folder has no tokenizer files (then only the records' fields are checked here)."""
    from trainer.model import TOKENIZER_FILES, load_tokenizer

    if not any((Path(spec.model) / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        return load_tokenizer(spec.model)
    except Exception as e:  # noqa: BLE001 - any failure to load is the user's model dir
        problems.append(f"model: {spec.model}: cannot load its tokenizer ({e})")
        return None


def _file_problems(spec: JobSpec, problems: list[str]) -> Files:
    """Checks that need only the spec's files: the model directory, every dataset record
    (format, fields, length under the spec's policy, with the model's tokenizer), the method
    on this software, the output folder."""
    model = Path(spec.model)
    tokenizer = None
    if not model.is_dir():
        problems.append(f"model: {spec.model} is not a directory (a local Hugging Face model folder)")
    elif not (model / "config.json").is_file():
        problems.append(f"model: {spec.model} has no config.json (expected a Hugging Face model directory)")
    else:
        tokenizer = _load_tokenizer(spec, problems)
    n_train, s_train = _check_dataset("dataset.train", spec.dataset.train, spec, tokenizer, problems)
    n_val, s_val = _check_dataset("dataset.validation", spec.dataset.validation, spec, tokenizer, problems)
    if n_train is not None and spec.dataset.validation is None and n_train < 2:
        problems.append("dataset.train: needs at least 2 records to split off a validation set")
    from trainer.model import check_method_supported

    try:
        check_method_supported(spec.method)
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
    files = _file_problems(spec, problems)
    if problems:
        raise SubmitError(problems)
    return files


def check_submission(spec: JobSpec, config: ClusterConfig, nodes: tuple[NodeView, ...],
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
    if (Path(spec.model) / "config.json").is_file():
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
        cohorts = tuple(Cohort(n, c.parent) for n, c in sorted(config.cohorts.items()))
        if (why := never_fits(req, nodes, quotas, cohorts, PolicySettings(),
                              config.scheduler.memory_headroom_mib)) is not None:
            problems.append(f"resources: can never run here: {why}")
    if problems:
        raise SubmitError(problems)
    assert est is not None
    return Admission(est.gpus, est.memory_per_gpu_mib, files.train_records, files.validation_records)
