"""Where the tttla training step's ceiling is: its sequence mixer's parts timed alone, beside full attention.

tttla and the transformer it is measured against (`model.baseline`) share everything but the mixer:
the transformer runs causal softmax attention over its heads; a tttla block runs sliding-window
attention over the same heads plus the TTT branch (its per-token inputs, the feature map and the
chunk scan, the head norm and gate). So if every other op ran as fast in tttla as in the
transformer, a tttla step would take

    step_transformer - attention + window + ttt_branch

and the ratio of the transformer's step to that is the speed-up the design allows at this size and
context (`ceiling`); what a row reaches of it (`of_ceiling`) measures everything else: glue, fusion,
memory traffic. Each part is timed forward + backward, compiled as the blocks are, at the row's
shapes, per layer and multiplied by the layer count; the q/k/v and output projections, which both
models run, are left out of all three.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from model.config import LMConfig
from model.layers import RotaryTables, shared_rotary_tables
from model.swa import sliding_window_attention, window_block_mask
from model.ttt_layer import RowPositions, TTTMixer


def median_ms(run: Callable[[], torch.Tensor], warmup: int = 2, steps: int = 5) -> float:
    """Median milliseconds of forward + backward of `run` (a cotangent of ones)."""
    times = []
    for i in range(warmup + steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = run()
        out.backward(torch.ones_like(out))
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def attention_inputs(cfg: LMConfig, batch: int, seq_len: int) -> tuple[torch.Tensor, ...]:
    """q, k, v [B, T, A, Dh] in bf16, leaves that take gradients."""
    shape = (batch, seq_len, cfg.num_attn_heads, cfg.hidden_size // cfg.num_attn_heads)
    return tuple(torch.randn(shape, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in range(3))


def full_attention_ms(cfg: LMConfig, batch: int, seq_len: int) -> float:
    """Causal SDPA over the transformer's heads, as `model.baseline.CausalAttention` calls it, all layers."""
    q, k, v = (t.transpose(1, 2) for t in attention_inputs(cfg, batch, seq_len))
    attend = torch.compile(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    return cfg.num_layers * median_ms(attend)


def window_ms(cfg: LMConfig, batch: int, seq_len: int) -> float:
    """The sliding window over the same heads, as a tttla mixer calls it (`model.window_kernel`; the LM's
    shared block mask for FlexAttention), all layers."""
    q, k, v = attention_inputs(cfg, batch, seq_len)
    mask = window_block_mask(seq_len, cfg.window_size, q.device) if cfg.window_kernel == "flex" else None
    attend = torch.compile(lambda: sliding_window_attention(q, k, v, cfg.window_size, block_mask=mask,
                                                            kernel=cfg.window_kernel))
    return cfg.num_layers * median_ms(attend)


def ttt_branch(mixer: TTTMixer, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               rope: Optional[RotaryTables] = None) -> torch.Tensor:
    """A mixer's fast-weight branch: x and its q/k/v projections [B, T, D] -> its gated, head-normed
    output [B, T, H, d] (what `TTTMixer.combine` adds to the window's output before o_proj); `rope`: the
    RoPE tables of positions 0 .. T - 1 as the LM shares them (None: the branch builds its own)."""
    inputs = mixer.ttt_inputs(x, q, k, v, rope=rope)
    out, _ = mixer.scan(mixer.scan_weights(), x, inputs, None, RowPositions(0, rope=rope))
    return mixer.gated_norm(out, inputs.output_scale)


def ttt_branch_ms(cfg: LMConfig, batch: int, seq_len: int) -> float:
    """`ttt_branch` under bf16 autocast with the model's fp32 parameters, compiled, all layers; the RoPE
    tables built once outside it, as the LM builds them for all layers."""
    mixer = TTTMixer(cfg).cuda()
    x, q, k, v = (torch.randn(batch, seq_len, cfg.hidden_size, device="cuda").requires_grad_() for _ in range(4))
    rope = shared_rotary_tables(torch.arange(seq_len, device="cuda"), cfg.hidden_size // cfg.num_attn_heads,
                                cfg.rope_theta, x.dtype)

    def branch() -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return ttt_branch(mixer, x, q, k, v, rope)

    return cfg.num_layers * median_ms(torch.compile(branch, fullgraph=True))


def mixer_parts_ms(cfg: LMConfig, batch: int, seq_len: int) -> dict[str, float]:
    """{attention_ms, window_ms, ttt_branch_ms} for one model size and context (whole model: all layers)."""
    return {
        "attention_ms": round(full_attention_ms(cfg, batch, seq_len), 2),
        "window_ms": round(window_ms(cfg, batch, seq_len), 2),
        "ttt_branch_ms": round(ttt_branch_ms(cfg, batch, seq_len), 2),
    }


def ceiling(transformer_step_ms: float, parts: dict[str, float]) -> float:
    """The transformer's step over the step tttla would take if only the mixer differed (module docstring)."""
    tttla_floor = transformer_step_ms - parts["attention_ms"] + parts["window_ms"] + parts["ttt_branch_ms"]
    return transformer_step_ms / tttla_floor
