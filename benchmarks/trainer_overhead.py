"""`python -m benchmarks.trainer_overhead CONFIG [key=value ...]`: the trainer's step beside the model's, piece by piece.

`benchmarks.step` times the model alone (fp32 weights, bf16 autocast, fused AdamW); a run through
`launch/` wraps the same compiled blocks in the DeepSpeed engine (bf16 weights, ZeRO, fp32 master
weights), accumulates micro-batches, reads its loader and reports. Each variant below adds one of
those to the one before, in one process on one device, so the gap between the two numbers splits
into its causes:

    model_step   fp32 weights, autocast, one micro-batch, one fused AdamW step (`benchmarks.step`'s loop)
    model        the same over `train.grad_accum` micro-batches, one AdamW step
    model_bf16   the same with bf16 weights and no autocast (what DeepSpeed's bf16 mode trains)
    engine       the trainer's DeepSpeed engine (`train.engine.build_engine`) on random tokens
    engine_data  the engine fed by the run's loader (`train.data.loader`)
    trainer      `train.loop.Trainer.train_step`: the run's own step (loss all-reduce, probes on logging steps)

Every variant is built first; then they take turns (``--rounds``), so that the device's clocks
drifting over a run (or another machine) cannot favour one. Prints and writes (``--out``) one JSON
row per variant: the median step's wall time, the host's share of it (host_ms: until the step's
work is queued), tokens/s and the ratio to the first; ``--profile DIR`` also writes each variant's op table for one step.
``--syncs FILE`` runs one more step of each variant with CUDA's sync debug mode on and writes where
the host waited for the device (each call site with its count): on a step whose host time is about
its device time, every such wait leaves the device idle while the host queues the next kernels.
``--engine-configs`` adds an `engine` row per set of config overrides (comma-separated), to try the
engine's settings (ZeRO stage, buckets, overlap) in the same process.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from parallel.groups import ParallelDims
from train.config import RunConfig, load_run_config, to_yaml
from train.data.loader import build_loader, check_dataset, endless, split_inputs_targets
from train.distributed import init_distributed
from train.engine import build_engine, build_model
from train.loop import Trainer
from train.state import TrainState

VARIANTS = ("model_step", "model", "model_bf16", "engine", "engine_data", "trainer")
Step = Callable[[], None]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_calls(step: Step, device: torch.device, warmup: int, steps: int) -> list[tuple[float, float]]:
    """(wall, host) seconds of each of `steps` calls of `step` after `warmup`: wall until host and device
    are both done; host until `step` returns, before waiting for the device. A host time close to
    the wall time means the host, not the device, sets the pace: the device's queue ran empty."""
    times = []
    for i in range(warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        host = time.perf_counter() - start
        synchronize(device)
        if i >= warmup:
            times.append((time.perf_counter() - start, host))
    return times


def time_step(step: Step, device: torch.device, warmup: int, steps: int) -> float:
    """Median wall seconds of `step` (host and device both done), after `warmup` calls."""
    return median([wall for wall, _ in timed_calls(step, device, warmup, steps)])


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def random_batches(cfg: RunConfig, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) of random token ids, made once: the model's variants read no data."""
    ids = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.data.seq_len + 1), device=device)
    while True:
        yield ids[:, :-1], ids[:, 1:]


def loader_batches(cfg: RunConfig, dims: ParallelDims) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    batches = endless(build_loader(cfg.data, cfg.data.train_split, cfg.train.micro_batch_size, dims.sp, cfg.data.shuffle))
    for batch in batches:
        yield split_inputs_targets(batch["tokens"].to(dims.device, non_blocking=True))


