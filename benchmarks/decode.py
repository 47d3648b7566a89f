"""`python -m benchmarks.decode [--quick]`: decode latency, throughput, prefill speed and memory, TTT state vs a growing KV cache.

For each context length (default 4K, 64K, 1M tokens) it times `--steps` single-token decode steps,
at batch 1 (latency: median and max ms) and at `--throughput-batch` (tokens/s), through the static
decoders and `decoding.graphs.DecodeRunner` (CUDA graphs on CUDA), and one batch-1 prefill of
the context (tokens/s, peak memory), of
* the TTT model (decoding/static.py) in each `--variants` mode: its state (fast weights, the partial
  chunk's running sums, the window ring) has the same size at every context. Contexts up to `--prefill-up-to` are
  really prefilled; longer ones start from `random_state`, a state of the right shapes with random
  contents, which is legitimate only because neither the state's size nor a step's work depends on
  the context (the JSON records which was used);
* the SDPA transformer of the same config (model/baseline.py) attending to a static KV cache of the
  context's capacity, which grows linearly (a cache that does not fit is recorded as out of memory).
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
from functools import partial
from typing import Callable, Optional

import torch

from benchmarks.compiler_options import inductor_options
from benchmarks.profiling import count_kernels, host_ops_clause, host_summary, synchronize
from decoding.compiled import block_step
from decoding.decode import prefill, random_state
from decoding.captured_prefill import CapturedPrefill
from decoding.graphs import DecodeRunner
from decoding.sampling import sample_tokens
from decoding.static import StaticDecoder, prefill_rows
from decoding.kv_cache import StaticKVDecoder
from decoding.pending import defers_chunk_gradients
from model.baseline import BaselineLM
from model.config import load_model_config
from model.lm import BlockCall, TTTLM

VARIANTS = {
    "parallel": [],  # the config as written (TTT-LA chunk scan, W1 fast)
    "recurrent": ["ttt.mode=recurrent", "ttt.fast_weights=all", "ttt.weight_norm=true", "ttt.token_causal=false"],
}
MB = 2**20


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


def time_prefill(run: Callable[[], object], tokens: int, device: torch.device, calls: int = 3) -> dict:
    """Tokens per second of the median of `calls` prefill calls (after one untimed call that warms up
    kernels), their peak memory and, on CUDA, the kernels of one call and their summed device time
    (`prefill_kernels`): a wall time far above the kernels' is host time."""
    run()
    reset_peak(device)
    seconds = sorted(time_steps(run, calls, device))[calls // 2] / 1e3
    timed = {"prefill_tokens_per_s": tokens / seconds, "prefill_peak_mb": peak_mb(device), "prefill_ms": seconds * 1e3}
    if device.type == "cuda":
        timed["prefill_kernels"] = count_kernels(run, device)
    timed["prefill_host"] = host_summary(run, device)
    return timed


def time_decoder(decoder, args: argparse.Namespace, device: torch.device) -> dict:
    """Per-step times of the static decoder's step (CUDA graphs on CUDA unless --no-graphs; compiled unless
    --no-compile), greedy sampling included. The first steps, untimed, compile and capture."""
    compile_step = args.compile_baseline if isinstance(decoder, StaticKVDecoder) else args.compile
    backend = "inductor" if compile_step else None
    runner = DecodeRunner(decoder, partial(sample_tokens, temperature=0.0, top_p=1.0), graphs=args.graphs, step_backend=backend)
    reset_peak(device)
    times = time_steps(runner.step, args.steps, device)
    timed = {"state_mb": decoder.memory_bytes() / MB, "peak_mb": peak_mb(device), **summary(times, args.warmup)}
    if device.type == "cuda":
        timed.update(count_kernels(runner.token_step, device))
    return timed




def ttt_decoder(model: TTTLM, batch: int, start: int, prefilled: bool, call_block: BlockCall,
                deferred: Optional[bool] = None) -> StaticDecoder:  # fmt: skip
    """A static decoder at position `start`: really prefilled, or a random state of the right shapes;
    `deferred` as in `decoding.static.prefill_prompts` (None: the default for the batch)."""
    if deferred is None:
        deferred = defers_chunk_gradients(model.cfg.ttt, batch)
    if prefilled:
        prompt = torch.randint(0, model.cfg.vocab_size, (batch, start)).tolist()
        return prefill_rows(model, prompt, call_block, deferred)[1]
    return StaticDecoder.from_states(model, [random_state(model, batch, start, deferred=deferred)])


def baseline_decoder(model: BaselineLM, batch: int, start: int, capacity: int, prefilled: bool) -> StaticKVDecoder:
    """A static decoder at position `start` over a cache of `capacity` tokens (prefilled, or random contents)."""
    if prefilled:
        prompt = torch.randint(0, model.cfg.vocab_size, (batch, start), device=model.embed.weight.device)
        return StaticKVDecoder.around(model, model.prefill(prompt, capacity)[1])
    cache = model.empty_cache(batch, capacity)
    cache.keys.normal_()
    cache.values.normal_()
    cache.length = start
    return StaticKVDecoder.around(model, cache)


def prefill_block_call(args: argparse.Namespace) -> BlockCall:
    """How the TTT prefill runs each block: compiled with --compile (one graph per prompt length; the
    untimed first call compiles), else its plain forward."""
    return block_step("inductor" if args.compile else None)


def time_batch(model: "TTTLM | BaselineLM", batch: int, context: int, args: argparse.Namespace, device: torch.device,
               prefilled: bool, deferred: Optional[bool] = None) -> dict:
    """Decode steps of `batch` rows ending at `context` (the state enters `steps / 2` tokens before it, so
    the timed steps straddle a chunk boundary); {"out_of_memory": True} when the state does not fit.
    `deferred`: how a TTT decoder keeps the partial chunk (None: its default for the batch)."""
    start = context - args.steps // 2
    reset_peak(device)
    try:
        if isinstance(model, BaselineLM):
            decoder = baseline_decoder(model, batch, start, context + args.steps, prefilled)
        else:
            decoder = ttt_decoder(model, batch, start, prefilled, prefill_block_call(args), deferred)
        timed = time_decoder(decoder, args, device)
    except torch.cuda.OutOfMemoryError:
        return {"out_of_memory": True}
    del decoder  # frees the state (and its graphs) before the next batch allocates
    return {**timed, "batch": batch, "tokens_per_s": batch * 1e3 / timed["median_ms"]}


def largest_fitting_batch(model: BaselineLM, context: int, args: argparse.Namespace, device: torch.device) -> Optional[dict]:
    """The throughput of the largest power-of-two batch below --throughput-batch whose cache fits (None: not even 1)."""
    batch = args.throughput_batch // 2
    while batch >= 1:
        timed = time_batch(model, batch, context, args, device, prefilled=False)
        if not timed.get("out_of_memory"):
            return timed
        batch //= 2
    return None


def bench_model(model: "TTTLM | BaselineLM", context: int, args: argparse.Namespace, device: torch.device,
                baseline_batch: Optional[int] = None) -> dict:
    """Batch-1 latency, batch-`--throughput-batch` throughput and batch-1 prefill speed at `context`.

    Where the transformer's cache does not fit the throughput batch, its row also holds the largest
    batch that fits (`throughput_largest_fit`), and a TTT row given that `baseline_batch` is timed at it
    too (`throughput_at_baseline_batch`): the comparison at the batch the transformer can serve. A TTT
    row whose throughput batch keeps pending tokens (`decoding.pending`) is also timed with running
    sums at that batch (`throughput_running_sums`): the two ways of holding the partial chunk, A/B.
    """
    prefilled = context <= args.prefill_up_to
    row: dict = {"state": "prefilled" if prefilled else "random (size independent of context)"}
    row["latency"] = time_batch(model, 1, context, args, device, prefilled)
    row["throughput"] = time_batch(model, args.throughput_batch, context, args, device, prefilled=False)
    if isinstance(model, BaselineLM) and row["throughput"].get("out_of_memory"):
        row["throughput_largest_fit"] = largest_fitting_batch(model, context, args, device)
    if not isinstance(model, BaselineLM) and defers_chunk_gradients(model.cfg.ttt, args.throughput_batch):
        row["throughput_running_sums"] = time_batch(model, args.throughput_batch, context, args, device, False, False)
    if baseline_batch is not None and not isinstance(model, BaselineLM):
        row["throughput_at_baseline_batch"] = time_batch(model, baseline_batch, context, args, device, prefilled=False)
    if prefilled:
        prompt = torch.randint(0, model.cfg.vocab_size, (1, context), device=device)
        run = prefill_call(model, context, args)
        try:
            row.update(time_prefill(lambda: run(prompt), context, device))
            if args.graphs:
                captured = CapturedPrefill(run, prompt)
                row["prefill_captured"] = time_prefill(lambda: captured(prompt), context, device)
                del captured  # frees the graph's memory pool before the next row
        except torch.cuda.OutOfMemoryError:
            row["prefill_tokens_per_s"] = None
    return row


def prefill_call(model: "TTTLM | BaselineLM", context: int, args: argparse.Namespace) -> Callable[[torch.Tensor], object]:
    """The model's prefill of a [B, context] prompt: the transformer's into a cache of `context` tokens,
    the TTT model's with its blocks run as `prefill_block_call` says."""
    if isinstance(model, BaselineLM):
        return lambda ids: model.prefill(ids, context)
    call_block = prefill_block_call(args)
    return lambda ids: prefill(model, ids, call_block=call_block)


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Decode latency, throughput, prefill and memory: TTT state vs SDPA KV cache",
        "",
        f"Config `{meta['config']}` {' '.join(meta['override'])}, {meta['dtype']}, device: {meta['device']}, "
        f"CUDA graphs: {meta['graphs']}, compiled TTT steps: {meta.get('compile', False)}, compiled transformer steps: {meta.get('compile_baseline', False)}{inductor_clause(meta)}. {meta['steps'] - meta['warmup']} timed steps per cell straddling a chunk "
        "boundary (`max` includes the step that applies the chunk update), greedy sampling on the device included. "
        f"Latency at batch 1; throughput at batch {meta['throughput_batch']} (batch x 1000 / median ms). TTT contexts "
        f"above {meta['prefill_up_to']} tokens, and every throughput row, start from a random state of the right "
        "shapes (its size does not depend on the context); the baseline attends to a cache of the context's capacity. "
        "Prefill: one batch-1 prompt of the context's length. Peak = max allocated (weights included).",
        "",
        f"| model | context | state MB (b=1) | median ms | max ms | kernels / their ms a step | peak MB "
        f"| tokens/s (b={meta['throughput_batch']}) | peak MB | prefill tokens/s | prefill peak MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def fmt(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.2f}"

    def cell(part: dict, key: str) -> str:
        return "OOM" if part.get("out_of_memory") else fmt(part.get(key))

    def kernel_cell(part: dict) -> str:
        return f"{part['kernels']} / {part['kernel_ms']:.2f}" if "kernels" in part else "-"

    for r in rows:
        latency, throughput = r["latency"], r["throughput"]
        lines.append(
            f"| {r['model']} | {r['context']} | {cell(latency, 'state_mb')} | {cell(latency, 'median_ms')} | "
            f"{cell(latency, 'max_ms')} | {kernel_cell(latency)} | {cell(latency, 'peak_mb')} | {cell(throughput, 'tokens_per_s')} | "
            f"{cell(throughput, 'peak_mb')} | {fmt(r.get('prefill_tokens_per_s'))} | {fmt(r.get('prefill_peak_mb'))} |"
        )
    return "\n".join(lines + at_baseline_batch(rows) + chunk_gradient_modes(rows) + prefill_breakdown(rows)) + "\n"


def inductor_clause(meta: dict) -> str:
    """The Inductor options the run compiled with (`--inductor`), as a clause of the table's header."""
    return f", Inductor options: {' '.join(meta['inductor'])}" if meta.get("inductor") else ""


def chunk_gradient_modes(rows: list[dict]) -> list[str]:
    """The throughput batch's tokens/s with the partial chunk kept as pending tokens (the default there)
    against running sums, per TTT row, with each mode's chunk-completing (max) step."""
    lines = []
    for row in rows:
        pending, running = row.get("throughput", {}), row.get("throughput_running_sums", {})
        if "tokens_per_s" not in pending or "tokens_per_s" not in running:
            continue
        lines.append(f"* {row['model']} at {row['context']}: pending tokens {pending['tokens_per_s']:.0f} tokens/s "
                     f"(max step {pending['max_ms']:.2f} ms), running sums {running['tokens_per_s']:.0f} "
                     f"(max {running['max_ms']:.2f} ms): {pending['tokens_per_s'] / running['tokens_per_s']:.2f}x")
    return ["", "The partial chunk at the throughput batch, pending tokens against running sums:", *lines] if lines else []


def prefill_breakdown(rows: list[dict]) -> list[str]:
    """One line per prefilled row: its wall time beside its kernels' count and summed device time (the
    difference is host time: launches, Python, the compiled graphs' guards)."""
    lines = [f"* {r['model']} at {r['context']}: {r['prefill_ms']:.1f} ms, {r['prefill_kernels']['kernels']} kernels "
             f"taking {r['prefill_kernels']['kernel_ms']:.1f} ms{host_ops_clause(r.get('prefill_host', {}))}{captured_clause(r)}"
             for r in rows if "prefill_kernels" in r]  # fmt: skip
    return ["", "Prefill, wall time against its kernels' device time:", *lines] if lines else []


def captured_clause(row: dict) -> str:
    """A row's prefill replayed from one CUDA graph (`decoding.captured_prefill`), as a clause (empty without it)."""
    captured = row.get("prefill_captured")
    if not captured:
        return ""
    return f"; captured in one CUDA graph: {captured['prefill_ms']:.1f} ms ({captured['prefill_tokens_per_s'] / 1e3:.0f}k tokens/s)"


def at_baseline_batch(rows: list[dict]) -> list[str]:
    """Lines comparing the models at the largest batch the transformer's cache fits, where the
    throughput batch does not."""
    lines = []
    for base in rows:
        fit = base.get("throughput_largest_fit")
        if base["model"] != "sdpa-kv-cache" or "throughput_largest_fit" not in base:
            continue
        if fit is None:
            lines.append(f"* {base['context']} tokens: the transformer's cache does not fit even one row.")
            continue
        ttt = [f"{r['model']} {r['throughput_at_baseline_batch']['tokens_per_s']:.0f} tokens/s "
               f"({r['throughput_at_baseline_batch']['tokens_per_s'] / fit['tokens_per_s']:.1f}x)"
               for r in rows if r["context"] == base["context"] and "throughput_at_baseline_batch" in r
               and not r["throughput_at_baseline_batch"].get("out_of_memory")]  # fmt: skip
        lines.append(f"* {base['context']} tokens: the transformer's cache fits at most batch {fit['batch']} (largest "
                     f"power of two): {fit['tokens_per_s']:.0f} tokens/s; at that batch " + ", ".join(ttt) + ".")
    return ["", "At the largest batch the transformer fits:", *lines] if lines else []


FULL = {
    "config": "configs/model/125m.yaml", "override": [], "contexts": [4096, 65536, 1048576], "prefill_up_to": 65536,
    "steps": 40, "warmup": 8, "dtype": "bfloat16", "device": "cuda" if torch.cuda.is_available() else "cpu",
    "throughput_batch": 64, "out": Path("docs/bench/decode"),
}  # fmt: skip
QUICK = {
    "config": "configs/model/tiny.yaml", "override": ["ttt.chunk_size=32", "window_size=32"], "contexts": [256, 1024, 16384],
    "prefill_up_to": 1024, "steps": 24, "warmup": 4, "dtype": "float32", "device": "cpu", "throughput_batch": 4, "out": Path("runs/bench_decode_quick"),
}  # fmt: skip


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Options left out take the FULL (GPU) defaults, or the QUICK ones with --quick."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decode", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny config on CPU at small contexts (smoke test)")
    parser.add_argument("--config")
    parser.add_argument("--override", nargs="*", help="model config dotlist, e.g. ttt.chunk_size=1024")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["parallel", "recurrent"])
    parser.add_argument("--contexts", nargs="+", type=int)
    parser.add_argument("--prefill-up-to", type=int, help="longer TTT contexts use a random state")
    parser.add_argument("--throughput-batch", type=int, help="batch of the throughput columns (default 64; 4 with --quick)")
    parser.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="replay decode steps from CUDA graphs (default: on CUDA)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="compile the TTT decoder's step and its prefill with Inductor (default: on CUDA)")
    parser.add_argument("--compile-baseline", action="store_true",
                        help="compile the transformer's step too; off by default: on an H100 its masked attention "
                             "over the cache compiled ran slower than eager (docs/bench/decode.md)")
    parser.add_argument("--inductor", nargs="*", default=[], metavar="KEY=VALUE",
                        help="Inductor config for the compiled steps and prefill, e.g. cpp_wrapper=True")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                        help="time the KV-cache transformer too (--no-baseline: the TTT rows alone, for A/B runs of "
                             "a TTT setting; --prefill-up-to 0 also skips the prefill)")
    parser.add_argument("--steps", type=int, help="decode steps per row (the first --warmup are not timed)")
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"))
    parser.add_argument("--device")
    parser.add_argument("--out", type=Path, help="output path without suffix")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.graphs is None:
        args.graphs = args.device.startswith("cuda")
    if args.compile is None:
        args.compile = args.device.startswith("cuda")
    if args.steps <= args.warmup or any(c < args.steps for c in args.contexts):
        parser.error(f"--steps={args.steps} must exceed --warmup={args.warmup} and be at most every context")
    return args


