"""The training job as one structured config: a dataclass tree that OmegaConf checks key by key.

A run is described by a YAML file plus dotlist overrides (`train.lr=3e-4 parallel.sp=2`). A file
may compose others with a top-level `include:` list, merged in order before the file's own keys:

    include:
      - model: ../model/tiny.yaml     # merged under the key `model`
      - ../zero/zero2.yaml            # merged at the top level

Paths are relative to the including file; included files may include others. Unknown keys and
wrongly typed values fail inside the merge naming the key; value checks types cannot express live
in `validate()` and raise `ConfigError` naming the key and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from model.config import ConfigError, LMConfig
from train.job.cli import warn

if TYPE_CHECKING:  # parallel.groups imports torch, which `python -m train --help` does not wait for
    from parallel.groups import ParallelDims

SCHEDULES = ("cosine", "wsd", "constant")
PRECISIONS = ("auto", "bf16", "fp32")
RESUME_MODES = ("none", "auto")
COMPILE_SETTINGS = ("auto", "true", "false")
CHECKPOINT_POLICIES = ("full", "selective")  # train.activation_checkpointing_policy


def _require(condition: bool, key: str, value: object, why: str) -> None:
    if not condition:
        raise ConfigError(f"{key}={value!r} {why}")


@dataclass
class DataConfig:
    """Where the MDS shards live and how they are read (see train/data/prepare.py for writing them)."""

    path: str = "data/stdlib"  # folder or remote URI holding `<train_split>/` and `<val_split>/`
    train_split: str = "train"
    val_split: str = "val"
    cache_dir: Optional[str] = None  # local cache for a remote `path`; unused for local folders
    seq_len: int = 512  # must equal the seq_len the shards were packed with (manifest.json)
    shuffle: bool = True
    shuffle_seed: int = 1234
    num_workers: int = 0  # loader worker processes per rank; resume is exact for a fixed value
    reset_at_doc_boundaries: bool = False  # packed documents start from the initial fast weights, attend within themselves


@dataclass
class TrainConfig:
    """Optimisation: steps, batch, AdamW, schedule, precision, resume."""

    steps: int = 200  # optimizer steps of the whole run (the schedule's horizon)
    micro_batch_size: int = 8  # sequences per rank per forward
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant (after warmup)
    warmup_steps: int = 20
    decay_fraction: float = 0.2  # wsd: the last fraction of `steps` decays linearly
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global gradient-norm clip; 0 turns it off
    precision: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    activation_checkpointing: bool = False  # recompute each block in the backward pass
    activation_checkpointing_policy: str = "full"  # full: the whole block; selective: keep GEMM outputs
    compile: str = "auto"  # torch.compile each block: auto (on CUDA, off on CPU) | true | false
    # Compiled blocks: the share of their activations the compiler may keep for backward (torch's
    # min-cut partitioner); below 1 it recomputes the cheapest ones (elementwise glue first) until the
    # rest fits. 1: what the default partitioner keeps.
    activation_memory_budget: float = 1.0
    # Inductor options for the compiled blocks, e.g. {cpp_wrapper: true} (kernels launched from generated
    # C++, less host time a kernel) or {triton.cudagraphs: true}: process-wide, read when a block first
    # compiles. Empty: Inductor's defaults.
    compile_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    resume: str = "none"  # none | auto (newest complete checkpoint) | a checkpoint folder
    max_nonfinite_steps: int = 5  # consecutive skipped (non-finite) steps before the run stops


def flat_compile_options(options: Any, prefix: str = "") -> dict[str, Any]:
    """`train.compile_options` as {dotted name: value}: a sub-config's options may be written nested
    (`triton: {cudagraphs: true}`, which is also what the override `train.compile_options.triton.cudagraphs=true`
    becomes) or dotted (`triton.cudagraphs: true`); torch._inductor.config takes the dotted names."""
    flat: dict[str, Any] = {}
    for key, value in dict(options).items():
        name = f"{prefix}{key}"
        if isinstance(value, (dict, DictConfig)):
            flat.update(flat_compile_options(value, f"{name}."))
        else:
            flat[name] = value
    return flat


@dataclass
class ParallelConfig:
    """The process layout: the sequence-parallel degree (data parallelism takes the rest)."""

    sp: int = 1  # sequence-parallel degree: ranks sharing one sequence
    dp: Optional[int] = None  # derived: world / sp, recorded from the launched layout (set it only to assert that)


@dataclass
class ZeroConfig:
    """DeepSpeed ZeRO: what is sharded over the ranks, and the communication buckets."""

    stage: int = 2
    # Gradient reduction overlapped with the backward. None (auto): on with more than one rank, off on one,
    # where there is nothing to overlap and DeepSpeed's ZeRO-2 still synchronises the device after every
    # micro-batch (its gradient-partition epilogue): 231.0k against 219.5k tok/s for the engine alone at
    # 125M/16K on an H100 (docs/bench/trainer_125m_16k_compiled.md).
    overlap_comm: Optional[bool] = None
    bucket_size: int = 200_000_000  # elements per gradient reduce / parameter all-gather bucket
    offload_optimizer: bool = False  # keep optimizer states in CPU memory (GPU runs only)


@dataclass
class LoggingConfig:
    """Where the run writes (config, metrics, TensorBoard) and how often it reports."""

    run_dir: str = "runs/tiny_cpu"  # resolved config, TensorBoard events and checkpoints go here
    log_every: int = 10  # steps between progress lines and TensorBoard scalars
    tensorboard: bool = True
    peak_tflops: Optional[float] = None  # per-device peak for MFU; None: detect on CUDA, skip on CPU
    profile_step: int = 0  # this step runs under torch.profiler (<run_dir>/profile/, train/step_profile.py); 0: none


@dataclass
class CheckpointConfig:
    """Where and how often checkpoints are written, and how many are kept."""

    dir: Optional[str] = None  # default: <logging.run_dir>/checkpoints
    every: int = 100  # steps between checkpoints (also one at the end and on SIGTERM/SIGINT)
    keep_last: int = 3


@dataclass
class EvalConfig:
    """Perplexity by position on the held-out split (`data.val_split`) while training."""

    every: int = 0  # steps between evaluations (also one at the last step); 0 turns it off
    batches: int = 2  # micro-batches of `train.micro_batch_size` sequences per data-parallel rank
    bucket_size: int = 1024  # positions per perplexity bucket


@dataclass
class DebugConfig:
    """Fault injection for the tests of the failure paths; empty in real runs."""

    nonfinite_loss_steps: list[int] = field(default_factory=list)  # steps whose loss becomes NaN
    signal_at_step: Optional[int] = None  # send SIGTERM to every rank after this step


@dataclass
class RunConfig:
    model: LMConfig = field(default_factory=LMConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.logging.run_dir) / "checkpoints"

    def validate(self) -> "RunConfig":
        self.model.validate()
        t = self.train
        _require(self.data.seq_len >= 1, "data.seq_len", self.data.seq_len, "must be >= 1")
        _require(self.data.num_workers >= 0, "data.num_workers", self.data.num_workers, "must be >= 0")
        _require(t.steps >= 1, "train.steps", t.steps, "must be >= 1")
        _require(t.micro_batch_size >= 1, "train.micro_batch_size", t.micro_batch_size, "must be >= 1")
        _require(t.grad_accum >= 1, "train.grad_accum", t.grad_accum, "must be >= 1")
        _require(t.lr > 0, "train.lr", t.lr, "must be > 0")
        _require(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", t.min_lr_ratio, "must be in [0, 1]")
        _require(t.schedule in SCHEDULES, "train.schedule", t.schedule, f"must be one of {SCHEDULES}")
        _require(t.activation_checkpointing_policy in CHECKPOINT_POLICIES, "train.activation_checkpointing_policy",
                 t.activation_checkpointing_policy, f"must be one of {CHECKPOINT_POLICIES}")
        _require(t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, "must be >= 0")
        if t.warmup_steps > t.steps:
            warn(f"train.warmup_steps={t.warmup_steps} is more than train.steps={t.steps}; warming up over all {t.steps} steps")
            t.warmup_steps = t.steps
        _require(0 < t.decay_fraction <= 1, "train.decay_fraction", t.decay_fraction, "must be in (0, 1]")
        _require(t.grad_clip >= 0, "train.grad_clip", t.grad_clip, "must be >= 0 (0 turns clipping off)")
        _require(t.precision in PRECISIONS, "train.precision", t.precision, f"must be one of {PRECISIONS}")
        _require(0 < t.activation_memory_budget <= 1, "train.activation_memory_budget", t.activation_memory_budget,
                 "must be in (0, 1] (1: keep what the compiler keeps by default)")
        _require(t.compile.lower() in COMPILE_SETTINGS, "train.compile", t.compile, f"must be one of {COMPILE_SETTINGS}")
        import torch._inductor.config as inductor_config

        for name, value in flat_compile_options(t.compile_options).items():
            _require(hasattr(inductor_config, name), f"train.compile_options.{name}", value,
                     "is not an Inductor option (a name in torch._inductor.config, e.g. cpp_wrapper)")
        _require(
            t.resume in RESUME_MODES or Path(t.resume).is_dir(),
            "train.resume",
            t.resume,
            f"must be one of {RESUME_MODES} or an existing checkpoint folder",
        )
        _require(t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", t.max_nonfinite_steps, "must be >= 1")
        _require(self.parallel.sp >= 1, "parallel.sp", self.parallel.sp, "must be >= 1")
        _require(
            not (self.data.reset_at_doc_boundaries and self.parallel.sp > 1),
            "data.reset_at_doc_boundaries",
            self.data.reset_at_doc_boundaries,
            f"is not supported with parallel.sp={self.parallel.sp} (the state exchange carries one sequence "
            f"across ranks); use parallel.sp=1 or leave the resets off",
        )
        _require(self.zero.stage in (1, 2, 3), "zero.stage", self.zero.stage, "must be 1, 2 or 3")
        _require(self.zero.bucket_size >= 1, "zero.bucket_size", self.zero.bucket_size, "must be >= 1")
        _require(self.logging.log_every >= 1, "logging.log_every", self.logging.log_every, "must be >= 1")
        _require(self.logging.profile_step >= 0, "logging.profile_step", self.logging.profile_step, "must be >= 0 (0: no profile)")
        if self.logging.peak_tflops is not None:
            _require(self.logging.peak_tflops > 0, "logging.peak_tflops", self.logging.peak_tflops, "must be > 0")
        _require(self.checkpoint.every >= 1, "checkpoint.every", self.checkpoint.every, "must be >= 1")
        _require(self.eval.every >= 0, "eval.every", self.eval.every, "must be >= 0 (0 turns evaluation off)")
        _require(self.eval.batches >= 1, "eval.batches", self.eval.batches, "must be >= 1")
        _require(self.eval.bucket_size >= 1, "eval.bucket_size", self.eval.bucket_size, "must be >= 1")
        _require(self.checkpoint.keep_last >= 1, "checkpoint.keep_last", self.checkpoint.keep_last, "must be >= 1")
        return self

    def resolve_layout(self, dims: ParallelDims) -> "RunConfig":
        """Check the config against the launched layout and record its `parallel.dp` (the resolved config
        shows it); a user-given value must agree with it.

        Run after `ParallelDims` has checked that `parallel.sp` divides the number of processes, so that
        this is the first complaint about an sp that fits neither.
        """
        _require(
            self.data.seq_len % dims.sp == 0, "parallel.sp", dims.sp, f"must divide data.seq_len={self.data.seq_len}"
        )
        if self.parallel.dp is not None:
            _require(
                self.parallel.dp == dims.dp, "parallel.dp", self.parallel.dp,
                f"must equal world/sp = {dims.world}/{dims.sp} = {dims.dp} (or be left unset)",
            )  # fmt: skip
        self.parallel.dp = dims.dp
        return self


def _load_with_includes(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """One YAML file with its `include:` entries merged underneath it (recursively)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"include cycle: {' -> '.join(str(p) for p in (*seen, path))}")
    if not path.is_file():
        raise ConfigError(f"config file {path} not found (check the path or the `include:` entry naming it)")
    try:
        node = OmegaConf.load(path)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path} is not valid YAML{where}: {getattr(error, 'problem', None) or error}; fix that line") from error
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path} must hold a mapping of config keys, not a list")
    includes = node.pop("include", ListConfig([]))
    merged = OmegaConf.create({})
    for entry in includes:
        merged = OmegaConf.merge(merged, _load_include(entry, path, (*seen, path)))
    return OmegaConf.merge(merged, node)


