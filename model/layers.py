"""Small building blocks shared by the blocks: RMSNorm, the SwiGLU MLP, rotary position embeddings."""

from __future__ import annotations

import functools

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

    The tables are a torch.library op, opaque to torch.compile, so a compiled block computes them once
    and reads them. Traced as plain ops, Inductor fused them into every element of the rotated
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


def rotary_range_tables(
    first: int, count: int, head_dim: int, theta: float, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rotary_tables` for the positions first .. first + count - 1 ([count, head_dim / 2] each): the
    case of a training step and a prefill, where every row starts at the same position.

    Such tables depend on ints alone, so they are built once per (first, count, ...) and each call
    copies them: two copies where the position op runs about ten small ops, every call again. A
    training step asks for them three times a layer (the window's heads, the fast-weight branch's,
    and that branch again where its inputs are recomputed for the backward), and on a short step the
    host's time per op is what the step waits for."""
    if count <= FUSED_TABLE_POSITIONS:
        return _range_tables(first, count, head_dim, float(theta), dtype, device)
    return _rotary_range_tables(first, count, head_dim, float(theta), dtype, device)


def _range_tables(
    first: int, count: int, head_dim: int, theta: float, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    return _tables(torch.arange(first, first + count, device=device), head_dim, theta, dtype)


@torch.library.custom_op("tttla::rotary_range_tables", mutates_args=())
def _rotary_range_tables(
    first: int, count: int, head_dim: int, theta: float, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = _built_range_tables(first, count, head_dim, theta, dtype, device)
    return cos.clone(), sin.clone()  # an op's outputs are its caller's: a compiled graph may write into them


# Ranges kept: a training run asks for one or two (its steps, its evaluation), a server for a few prompt
# lengths; each holds 2 x count x head_dim / 2 values on the device (32 MB at 128K tokens, head dim 64, fp32).
RANGE_TABLES_KEPT = 4
_built_range_tables = functools.lru_cache(maxsize=RANGE_TABLES_KEPT)(_range_tables)


@_rotary_range_tables.register_fake
def _(first: int, count: int, head_dim: int, theta: float, dtype: torch.dtype, device: torch.device):
    shape = (count, head_dim // 2)
    return torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device)


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