@torch.no_grad()
def main(argv: list[str]) -> None:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    rows = []
    # The transformer first: where its cache does not fit the throughput batch, the TTT models are also
    # timed at the largest batch it fits.
    models = {"sdpa-kv-cache": BaselineLM(load_model_config(args.config, args.override))} if args.baseline else {}
    models.update({f"ttt-{name}": TTTLM(load_model_config(args.config, args.override + VARIANTS[name])) for name in args.variants})
    baseline_batch: dict[int, int] = {}
    for name, model in models.items():
        # Each model compiles its own graphs: its prefill one per prompt shape, its step one per batch
        # size. Left to accumulate across models they pass Dynamo's recompile limit on the shared
        # `Block.forward`, which `fullgraph=True` turns into a hard failure.
        torch._dynamo.reset()
        model.to(device=device, dtype=dtype).eval()
        for context in args.contexts:
            with torch._inductor.config.patch(inductor_options(args.inductor)):
                row = {"model": name, "context": context, **bench_model(model, context, args, device, baseline_batch.get(context))}
            if row.get("throughput_largest_fit"):
                baseline_batch[context] = row["throughput_largest_fit"]["batch"]
            rows.append(row)
            print(json.dumps(row))
        model.to("cpu")
    if args.baseline:  # the table lists the TTT models first
        rows = rows[len(args.contexts):] + rows[: len(args.contexts)]
    meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    meta["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(rows, meta))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main(sys.argv[1:])
