"""`torchrun --nproc_per_node=2 -m benchmarks.sequence_parallel`: what sequence parallelism costs and buys.

Writes sp.json and sp.md under --out (default docs/bench), one row per measurement:

* weak scaling (fixed tokens per GPU) and strong scaling (fixed total length), sp = 1 vs 2, parallel
  form: one mixer's forward + backward (`layer_fwdbwd_ms`), a full training step of the model with
  activation checkpointing (`step_ms`), the communication alone (`comm_ms`: state all-gather, its
  reduce-scatter and the window halo both ways) and its share of the layer time (`comm_frac`), and
  the bytes one rank receives in the state all-gather of one layer (`bytes_per_layer`);
* the serial ring of the recurrent form (all fast weights, weight norm, momentum) at sp = 2 against
  the parallel form at the same length, and both at sp = 1;
* `max_context`: the longest total context one training step fits (parallel form, activation
  checkpointing, AdamW), from the peak memory at two lengths (memory is affine in the length),
  which avoids out-of-memory failures halfway through a collective.

With sp = 1 every rank runs whole sequences (dp = world); --sp picks the degrees (default 1 and the
world size; `--sp 1,4,8` on 8 GPUs adds the dp = 2 x sp = 4 layout). Timings are rank 0's, medians
of --iters.
On GPUs it runs NCCL in bf16 at the 760M shape (configs/model/760m.yaml with model.ttt.mode=linear_attention
fast_weights=w1 weight_norm=false); `--quick` runs a tiny shape on CPU with gloo as a smoke test.
Keep NCCL_NVLS_ENABLE=0 in the environment on NVLink hosts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import torch.distributed as dist

from model.config import LMConfig, TTTConfig, load_model_config
from model.lm import TTTLM
from model.ttt_layer import TTTMixer
from parallel.activation_checkpointing import checkpoint_blocks
from parallel.activation_checkpointing import checkpoint_blocks
from parallel.collectives import all_gather_flat, reduce_scatter_flat
from parallel.groups import ParallelDims, slice_sequence
from parallel.layout import SliceLayout
from parallel.p2p import exchange_rows
from parallel.ring import state_bytes
from parallel.sequence_parallel import SequenceParallelLM
from parallel.sliced_mixer import SliceContext, slice_mixers

PARALLEL_760M = ["ttt.mode=linear_attention", "ttt.fast_weights=w1", "ttt.weight_norm=false"]


@dataclass
class Setting:
    """Shapes of one benchmark run."""

    cfg: LMConfig  # the model (parallel form)
    weak_tokens_per_rank: list[int]
    strong_total: list[int]
    ring_total: int
    memory_probe_total: tuple[int, int]  # two lengths whose peak memory fixes the affine fit
    batch: int = 1


def quick_setting() -> Setting:
    cfg = LMConfig(
        vocab_size=256, hidden_size=64, num_layers=2, num_attn_heads=2, window_size=16,
        ttt=TTTConfig(num_heads=2, chunk_size=16, momentum=True),
    )  # fmt: skip
    return Setting(cfg, [64, 128], [256], 128, (64, 128))


def gpu_setting() -> Setting:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_model_config(os.path.join(root, "configs/model/760m.yaml"), PARALLEL_760M)
    return Setting(cfg, [16384, 65536], [65536, 131072], 16384, (16384, 32768))


def ring_config(cfg: LMConfig) -> LMConfig:
    """The same shape in LaCT's recurrent form: all fast weights, weight norm, momentum."""
    ttt = replace(cfg.ttt, mode="recurrent", fast_weights="all", weight_norm=True, momentum=True)
    return replace(cfg, ttt=ttt)


