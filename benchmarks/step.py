"""Whole-model training step: tttla against the same-size transformer, one process, one GPU, bf16.

    make bench-train                      # every row below, results in docs/bench/train_step.{json,md}
    python -m benchmarks.step --configs 125m --seqs 16384x1 --impls tttla sdpa --checkpointing none

Each row times forward + backward + AdamW step of one model (bf16 autocast over fp32 weights, fused
AdamW) at one context and reports tokens/s, peak memory and MFU (`train.flops`' count of useful work,
recomputation not counted) against the bf16 matmul peak measured in the same run and against the spec
sheet. The transformer (`model.baseline.BaselineLM`) shares the embeddings, norms, MLP, head, loss path
(`model.loss`), checkpointing and compile setting, so the only difference is the mixer.

Implementations: `tttla` (the parallel form: configs/model/<size>.yaml with W1-only fast weights),
`tttla_recurrent` (the released LaCT layer, configs/model/lact_760m.yaml; 760M only), `sdpa` (full
causal attention). A row that runs out of memory is reported as such, not dropped.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from benchmarks.compiler_options import inductor_options
from benchmarks.profiling import count_kernels, host_ops_clause, host_summary
from model.baseline import BaselineLM
from model.config import LMConfig, load_model_config
from model.lm import TTTLM
from parallel.activation_checkpointing import checkpoint_blocks
from train.config import CHECKPOINT_POLICIES
from train.flops import PEAK_BF16_TFLOPS, TRAINING_MULTIPLIER, baseline_forward_flops_per_token, training_flops_per_token

PARALLEL_FORM = ["ttt.mode=linear_attention", "ttt.fast_weights=w1", "ttt.weight_norm=false"]
CONFIG_DIR = Path("configs/model")


def model_config(impl: str, size: str, overrides: tuple[str, ...] = ()) -> LMConfig:
    """The LMConfig an implementation is measured at (the transformer reads the tttla config's sizes)."""
    if impl == "tttla_recurrent":
        return load_model_config(str(CONFIG_DIR / f"lact_{size}.yaml"), list(overrides))
    return load_model_config(str(CONFIG_DIR / f"{size}.yaml"), [*PARALLEL_FORM, *overrides])


def flops_per_token(impl: str, cfg: LMConfig, seq_len: int) -> float:
    if impl == "sdpa":
        return TRAINING_MULTIPLIER * baseline_forward_flops_per_token(cfg, seq_len)
    return training_flops_per_token(cfg, seq_len)


def build(impl: str, cfg: LMConfig, checkpointing: str, compile_blocks: Optional[Callable[[nn.Module], int]]) -> nn.Module:
    model = (BaselineLM(cfg) if impl == "sdpa" else TTTLM(cfg)).cuda()
    if checkpointing != "none":
        checkpoint_blocks(model, selective=checkpointing == "selective")
    if compile_blocks is not None:
        compile_blocks(model)
    return model


def training_step(model: nn.Module, batch: int, seq_len: int, vocab: int) -> Callable[[], None]:
    """One optimizer step of `model` on random token ids (forward, backward, fused AdamW), as a call."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, vocab, (batch, seq_len + 1), device="cuda")
    inputs, targets = ids[:, :-1], ids[:, 1:]

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(inputs, targets, return_logits=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_steps(step: Callable[[], None], warmup: int, steps: int) -> float:
    """Seconds per call of `step` (median of `steps` after `warmup`)."""
    times = []
    for i in range(warmup + steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def matmul_peak_tflops() -> float:
    """bf16 8192^3 products on random data: the ceiling MFU is also reported against."""
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * 20 / (time.perf_counter() - start) / 1e12


def measure_row(impl: str, size: str, seq_len: int, batch: int, checkpointing: str, compile_on: bool,
                peaks: tuple[float, float], warmup: int, steps: int, overrides: tuple[str, ...] = (),
                memory_budget: float = 1.0, profile: bool = False, inductor: tuple[str, ...] = (),
                skip_guards: bool = False) -> dict:  # fmt: skip
    """One row: tok/s, step ms, peak memory and MFU; with `profile`, also the kernels of one more step and
    their summed device time (`benchmarks.profiling`): a step whose kernels take much less than its wall
    time is bound by the host launching them, not by the GPU. `inductor`: KEY=VALUE Inductor options the
    row compiles with (named in its config), through the trainer's own `compile_blocks`."""
    cfg = model_config(impl, size, overrides)
    budget = [f"activation_memory_budget={memory_budget}"] if compile_on and memory_budget < 1 else []
    compiler = [f"inductor.{option}" for option in inductor] if compile_on else []
    compiler += ["skip_guards"] if compile_on and skip_guards else []
    row = dict(impl=impl, config=" ".join([size, *overrides, *budget, *compiler]), T=seq_len, B=batch, checkpointing=checkpointing,
               compile=compile_on)  # fmt: skip
    torch.cuda.reset_peak_memory_stats()
    model = None
    try:
        compile_blocks = compile_function(memory_budget, inductor_options(list(inductor))) if compile_on else None
        model = build(impl, cfg, checkpointing, compile_blocks)
        step = training_step(model, batch, seq_len, cfg.vocab_size)
        with guard_stance(step, compile_on and skip_guards):
            seconds = time_steps(step, warmup, steps)
            row.update(measured(step, seconds, batch * seq_len, flops_per_token(impl, cfg, seq_len), peaks, profile))
    except torch.cuda.OutOfMemoryError:
        row.update(tok_s=None, step_ms=None, peak_gib=None, mfu=None, mfu_spec=None, error="out of memory")
    finally:
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return row


def measured(step: Callable[[], None], seconds: float, tokens: int, flops_per_token: float,
             peaks: tuple[float, float], profile: bool) -> dict:  # fmt: skip
    """A row's numbers from its step's median `seconds` for `tokens` tokens: tok/s, step ms, peak memory,
    MFU against the measured and the spec-sheet peak; with `profile`, one more step's kernels and their
    device time, and its host operators (`benchmarks.profiling`)."""
    achieved = flops_per_token * tokens / seconds
    numbers = dict(tok_s=round(tokens / seconds), step_ms=round(seconds * 1e3, 1),
                   peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                   mfu=round(achieved / (peaks[0] * 1e12), 4), mfu_spec=round(achieved / (peaks[1] * 1e12), 4))
    if profile:
        kernels = count_kernels(step, torch.device("cuda"))
        numbers.update(kernels=kernels["kernels"], kernel_ms=round(kernels["kernel_ms"], 1), top_kernels=kernels["top_kernels"],
                       host=host_summary(step, torch.device("cuda")))  # fmt: skip
    return numbers


def guard_stance(step: Callable[[], None], skip: bool) -> contextlib.AbstractContextManager:
    """With `skip`, the compiled graphs' guards are no longer checked (`torch.compiler.set_stance`'s
    skip_guard_eval_unsafe) once one call of `step` has compiled every graph it needs: what the host
    saves per compiled call (Dynamo checks a block's guards, hundreds of them, before every forward).
    Sound here because a timed step never needs another graph; without `skip`, nothing changes."""
    if not skip:
        return contextlib.nullcontext()
    step()
    return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)


