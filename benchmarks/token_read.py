"""Token-read benchmark: `python -m benchmarks.token_read [--quick] [--batches 1 8 64] [--out FILE]`.

A decoder that keeps the partial chunk as pending tokens reads each layer's fast weight once per token,
o = W1 h(q) with h(q) = silu(W0 q) * (W2 q) (`kernels.token_step.w1_token_read`). Through the token-step
kernel (without G1), each program recomputing one token's h(q) for its block of W1's rows from the learned
W0, W2, it took 39 us a layer at batch 64 on an H100 (125M: 4 heads, d = dh = 192), 3.5x the time to read
W1 once (37.7 MB in fp32), and a batch-64 decode step runs it 12 times. The read kernel
(`w1_token_read_kernel`) forms h(q) for 16 tokens a program on the tensor cores instead. This times, at a
model's TTT shape and each batch, one call replayed from a CUDA graph (as the decoder runs it):

  kernel             the read kernel at its defaults (`w1_token_read_op`)
  kernel_keys        the same also forming the key's features h(k), as a pending-token decoder runs it
                     (`w1_token_read_keys_op`; q stands in for k)
  kernel_rowsR       the same with R state rows a program per token (`READ_STATE_ROWS`)
  step_kernel_RxC    the token-step kernel's read, R state rows and C feature columns a program (`KERNEL_TILES`)
  torch              its torch form (`w1_token_read_reference`): h(q) as head-batched products, the read as
                     a batched matrix-vector product, four or five kernels
  torch_compiled     the same through torch.compile (Inductor fuses the gate)

beside `floor_us`, W1's bytes at the device's measured copy bandwidth (no read can beat it). Every
implementation's output is checked against the torch form first. `--quick` runs one small batch on
the CPU, for a check that the script works (the kernel too under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from pathlib import Path
from typing import Callable

import torch

from kernels.token_step import (w1_token_read_keys_op, w1_token_read_op, w1_token_read_reference, w1_token_read_rows,
                                w1_token_read_tiled)
from model.config import load_model_config

Read = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
CALLS_PER_GRAPH, REPLAYS = 20, 20
# The read kernel's state rows per token beside its default.
READ_STATE_ROWS = (16, 32, 64)
# The step kernel's (state rows, feature columns) per program: more rows recompute h(q) fewer times (a
# d = 192 state is three 64-row programs at batch 64), narrower columns keep the tiles in registers.
KERNEL_TILES = [(rows, columns) for rows in (64, 256) for columns in (32, 64)]


def implementations(device: torch.device) -> dict[str, Read]:
    """What runs on `device`: on the CPU the kernel only in Triton's interpreter (TRITON_INTERPRET=1, set
    before Triton is imported), and no Inductor build (minutes of C++ for a check)."""
    reads: dict[str, Read] = {"torch": w1_token_read_reference}
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        reads["kernel"] = w1_token_read_op
        reads["kernel_keys"] = read_with_key_features
        for rows in READ_STATE_ROWS:
            reads[f"kernel_rows{rows}"] = functools.partial(w1_token_read_rows, state_rows=rows)
        for rows, columns in KERNEL_TILES:
            reads[f"step_kernel_{rows}x{columns}"] = functools.partial(w1_token_read_tiled, tiles=(rows, columns))
    if device.type == "cuda":
        reads["torch_compiled"] = torch.compile(w1_token_read_reference, fullgraph=True)
    return reads


def read_with_key_features(q: torch.Tensor, w0: torch.Tensor, w2: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
    """The read of the kernel that also forms h(k) (q standing in for k): what it costs beside the read alone."""
    return w1_token_read_keys_op(q, q, w0, w2, w1)[0]


def read_inputs(batch: int, heads: int, d: int, dh: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """q [B, H, d] bf16 (fp32 on the CPU), the learned W0, W2 [H, dh, d] in the same dtype, W1 [B, H, d, dh] fp32."""
    generator = torch.Generator(device).manual_seed(batch)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    draw = lambda *shape, scale: (torch.randn(*shape, device=device, generator=generator) * scale)  # noqa: E731
    return (draw(batch, heads, d, scale=1.0).to(dtype), draw(heads, dh, d, scale=d**-0.5).to(dtype),
            draw(heads, dh, d, scale=d**-0.5).to(dtype), draw(batch, heads, d, dh, scale=dh**-0.5))  # fmt: skip


def replayed_us(read: Read, inputs: tuple[torch.Tensor, ...]) -> float:
    """Microseconds per call of `read`, `CALLS_PER_GRAPH` calls captured in one CUDA graph and replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the capture: compilation, autotuning, allocator pools
        for _ in range(3):
            read(*inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS_PER_GRAPH):
            read(*inputs)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPLAYS):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (REPLAYS * CALLS_PER_GRAPH)


def copy_bandwidth_gbs(device: torch.device) -> float:
    """GB/s of a 1 GiB device-to-device copy (read + write), the bandwidth a read of W1 can reach."""
    source = torch.empty(2**28, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        target.copy_(source)
    end.record()
    torch.cuda.synchronize()
    return 2 * source.numel() * 4 * 10 / (start.elapsed_time(end) * 1e-3) / 1e9


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def measure(batches: list[int], heads: int, d: int, dh: int, device: torch.device) -> list[dict]:
    """One row per batch: each implementation's error against the torch form and, on CUDA, its time."""
    bandwidth = copy_bandwidth_gbs(device) if device.type == "cuda" else None
    rows = []
    for batch in batches:
        inputs = read_inputs(batch, heads, d, dh, device)
        expected = w1_token_read_reference(*inputs)
        row = dict(batch=batch, heads=heads, d=d, dh=dh, w1_mb=round(inputs[3].numel() * 4 / 2**20, 2))
        if bandwidth is not None:
            row["floor_us"] = round(inputs[3].numel() * 4 / (bandwidth * 1e9) * 1e6, 2)
        for name, read in implementations(device).items():
            row[f"{name}_error"] = relative_error(read(*inputs), expected)
            if device.type == "cuda":
                row[f"{name}_us"] = round(replayed_us(read, inputs), 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/model/125m.yaml", help="the model whose TTT shape is timed")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16, 32, 64, 128])
    parser.add_argument("--quick", action="store_true", help="one batch of 2 on the CPU: the script's own check")
    parser.add_argument("--out", type=Path, help="write the rows here as JSON")
    args = parser.parse_args()
    cfg = load_model_config(args.config)
    heads, d, dh = cfg.ttt.num_heads, cfg.ttt.resolved_head_dim(cfg.hidden_size), cfg.ttt.resolved_inner_dim(cfg.hidden_size)
    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    rows = measure([2] if args.quick else args.batches, heads, d, dh, device)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(device=str(device), config=args.config, rows=rows), indent=1) + "\n")


if __name__ == "__main__":
    main()