def model_step(cfg: RunConfig, dims: ParallelDims, bf16_weights: bool) -> Step:
    """The benchmark's loop over the trainer's model (same compile setting): accumulate, then one AdamW step."""
    model, _ = build_model(cfg, dims)
    model.to(dims.device, dtype=torch.bfloat16 if bf16_weights else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dims.device.type == "cuda")
    autocast = dims.device.type == "cuda" and not bf16_weights
    batches = random_batches(cfg, dims.device)

    def step() -> None:
        for _ in range(cfg.train.grad_accum):
            inputs, targets = next(batches)
            with torch.autocast(dims.device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = model(inputs, targets, return_logits=False).loss
            (loss / cfg.train.grad_accum).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def engine_step(cfg: RunConfig, dims: ParallelDims, data: bool) -> Step:
    """The trainer's engine, its micro-steps as `Trainer.micro_step` runs them."""
    engine, _ = build_engine(cfg, dims)
    batches = loader_batches(cfg, dims) if data else random_batches(cfg, dims.device)

    def step() -> None:
        for _ in range(cfg.train.grad_accum):
            inputs, targets = next(batches)
            loss = engine(inputs, targets, return_logits=False).loss
            engine.backward(loss)
            engine.step()

    return step


def trainer_step(cfg: RunConfig, dims: ParallelDims) -> Step:
    """`Trainer.train_step` itself, its run directory a temporary one."""
    engine, lm = build_engine(cfg, dims)
    t = cfg.train
    loader = build_loader(cfg.data, cfg.data.train_split, t.micro_batch_size, dims.sp, cfg.data.shuffle)
    state = TrainState(loader, sequences_per_step=t.micro_batch_size * t.grad_accum * dims.dp)
    trainer = Trainer(cfg, dims, engine, lm, state, to_yaml(cfg), None)

    def step() -> None:
        trainer.train_step()

    return step


def build_variant(name: str, cfg: RunConfig, dims: ParallelDims) -> Step:
    if name in ("model", "model_bf16"):
        return model_step(cfg, dims, bf16_weights=name == "model_bf16")
    if name in ("engine", "engine_data"):
        return engine_step(cfg, dims, data=name == "engine_data")
    return trainer_step(cfg, dims)


def profile_table(step: Step, device: torch.device) -> str:
    """One call of `step` under torch.profiler: ops by device time (CUDA) or host time."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        step()
        synchronize(device)
    sort_by = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    averages = prof.key_averages()
    return averages.table(sort_by=sort_by, row_limit=30) + "\n\n" + averages.table(sort_by="self_cpu_time_total", row_limit=30)


def sync_sites(step: Step, device: torch.device) -> collections.Counter:
    """The call sites where one call of `step` made the host wait for the device, with their counts:
    each synchronising CUDA operation under `torch.cuda.set_sync_debug_mode("warn")`, named by the
    innermost frames of the stack outside torch itself (where the project or a library asked for it)."""
    sites: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        if "synchronizing" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename and "warnings" not in f.filename]
        sites[" <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[-3:][::-1])] += 1

    synchronize(device)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    synchronize(device)
    return sites


def write_sync_sites(variants: list["Variant"], device: torch.device, path: Path) -> None:
    lines = []
    for variant in variants:
        sites = sync_sites(variant.step, device)
        lines.append(f"## {variant.label}: {sum(sites.values())} synchronising calls in one step")
        lines += [f"{count:5d}  {site}" for site, count in sites.most_common()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


@dataclass
class Variant:
    label: str
    step: Step
    tokens: int  # per call of `step`
    times: list[tuple[float, float]] = field(default_factory=list)  # (wall, host) seconds per timed step


def build(name: str, cfg: RunConfig, dims: ParallelDims, label: Optional[str] = None) -> Variant:
    built = name
    if name == "model_step":  # the benchmark's loop exactly: one micro-batch per optimizer step
        cfg, built = replace(cfg, train=replace(cfg.train, grad_accum=1)), "model"
    tokens = cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.data.seq_len
    return Variant(label or name, build_variant(built, cfg, dims), tokens)


def measure_interleaved(variants: list[Variant], device: torch.device, warmup: int, steps: int, rounds: int) -> None:
    """Each variant's step `steps` times per round, the variants taking turns for `rounds` rounds, so a
    drift of the device's clocks over the run spreads over all of them instead of favouring the first."""
    for variant in variants:
        timed_calls(variant.step, device, warmup, 0)
    for _ in range(rounds):
        for variant in variants:
            variant.times += timed_calls(variant.step, device, 0, steps)


def row(variant: Variant, first: Variant) -> dict:
    """The median step's wall time and tokens/s, over the first variant's; host_ms: the median time the
    host took to queue a step (equal to step_ms when the device waits for the host)."""
    seconds = median([wall for wall, _ in variant.times])
    tok_s = variant.tokens / seconds
    first_tok_s = first.tokens / median([wall for wall, _ in first.times])
    host_ms = median([host for _, host in variant.times]) * 1e3
    return dict(variant=variant.label, step_ms=round(seconds * 1e3, 1), host_ms=round(host_ms, 1), tok_s=round(tok_s),
                of_first=round(tok_s / first_tok_s, 3))


def write_profiles(variants: list[Variant], device: torch.device, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for variant in variants:
        file_name = re.sub(r"[^\w.-]+", "_", variant.label)  # a row's config overrides, as a plain file name
        (folder / f"{file_name}.txt").write_text(profile_table(variant.step, device))


def main(argv: Optional[list[str]] = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", help="a train config, e.g. configs/train/125m_16k.yaml")
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--engine-configs", nargs="*", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                        help="one more engine row per entry, with these config overrides")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds in which the variants take turns")
    parser.add_argument("--out", type=Path, help="write the rows here (JSON)")
    parser.add_argument("--profile", type=Path, help="write each variant's op table for one step here")
    parser.add_argument("--syncs", type=Path, help="write where each variant's step waits for the device here (CUDA)")
    args = parser.parse_args(argv)
    torch._dynamo.config.recompile_limit = 64  # one model per variant: fp32 and bf16 weights each compile once
    with tempfile.TemporaryDirectory() as run_dir:
        quiet = [f"logging.run_dir={run_dir}", "logging.tensorboard=false"]  # the run writes nothing that stays
        cfg = load_run_config(args.config, [*args.overrides, *quiet])
        dims = init_distributed(cfg.parallel.sp)
        cfg.resolve_layout(dims)
        if {"engine_data", "trainer"} & set(args.variants):
            check_dataset(cfg, dims.dp)  # a missing corpus is one line, before any model is built
        runs = [(name, cfg, None) for name in args.variants]
        for entry in args.engine_configs:
            engine_cfg = load_run_config(args.config, [*args.overrides, *entry.split(","), *quiet]).resolve_layout(dims)
            runs.append(("engine", engine_cfg, f"engine[{entry}]"))
        variants = [build(name, run_cfg, dims, label) for name, run_cfg, label in runs]
        measure_interleaved(variants, dims.device, args.warmup, args.steps, args.rounds)
        rows = [row(variant, variants[0]) for variant in variants]
        for line in rows:
            print(json.dumps(line), flush=True)
        if dims.device.type == "cuda":
            print(f"peak memory of all variants together: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
        if args.profile is not None:
            write_profiles(variants, dims.device, args.profile)
        if args.syncs is not None and dims.device.type == "cuda":
            write_sync_sites(variants, dims.device, args.syncs)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(config=args.config, overrides=args.overrides, rows=rows), indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