def compile_function(memory_budget: float = 1.0, options: Optional[dict] = None) -> Callable[[nn.Module], int]:
    """The trainer's own block compilation (`train.compile`, `train.activation_memory_budget`,
    `train.compile_options`)."""
    from train.compile import compile_blocks

    return functools.partial(compile_blocks, memory_budget=memory_budget, options=options)


def row_key(row: dict) -> tuple:
    return row["config"], row["T"], row["B"], row["checkpointing"], row["compile"]


def transformer_rows(rows: list[dict]) -> dict[tuple, dict]:
    """The transformer's rows by `row_key`: the row each tttla row is compared with."""
    return {row_key(r): r for r in rows if r["impl"] == "sdpa"}


def add_ratios(rows: list[dict]) -> None:
    """tok/s and memory of each tttla row over the transformer's row of the same size, context and settings."""
    baseline = transformer_rows(rows)
    for row in rows:
        other = baseline.get(row_key(row))
        if row["impl"] != "sdpa" and other and row["tok_s"] and other["tok_s"]:
            row["speedup_vs_sdpa"] = round(row["tok_s"] / other["tok_s"], 2)
            row["memory_vs_sdpa"] = round(row["peak_gib"] / other["peak_gib"], 2)


def add_ceilings(rows: list[dict]) -> None:
    """For each tttla row without recomputation that has a transformer row beside it: the mixer's parts
    timed alone at its shapes (`components`), the speed-up they allow (`ceiling`) and the share of it
    reached (`of_ceiling`)."""
    from benchmarks.components import ceiling, mixer_parts_ms

    parts_by_shape: dict[tuple, dict[str, float]] = {}
    baseline = transformer_rows(rows)
    for row in rows:
        other = baseline.get(row_key(row))
        if row["impl"] == "sdpa" or row["checkpointing"] != "none" or "speedup_vs_sdpa" not in row:
            continue
        shape = (row["impl"], row["config"], row["T"], row["B"])
        if shape not in parts_by_shape:
            size, *overrides = row["config"].split()
            parts_by_shape[shape] = mixer_parts_ms(model_config(row["impl"], size, tuple(overrides)), row["B"], row["T"])
        row.update(parts_by_shape[shape])
        row["ceiling"] = round(ceiling(other["step_ms"], parts_by_shape[shape]), 2)
        row["of_ceiling"] = round(row["speedup_vs_sdpa"] / row["ceiling"], 3)