class Timer:
    def __init__(self, device: torch.device, iters: int) -> None:
        self.device, self.iters = device, iters

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def median_ms(self, run: Callable[[], None], group: Optional[dist.ProcessGroup] = None) -> float:
        """Median wall time of `run` over the iterations, after one warm-up; ranks start together."""
        run()
        samples = []
        for _ in range(self.iters):
            self.sync()
            dist.barrier(group=group)
            start = time.perf_counter()
            run()
            self.sync()
            samples.append(1e3 * (time.perf_counter() - start))
        return statistics.median(samples)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def mixer_runner(
    cfg: LMConfig, dims: ParallelDims, tokens_per_rank: int, batch: int, device: torch.device
) -> Callable[[], None]:
    """One mixer's forward + backward on this rank's slice (split across the sp group when sp > 1)."""
    torch.manual_seed(0)
    mixer = TTTMixer(cfg).to(device)
    position = 0
    if dims.sp > 1:
        context = SliceContext(dims, SliceLayout.build(tokens_per_rank, cfg, dims))
        slice_mixers(mixer, context)
        position = context.layout.start
    x = torch.randn(batch, tokens_per_rank, cfg.hidden_size, device=device, requires_grad=True)
    probe = torch.randn_like(x)

    def run() -> None:
        with autocast(device):
            out, _ = mixer(x, None, position)
        out.float().backward(probe)

    return run


def comm_runner(cfg: LMConfig, dims: ParallelDims, batch: int, device: torch.device) -> Callable[[], None]:
    """The communication of one split mixer, forward and backward, without the compute around it."""
    flat = torch.zeros(gathered_bytes(cfg, dims, batch) // (4 * dims.sp), device=device)
    gathered = flat.new_empty(dims.sp * flat.numel())
    halo_rows = cfg.window_size - 1
    attn_dim = cfg.hidden_size // cfg.num_attn_heads
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    halo = torch.zeros(batch, halo_rows, cfg.num_attn_heads, 2 * attn_dim, device=device, dtype=dtype)

    def run() -> None:
        all_gather_flat(gathered, flat, group=dims.sp_group)
        reduce_scatter_flat(flat, gathered, group=dims.sp_group)
        exchange_rows(halo, halo_rows, +1, dims)
        exchange_rows(halo, halo_rows, -1, dims)

    return run


def gathered_bytes(cfg: LMConfig, dims: ParallelDims, batch: int) -> int:
    """Bytes of the all-gathered state maps of one layer: sp x B x H x d x dh x 4 (x2 with momentum)."""
    heads, d, dh = cfg.ttt.num_heads, cfg.ttt.resolved_head_dim(cfg.hidden_size), cfg.ttt.resolved_inner_dim(cfg.hidden_size)
    per_rank = batch * heads * d * dh * (2 if cfg.ttt.momentum else 1) + (2 * batch * heads if cfg.ttt.momentum else 0)
    return dims.sp * per_rank * 4


def step_runner(
    cfg: LMConfig, dims: ParallelDims, total: int, batch: int, device: torch.device, optimizer_step: bool
) -> Callable[[], None]:
    """One training step of the whole model on this rank's slice, with activation checkpointing."""
    torch.manual_seed(0)
    model = TTTLM(cfg).to(device)
    checkpoint_blocks(model)
    wrapped = SequenceParallelLM(model, dims)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4) if optimizer_step else None
    tokens = torch.randint(0, cfg.vocab_size, (batch, total + 1), device=device)
    inputs, targets = (slice_sequence(t, dims) for t in (tokens[:, :-1], tokens[:, 1:]))

    def run() -> None:
        with autocast(device):
            out = wrapped(inputs, targets, return_logits=False)
        out.loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return run


