"""`python -m benchmarks.window_attention`: the sliding window's kernel choices, timed beside full attention.

The window is the part of a tttla block the transformer does not have besides the TTT branch, and at
16K it costs as much per FLOP as about twice full causal attention (`benchmarks.components`). This
times, forward + backward at the model's shapes, in one process on one GPU:

    sdpa_causal        causal SDPA over the whole sequence (the transformer's attention; the per-FLOP yardstick)
    flex_window        FlexAttention over the band's block mask, as `model.swa` runs it
    flex_window[...]   the same with FlexAttention kernel options (block sizes, warps, stages, TMA, mask hints)
    flex_autotune      the same compiled with Inductor's max-autotune (the best FlexAttention config it finds)
    fla_window         fla's Triton attention with its window argument (`fla.ops.attn.parallel_attn`), if installed
    triton_window      this project's kernels (`kernels.window_attention`): the band as loop bounds, no block mask

Each row: milliseconds, TFLOP/s over the pairs it really attends (4 * pairs * head_dim a forward, 2.5x
that backward) and its largest deviation from `flex_window` in the output and the three input
gradients, so a fast option that computes something else shows up at once.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from benchmarks.trainer_overhead import time_step
from model.swa import window_block_mask

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # [B, T, A, Dh] -> [B, T, A, Dh]

# Option sets tried by default; every key is a FlexAttention kernel option
# (torch.nn.attention.flex_attention.FlexKernelOptions). The band's rows always hold their own key and
# its blocks are contiguous, so the first two sets' hints hold for the model's mask.
OPTION_SETS = (
    {"ROWS_GUARANTEED_SAFE": True, "BLOCKS_ARE_CONTIGUOUS": True},
    {"ROWS_GUARANTEED_SAFE": True, "BLOCKS_ARE_CONTIGUOUS": True, "PRESCALE_QK": True},
    {"USE_TMA": True},
    {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3},
    {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 128, "fwd_num_warps": 8, "fwd_num_stages": 2},
    {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 64,
     "bwd_num_warps": 8, "bwd_num_stages": 2},
    {"bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 32,
     "bwd_num_warps": 4, "bwd_num_stages": 3},
)


def window_pairs(seq_len: int, window: int) -> int:
    """(query, key) pairs a causal window attends: t + 1 for the first `window` queries, `window` after."""
    head = min(seq_len, window)
    return head * (head + 1) // 2 + (seq_len - head) * window


def tflops(pairs: int, batch: int, heads: int, head_dim: int, ms: float) -> float:
    """Forward (QK^T and PV: 4 * pairs * Dh) plus backward (2.5x), per second, in TFLOP/s."""
    return 3.5 * 4 * pairs * batch * heads * head_dim / (ms * 1e-3) / 1e12


def sdpa_causal() -> Attend:
    return torch.compile(lambda q, k, v: F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True).transpose(1, 2))


def flex_window(mask, options: Optional[dict] = None, mode: Optional[str] = None) -> Attend:
    from torch.nn.attention.flex_attention import flex_attention

    def attend(q, k, v):
        out = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask,
                             kernel_options=options)
        return out.transpose(1, 2)

    return torch.compile(attend, dynamic=False, mode=mode)


def fla_window(window: int) -> Optional[Attend]:
    try:
        from fla.ops.attn.parallel import parallel_attn
    except ImportError:
        return None
    return lambda q, k, v: parallel_attn(q, k, v, window_size=window)


def median_ms(attend: Attend, q, k, v, warmup: int = 2, steps: int = 5) -> float:
    """Median milliseconds of one forward + backward (a cotangent of ones)."""

    def step() -> None:
        out = attend(q, k, v)
        if out.requires_grad:
            out.backward(torch.ones_like(out))

    return 1e3 * time_step(step, q.device, warmup, steps)


def triton_window(window: int) -> Attend:
    from kernels.window_attention import window_attention

    return lambda q, k, v: window_attention(q, k, v, window)


def run_once(attend: Attend, q, k, v) -> list[torch.Tensor]:
    """The output and the gradients of q, k, v for a fixed random cotangent (the output alone where the
    inputs take no gradient: the CPU smoke test, FlexAttention having no CPU backward)."""
    out = attend(q, k, v)
    if not out.requires_grad:
        return [out.float()]
    for x in (q, k, v):
        x.grad = None
    out.backward(torch.ones_like(out).normal_(generator=torch.Generator(out.device).manual_seed(1)))
    return [out.detach().float(), *(x.grad.float() for x in (q, k, v))]


def deviation(results: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    return max((a - b).abs().max().item() for a, b in zip(results, reference))


def measure(name: str, attend: Attend, q, k, v, reference: Optional[list[torch.Tensor]], pairs: int) -> dict:
    try:
        results = run_once(attend, q, k, v)
        ms = median_ms(attend, q, k, v)
    except Exception as error:  # an option this GPU or torch build rejects is a row, not the end of the sweep
        return {"variant": name, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
    batch, _, heads, head_dim = q.shape
    row = {"variant": name, "ms": round(ms, 3), "tflops": round(tflops(pairs, batch, heads, head_dim, ms), 1)}
    if reference is not None:
        row["max_deviation"] = deviation(results, reference)
    return row


def main(argv: Optional[list[str]] = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--no-autotune", action="store_true", help="skip the max-autotune row (it compiles for minutes)")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of the script (FlexAttention's eager path)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch._dynamo.config.recompile_limit = 64
    shape = (args.batch, args.seq_len, args.heads, args.head_dim)
    cuda = args.device.startswith("cuda")
    q, k, v = (torch.randn(shape, device=args.device, dtype=torch.bfloat16 if cuda else torch.float32,
                           requires_grad=cuda) for _ in range(3))
    mask = window_block_mask(args.seq_len, args.window, q.device)
    window, full = window_pairs(args.seq_len, args.window), window_pairs(args.seq_len, args.seq_len)
    rows = [measure("sdpa_causal", sdpa_causal(), q, k, v, None, full)]
    print(json.dumps(rows[-1]), flush=True)
    reference = run_once(flex_window(mask), q, k, v)
    variants: list[tuple[str, Optional[Attend]]] = [("flex_window", flex_window(mask)),
                                                    ("triton_window", triton_window(args.window))]
    variants += [(f"flex_window{json.dumps(options, separators=(',', ':'))}", flex_window(mask, options))
                 for options in OPTION_SETS]
    if not args.no_autotune:
        variants.append(("flex_autotune", flex_window(mask, mode="max-autotune-no-cudagraphs")))
    variants.append(("fla_window", fla_window(args.window)))
    for name, attend in variants:
        if attend is None:
            rows.append({"variant": name, "error": "not installed"})
        else:
            rows.append(measure(name, attend, q, k, v, reference, window))
        print(json.dumps(rows[-1]), flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        device = torch.cuda.get_device_name() if q.is_cuda else "cpu"
        report = {"args": vars(args) | {"out": str(args.out)}, "device": device, "rows": rows}
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