def markdown(rows: list[dict], peaks: tuple[float, float], commands: list[str], device: str) -> str:
    lines = [f"# Training step, one {device}", ""]
    lines += [f"`{command}`" for command in commands]
    lines += ["", f"bf16 matmul peak measured in the last run: {peaks[0]:.0f} TFLOP/s (spec sheet {peaks[1]:.0f}).",
              "Forward + backward + fused AdamW step, bf16 autocast, median of the timed steps. `ceiling`: the",
              "speed-up over the transformer that tttla would reach if only the mixer differed (full attention",
              "replaced by the window and the TTT branch, each timed alone: `benchmarks/components.py`);",
              "`of ceiling`: the share of it reached.",
              "",
              "| impl | config | T x B | checkpointing | compile | tok/s | step ms | peak GiB | MFU (measured / spec peak) "
              "| vs sdpa (speed, memory) | attention / window / TTT branch ms | ceiling | of ceiling |",
              "|---|---|---|---|---|---:|---:|---:|---:|---|---|---:|---:|"]  # fmt: skip
    for r in rows:
        if r["tok_s"] is None:
            cells = f"{r.get('error')} | | | | | | |"
        else:
            ratio = f"{r['speedup_vs_sdpa']}x, {r['memory_vs_sdpa']}x" if "speedup_vs_sdpa" in r else ""
            parts = f"{r['attention_ms']} / {r['window_ms']} / {r['ttt_branch_ms']}" if "ceiling" in r else ""
            ceiling_cells = f"{r['ceiling']}x | {r['of_ceiling']:.0%}" if "ceiling" in r else " | "
            cells = (f"{r['tok_s']:,} | {r['step_ms']} | {r['peak_gib']} | {r['mfu']:.1%} / {r['mfu_spec']:.1%} | {ratio} "
                     f"| {parts} | {ceiling_cells}")  # fmt: skip
        lines.append(f"| {r['impl']} | {r['config']} | {r['T']} x {r['B']} | {r['checkpointing']} | {r['compile']} | {cells} |")
    return "\n".join(lines + device_time_lines(rows)) + "\n"


def device_time_lines(rows: list[dict]) -> list[str]:
    """For the profiled rows: one step's kernels and their summed device time against its wall time."""
    profiled = [r for r in rows if r.get("kernel_ms") is not None and r.get("step_ms")]
    lines = ["", "One profiled step (`--profile`): its kernels' summed device time against the step's wall time.", ""]
    lines += [f"* {r['impl']} {r['config']} {r['T']} x {r['B']}: {r['kernels']} kernels, {r['kernel_ms']} ms of "
              f"{r['step_ms']} ms ({r['kernel_ms'] / r['step_ms']:.0%}){host_ops_clause(r.get('host', {}), 4)}" for r in profiled]  # fmt: skip
    return lines if profiled else []


def parse_seq(text: str) -> tuple[int, int]:
    seq_len, _, batch = text.partition("x")
    return int(seq_len), int(batch or 1)


