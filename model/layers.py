"""Small building blocks shared by the blocks: RMSNorm, the SwiGLU MLP, rotary position embeddings."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matrix product of x runs in: autocast's when it is on for x's device, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class SwiGLUMLP(nn.Module):
    """down(silu(gate(x)) * up(x)): the channel mixer of every block."""

    def __init__(self, hidden_size: int, inner_size: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(hidden_size, 2 * inner_size, bias=False)
        self.down = nn.Linear(inner_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def rotary_tables(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [..., head_dim / 2] for positions [T] (offsets allowed for decoding) or [B, T]
    (positions restarting at packed document starts). Angles are computed in float64 for a float64
    model (the proofs compare to 1e-10) and in float32 otherwise.

    Inside a model the LM builds them once per forward for all layers (`shared_rotary_tables`); a block
    or mixer called alone builds its own here. The tables are a torch.library op, opaque to
    torch.compile, so a compiled block computes them once and reads them. Traced as plain ops, Inductor fused them into every element of the rotated
    [T, heads, head_dim] q and k (and again in the backward) and evaluated the exponent, cosine and
    sine there once per head: precise fp32 cos/sin of angles up to the position count (a slow range
    reduction), about 220 us a kernel at 16K tokens on an H100, six kernels a layer. For a few positions
    (a decode step) that recomputation costs nothing and fusing it saves the op's own launches, so
    the tables stay plain ops there."""
    if positions.shape[-1] <= FUSED_TABLE_POSITIONS:
        return _tables(positions, head_dim, float(theta), dtype)
    return _rotary_tables(positions, head_dim, float(theta), dtype)


FUSED_TABLE_POSITIONS = 16  # up to this many positions a row, the tables are traced (and fused) as plain ops


def _tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=table_dtype) / head_dim
    angles = positions.to(table_dtype)[..., None] * (1.0 / theta**exponents)
    return angles.cos().to(dtype), angles.sin().to(dtype)


@torch.library.custom_op("tttla::rotary_tables", mutates_args=())
def _rotary_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return _tables(positions, head_dim, theta, dtype)


@_rotary_tables.register_fake
def _(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (*positions.shape, head_dim // 2)
    return positions.new_empty(shape, dtype=dtype), positions.new_empty(shape, dtype=dtype)


class RotaryTables(NamedTuple):
    """cos, sin [T, Dh/2] (or [B, T, Dh/2] where rows differ) of the rows' positions in the dtype of the
    model's activations (fp32 under autocast); each rotation casts them to its heads' dtype, the tables
    `rotary_tables` builds for those heads.

    The LM builds them once per forward for all its layers (`shared_rotary_tables`) and hands them to
    every block, a plain input of its compiled graph: a training step then computes them once instead of
    three times a layer (the window's heads, the fast-weight branch's, and that branch again where its
    inputs are recomputed for the backward), and a compiled block holds no op or cache of its own for
    them, so Inductor's CUDA graphs and its C++ launcher take the block as it is."""

    cos: torch.Tensor
    sin: torch.Tensor

    def to(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin in `dtype`, the heads' that a rotation multiplies them with."""
        return self.cos.to(dtype), self.sin.to(dtype)


def shared_rotary_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> Optional[RotaryTables]:
    """The tables of `positions` [T] or [B, T] for every layer of a model whose activations are `dtype`;
    None for a few positions a row (a decode step), where each block's graph fuses their computation
    into the rotation itself."""
    if positions.shape[-1] <= FUSED_TABLE_POSITIONS:
        return None
    return RotaryTables(*_tables(positions, head_dim, float(theta), dtype))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str = "half") -> torch.Tensor:
    """Rotate pairs of x [B, T, A, Dh] by the position angles ([T, Dh/2] or [B, T, Dh/2]).

    layout "half" pairs (x[i], x[i + Dh/2]) (fla's and flash-attn's RotaryEmbedding, which the released
    LaCT code uses); "interleaved" pairs (x[2i], x[2i+1]).
    """
    if layout == "half":
        first, second = x.chunk(2, dim=-1)
    else:
        first, second = x[..., 0::2], x[..., 1::2]
    cos, sin = (t.expand(x.shape[0], *t.shape[-2:])[:, :, None, :] for t in (cos, sin))
    rotated = (first * cos - second * sin, first * sin + second * cos)
    if layout == "half":
        return torch.cat(rotated, dim=-1)
    return torch.stack(rotated, dim=-1).flatten(-2)