def peak_memory_bytes(run: Callable[[], None], device: torch.device) -> int:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    run()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def max_context(setting: Setting, dims: ParallelDims, device: torch.device) -> int:
    """Longest total length one training step fits: an affine fit of peak memory over two lengths,
    rounded down to whole chunks per rank (the worst rank counts)."""
    short, long = setting.memory_probe_total
    peaks = []
    for total in (short, long):
        run = step_runner(setting.cfg, dims, total, setting.batch, device, optimizer_step=True)
        run()  # optimizer state exists from the second step on
        peaks.append(peak_memory_bytes(run, device))
        del run
    worst = torch.tensor(peaks, dtype=torch.float64, device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    per_token = (worst[1] - worst[0]).item() / (long - short)
    budget = 0.95 * torch.cuda.get_device_properties(device).total_memory
    fitting = short + (budget - worst[0].item()) / per_token
    granule = dims.sp * setting.cfg.ttt.chunk_size
    return int(fitting // granule * granule)


def row(impl: str, dims: ParallelDims, total: int, device_name: str, **values) -> dict:
    fields = dict(layer_fwdbwd_ms=None, step_ms=None, comm_ms=None, comm_frac=None, bytes_per_layer=None, max_context=None)
    fields.update(values)
    return dict(impl=impl, sp=dims.sp, dp=dims.dp, T_total=total, T_per_rank=total // dims.sp, **fields, device=device_name)


def scaling_rows(setting: Setting, grids: dict[int, ParallelDims], timer: Timer, device: torch.device, name: str) -> list[dict]:
    cfg, batch = setting.cfg, setting.batch
    cases = [(sp, tokens * sp) for tokens in setting.weak_tokens_per_rank for sp in grids]
    cases += [(sp, total) for total in setting.strong_total for sp in grids]
    rows = []
    for sp, total in cases:
        dims = grids[sp]
        layer_ms = timer.median_ms(mixer_runner(cfg, dims, total // sp, batch, device))
        step_ms = timer.median_ms(step_runner(cfg, dims, total, batch, device, optimizer_step=False))
        comm_ms = bytes_moved = comm_frac = None
        if sp > 1:
            comm_ms = timer.median_ms(comm_runner(cfg, dims, batch, device), dims.sp_group)
            bytes_moved, comm_frac = gathered_bytes(cfg, dims, batch), comm_ms / layer_ms
        rows.append(row("parallel", dims, total, name, layer_fwdbwd_ms=layer_ms, step_ms=step_ms,
                        comm_ms=comm_ms, comm_frac=comm_frac, bytes_per_layer=bytes_moved))  # fmt: skip
    return rows


def ring_rows(setting: Setting, grids: dict[int, ParallelDims], timer: Timer, device: torch.device, name: str) -> list[dict]:
    recurrent = ring_config(setting.cfg)
    total, batch, rows = setting.ring_total, setting.batch, []
    for sp, dims in grids.items():
        for impl, cfg in (("parallel", setting.cfg), ("recurrent_ring" if sp > 1 else "recurrent", recurrent)):
            layer_ms = timer.median_ms(mixer_runner(cfg, dims, total // sp, batch, device))
            moved = None
            if sp > 1:
                template = TTTMixer(cfg).initial_state(batch)
                moved = state_bytes(template, cfg.ttt.momentum) if impl == "recurrent_ring" else gathered_bytes(cfg, dims, batch)
            rows.append(row(impl, dims, total, name, layer_fwdbwd_ms=layer_ms, bytes_per_layer=moved))
    return rows


def markdown(rows: list[dict]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for entry in rows:
        cells = [f"{value:.4g}" if isinstance(value, float) else ("" if value is None else str(value)) for value in entry.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes on CPU with gloo (smoke test)")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", default="docs/bench", help="folder for sp.json and sp.md")
    parser.add_argument("--sp", default=None, help="comma-separated sp degrees, each dividing the world (default: 1,WORLD)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.quick
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    world = dist.get_world_size()
    degrees = sorted({1, world} if args.sp is None else {int(sp) for sp in args.sp.split(",")})
    grids = {sp: ParallelDims.build(sp, device) for sp in degrees}
    setting = gpu_setting() if cuda else quick_setting()
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    timer = Timer(device, args.iters)
    rows = scaling_rows(setting, grids, timer, device, name) + ring_rows(setting, grids, timer, device, name)
    if cuda:
        for dims in grids.values():
            longest = max_context(setting, dims, device)
            rows.append(row("parallel", dims, longest, name, max_context=longest))
    if dist.get_rank() == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "sp.json"), "w") as handle:
            json.dump(rows, handle, indent=1)
        with open(os.path.join(args.out, "sp.md"), "w") as handle:
            handle.write(markdown(rows))
        print(markdown(rows))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