# Each preset fits in about 8 minutes on one H100 and is merged into the same results file.
PRESETS = {
    "125m": dict(configs=["125m"], seqs=["16384x1", "65536x1"], impls=["tttla", "sdpa"], checkpointing=["none"]),
    "760m": dict(configs=["760m"], seqs=["16384x1"], impls=["tttla", "tttla_recurrent", "sdpa"], checkpointing=["none"]),
    "long": dict(configs=["125m"], seqs=["131072x1"], impls=["tttla", "sdpa"], checkpointing=["none"]),
    "selective": dict(configs=["125m"], seqs=["16384x1", "65536x1"], impls=["tttla", "sdpa"],
                      checkpointing=["none", "selective"]),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a set of rows (overrides the four lists below)")
    parser.add_argument("--configs", nargs="+", default=["125m", "350m", "760m"])
    parser.add_argument("--seqs", nargs="+", default=["4096x4", "16384x1", "65536x1"], help="T x B")
    parser.add_argument("--impls", nargs="+", default=["tttla", "tttla_recurrent", "sdpa"])
    parser.add_argument("--checkpointing", nargs="+", default=["none", "full"], choices=["none", *CHECKPOINT_POLICIES])
    parser.add_argument("--compile", choices=["on", "off"], default="on")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--no-ceiling", action="store_true", help="skip timing the mixer's parts alone")
    parser.add_argument("--model-overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="model config overrides for every row, e.g. ttt.save_feature_projections=false")
    parser.add_argument("--also-with", nargs="*", default=[], metavar="KEY=VALUE",
                        help="measure each tttla row a second time with these model overrides added, right after "
                             "it in the same process (an A/B of one setting, free of the drift between runs)")
    parser.add_argument("--memory-budget", type=float, default=1.0,
                        help="train.activation_memory_budget of the compiled blocks, every row (1: the default partitioner)")
    parser.add_argument("--inductor", nargs="*", default=[], metavar="KEY=VALUE",
                        help="Inductor config for every compiled row, e.g. cpp_wrapper=True (launches kernels from C++, "
                             "less host time a kernel) or triton.cudagraphs=True")
    parser.add_argument("--skip-guards", action="store_true",
                        help="after one step has compiled every graph, stop checking the compiled blocks' guards "
                             "(torch.compiler.set_stance skip_guard_eval_unsafe): what Dynamo's guards cost the host")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one step of each row: its kernels and their summed device time")
    parser.add_argument("--out", default="docs/bench/train_step", help="results file stem; rows merge into it")
    args = parser.parse_args()
    if args.preset:
        vars(args).update(PRESETS[args.preset])
    return args


def measure_all(args: argparse.Namespace, peaks: tuple[float, float]) -> list[dict]:
    rows = []
    for size in args.configs:
        for text in args.seqs:
            seq_len, batch = parse_seq(text)
            for checkpointing in args.checkpointing:
                for impl in args.impls:
                    if impl == "tttla_recurrent" and not (CONFIG_DIR / f"lact_{size}.yaml").exists():
                        continue
                    for overrides in override_sets(impl, args.model_overrides, args.also_with):
                        row = measure_row(impl, size, seq_len, batch, checkpointing, args.compile == "on", peaks, args.warmup,
                                          args.steps, overrides, args.memory_budget, args.profile, tuple(args.inductor),
                                          args.skip_guards)  # fmt: skip
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    return rows


def override_sets(impl: str, overrides: list[str], also_with: list[str]) -> list[tuple[str, ...]]:
    """The model overrides an implementation's row is measured at: the run's, and for tttla (the model
    the settings belong to) the run's plus `--also-with`."""
    sets = [tuple(overrides)]
    if also_with and impl == "tttla":
        sets.append((*overrides, *also_with))
    return sets


def merge_results(path: Path, rows: list[dict], command: str) -> tuple[list[dict], list[str]]:
    """This run's rows over those already in `path` (a row of the same impl, size, context and settings is
    replaced), and the commands that produced them."""
    earlier = json.loads(path.read_text()) if path.is_file() else {"rows": [], "commands": []}
    fresh = {(r["impl"], *row_key(r)) for r in rows}
    kept = [r for r in earlier["rows"] if (r["impl"], *row_key(r)) not in fresh]
    commands = [c for c in earlier.get("commands", []) if c != command] + [command]
    return kept + rows, commands


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces these rows (a preset by name), for the results file."""
    if args.preset:
        words = [f"--preset {args.preset}"]
    else:
        words = [f"--{k} {' '.join(v) if isinstance(v, list) else v}" for k, v in vars(args).items()
                 if k not in ("out", "preset", "no_ceiling", "model_overrides", "memory_budget", "also_with", "profile",
                              "inductor", "skip_guards")]  # fmt: skip
    if args.memory_budget < 1:
        words.append(f"--memory-budget {args.memory_budget}")
    if args.model_overrides:
        words.append("--model-overrides " + " ".join(args.model_overrides))
    if args.also_with:
        words.append("--also-with " + " ".join(args.also_with))
    if args.inductor:
        words.append("--inductor " + " ".join(args.inductor))
    if args.skip_guards:
        words.append("--skip-guards")
    return " ".join(["python -m benchmarks.step", *words])


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.step: needs a CUDA device (it measures the GPU training step)")
    name = torch.cuda.get_device_name()
    peaks = (matmul_peak_tflops(), next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), 989.0))
    rows = measure_all(args, peaks)
    add_ratios(rows)
    if not args.no_ceiling:
        add_ceilings(rows)
    command = command_line(args)
    path = Path(f"{args.out}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    rows, commands = merge_results(path, rows, command)
    path.write_text(json.dumps(dict(device=name, peak_tflops=peaks, commands=commands, rows=rows), indent=1))
    table = markdown(rows, peaks, commands, name)
    Path(f"{args.out}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