def _load_include(entry: Any, parent: Path, seen: tuple[Path, ...]) -> DictConfig:
    if isinstance(entry, str):
        return _load_with_includes(parent.parent / entry, seen)
    if isinstance(entry, DictConfig) and len(entry) == 1:
        ((key, relative),) = entry.items()
        return OmegaConf.create({key: _load_with_includes(parent.parent / str(relative), seen)})
    raise ConfigError(f"{parent}: include entry {entry!r} must be a path or a one-key mapping `section: path`")


def _config_error(source: str, error: OmegaConfBaseException) -> ConfigError:
    """The merge's error as one line naming where the value came from (a file or an override) and the key."""
    key = getattr(error, "full_key", None)
    where = f" (key {key})" if key else ""
    return ConfigError(f"{source}: {str(error).splitlines()[0]}{where}; `python -m train --help` lists the sections and keys")


def load_run_config(path: str | Path, overrides: Optional[list[str]] = None) -> RunConfig:
    """The run config: schema defaults <- the YAML (with includes) <- dotlist overrides, validated.

    An error names its source: the file for the file's keys, the override for a command-line one.
    """
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), _load_with_includes(Path(path)))
    except OmegaConfBaseException as error:
        raise _config_error(str(path), error) from error
    for override in overrides or []:
        if "=" not in override:
            raise ConfigError(f"override {override!r} has no '=': write it as section.key=value (e.g. train.steps=100)")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([override]))
        except OmegaConfBaseException as error:
            raise _config_error(f"override {override}", error) from error
    try:
        cfg: RunConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise _config_error(str(path), error) from error
    return cfg.validate()


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
