"""The SwiGLU feature map h(x) = silu(W0 x) * (W2 x) as one GEMM over packed weights.

Both projections share the input, so W0 and W2 are stacked into one [H, 2 dh, d] weight and
multiplied once (cuBLAS through torch); the gate and product are one fused elementwise kernel
when compiled. docs/kernels.md measures what this costs inside the layer op.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F


def pack_swiglu_weights(w0: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """w0, w2: [H, dh, d] -> [H, 2 dh, d] (gate rows first)."""
    return torch.cat([w0, w2], dim=1)


def swiglu_features_packed(x: torch.Tensor, w02: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, d]; w02: [H, 2 dh, d] from `pack_swiglu_weights`. Returns h(x) [B, T, H, dh]."""
    projected = torch.einsum("bthd,hed->bthe", x, w02)  # [B, T, H, 2 dh]
    gate, value = projected.chunk(2, dim=-1)
    return F.silu(gate) * value


@lru_cache(maxsize=None)
def compiled_swiglu_features():
    """`swiglu_features_packed` through torch.compile (the GEMM stays cuBLAS, the epilogue fuses)."""
    return torch.compile(swiglu_features_packed)
