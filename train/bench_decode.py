"""`python -m train.bench_decode [--quick]`: decode latency and memory, TTT state vs a growing KV cache.

For each context length (default 4K, 64K, 1M tokens) it times `--steps` single-token decode steps of
* the TTT model (model/decode.py) in each `--variants` mode: its state (fast weights, one partial
  chunk, the window ring) has the same size at every context. Contexts up to `--prefill-up-to` are
  really prefilled; longer ones start from `random_state`, a state of the right shapes with random
  contents, which is legitimate only because neither the state's size nor a step's work depends on
  the context (the JSON records which was used);
* the SDPA transformer of the same config (model/baseline.py) attending to a KV cache filled to the
  context, which grows linearly (a context whose cache does not fit is recorded as out of memory).
The timed steps straddle a chunk boundary, so `max_ms` shows the step that applies a chunk update.

Writes `<out>.json` and `<out>.md` (default docs/bench/decode). `--quick` runs the tiny config on
CPU at small contexts in seconds, as a smoke test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from model.baseline import BaselineLM
from model.config import load_model_config
from model.decode import DecodeState, decode_step, prefill, random_state
from model.lm import TTTLM

VARIANTS = {
    "parallel": [],  # the config as written (TTT-LA chunk scan, W1 fast)
    "recurrent": ["ttt.mode=recurrent", "ttt.fast_weights=all", "ttt.weight_norm=true", "ttt.token_causal=false"],
}
MB = 2**20


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], steps: int, device: torch.device) -> list[float]:
    """Milliseconds of each call of `step` (synchronised, so each time is the step's own)."""
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(1e3 * (time.perf_counter() - start))
    return times


def peak_mb(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / MB if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def summary(times: list[float], warmup: int) -> dict:
    timed = times[warmup:]
    return {"mean_ms": statistics.mean(timed), "median_ms": statistics.median(timed), "max_ms": max(timed)}


def bench_ttt(model: TTTLM, context: int, args: argparse.Namespace, device: torch.device) -> dict:
    """Decode steps ending at `context`; the state enters half-way before a chunk boundary."""
    start = context - args.steps // 2  # `context` is a multiple of the chunk size in the default grids
    reset_peak(device)
    tokens = torch.randint(0, model.cfg.vocab_size, (args.batch, args.steps), device=device)
    if context <= args.prefill_up_to:
        prompt = torch.randint(0, model.cfg.vocab_size, (args.batch, start), device=device)
        state: DecodeState = prefill(model, prompt)[1]
        source = "prefilled"
    else:
        state = random_state(model, args.batch, start)
        source = "random (size independent of context)"
    reset_peak(device)
    index = iter(range(args.steps))
    times = time_steps(lambda: decode_step(model, state, tokens[:, next(index)]), args.steps, device)
    return {"state": source, "state_mb": state.memory_bytes() / MB, "peak_mb": peak_mb(device), **summary(times, args.warmup)}


def bench_baseline(model: BaselineLM, context: int, args: argparse.Namespace, device: torch.device) -> dict:
    """Decode steps attending to a KV cache already holding `context - steps/2` tokens."""
    reset_peak(device)
    try:
        cache = model.empty_cache(args.batch, context + args.steps)
    except torch.cuda.OutOfMemoryError:
        return {"state": "out of memory", "state_mb": None, "peak_mb": None, "mean_ms": None, "median_ms": None, "max_ms": None}
    cache.keys.normal_()
    cache.values.normal_()
    cache.length = context - args.steps // 2
    tokens = torch.randint(0, model.cfg.vocab_size, (args.batch, args.steps), device=device)
    reset_peak(device)
    index = iter(range(args.steps))
    times = time_steps(lambda: model.decode_step(tokens[:, next(index)], cache), args.steps, device)
    return {"state": "kv cache", "state_mb": cache.memory_bytes() / MB, "peak_mb": peak_mb(device), **summary(times, args.warmup)}


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Decode latency and memory: TTT state vs SDPA KV cache",
        "",
        f"Config `{meta['config']}` {' '.join(meta['override'])}, batch {meta['batch']}, {meta['dtype']}, "
        f"device: {meta['device']}. {meta['steps'] - meta['warmup']} timed steps per row straddling a chunk boundary "
        "(`max` is the step that applies the chunk update). TTT contexts above "
        f"{meta['prefill_up_to']} tokens start from a random state of the right shapes (its size does not depend "
        "on the context); the baseline attends to a KV cache filled to the context. Peak = max allocated during the decode steps (weights included).",
        "",
        "| model | context | state | state MB | peak MB | mean ms/token | median ms | max ms |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]

    def fmt(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.2f}"

    for r in rows:
        lines.append(
            f"| {r['model']} | {r['context']} | {r['state']} | {fmt(r['state_mb'])} | {fmt(r['peak_mb'])} | "
            f"{fmt(r['mean_ms'])} | {fmt(r['median_ms'])} | {fmt(r['max_ms'])} |"
        )
    return "\n".join(lines) + "\n"


FULL = {
    "config": "configs/model/125m.yaml", "override": [], "contexts": [4096, 65536, 1048576], "prefill_up_to": 65536,
    "steps": 40, "warmup": 8, "dtype": "bfloat16", "device": "cuda" if torch.cuda.is_available() else "cpu",
    "out": Path("docs/bench/decode"),
}  # fmt: skip
QUICK = {
    "config": "configs/model/tiny.yaml", "override": ["ttt.chunk_size=32", "window_size=32"], "contexts": [256, 1024, 16384],
    "prefill_up_to": 1024, "steps": 24, "warmup": 4, "dtype": "float32", "device": "cpu", "out": Path("runs/bench_decode_quick"),
}  # fmt: skip


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Options left out take the FULL (GPU) defaults, or the QUICK ones with --quick."""
    parser = argparse.ArgumentParser(prog="python -m train.bench_decode", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny config on CPU at small contexts (smoke test)")
    parser.add_argument("--config")
    parser.add_argument("--override", nargs="*", help="model config dotlist, e.g. ttt.chunk_size=1024")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["parallel", "recurrent"])
    parser.add_argument("--contexts", nargs="+", type=int)
    parser.add_argument("--prefill-up-to", type=int, help="longer TTT contexts use a random state")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, help="decode steps per row (the first --warmup are not timed)")
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"))
    parser.add_argument("--device")
    parser.add_argument("--out", type=Path, help="output path without suffix")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps <= args.warmup or any(c < args.steps for c in args.contexts):
        parser.error(f"--steps={args.steps} must exceed --warmup={args.warmup} and be at most every context")
    return args


@torch.no_grad()
def main(argv: list[str]) -> None:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    rows = []
    models = {f"ttt-{name}": TTTLM(load_model_config(args.config, args.override + VARIANTS[name])) for name in args.variants}
    models["sdpa-kv-cache"] = BaselineLM(load_model_config(args.config, args.override))
    for name, model in models.items():
        model.to(device=device, dtype=dtype).eval()
        bench = bench_baseline if isinstance(model, BaselineLM) else bench_ttt
        for context in args.contexts:
            row = {"model": name, "context": context, **bench(model, context, args, device)}
            rows.append(row)
            print(json.dumps(row))
        model.to("cpu")
    meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    meta["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(rows, meta))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main(sys.argv[1:])
