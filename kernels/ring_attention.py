"""Attention of one decoded token per row over its window's ring of keys and values, split over the ring.

A decoder keeps the window's rotated keys and values in a ring of W slots (slot = position % W, filled
in order from position 0), so a row at position p attends to the slots j <= p (all of them once p >=
W - 1). Through `scaled_dot_product_attention` with that mask, one program reads a whole head's ring:
at batch 1 that is a dozen programs each streaming W keys and values, most of the GPU idle, plus the
mask's own kernels. Here the ring is split (flash-decoding): program (row, head, split) scores its
slots against q and keeps a partial softmax (max, sum, weighted values); a second kernel merges a
head's splits. The split count grows as the batch shrinks, so every batch size reads the ring with
the whole GPU.

Per (row b, head a), with scale = Dh^-1/2 (SDPA's default):

  s_j = scale q . K_j for slots j <= positions[b],   out = sum_j softmax(s)_j V_j

`ring_attention_reference` is SDPA with that mask, the form the decoder ran before and runs where the
kernel does not (the CPU, float64).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.triton_utils import cdiv, new_buffer, next_power_of_2, use_triton

SLOT_TILE = 64  # ring slots a program scores at once
TARGET_PROGRAMS = 512  # splits per (row, head) are chosen to give at least about this many programs
# and to leave each program at most this many tiles: a program walks its tiles one after the other, so
# long walks leave the memory system idle (at batch 64 one split per head read the ring at about a
# third of the H100's bandwidth).
MAX_TILES_PER_PROGRAM = 4
LOG2E = 1.4426950408889634


@triton.jit
def ring_partial_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, m_ptr, l_ptr, acc_ptr, A, SPLITS, scale_log2,
    q_row, q_head, kv_row, kv_head, kv_slot,
    W: tl.constexpr, DH: tl.constexpr, BS: tl.constexpr, BDH: tl.constexpr, TILES: tl.constexpr,
):
    """q: [B, A, DH] (strides q_row, q_head, 1); k, v: [B, A, W, DH] (strides kv_*, 1); pos: [B];
    m, l: [B * A, SPLITS] fp32; acc: [B * A, SPLITS, DH] fp32. Program (b * A + a, split) owns
    TILES tiles of BS slots starting at split * TILES * BS."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    row, head = bh // A, bh % A
    last = tl.load(pos_ptr + row)  # slots j <= last are filled
    dims = tl.arange(0, BDH)
    dim_ok = dims < DH
    q = tl.load(q_ptr + row * q_row + head * q_head + dims, mask=dim_ok, other=0.0).to(tl.float32)
    base = row.to(tl.int64) * kv_row + head * kv_head
    m = tl.full([], float("-inf"), tl.float32)
    l = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([BDH], dtype=tl.float32)
    for t in range(TILES):
        slots = (split * TILES + t) * BS + tl.arange(0, BS)
        slot_ok = (slots < W) & (slots <= last)
        offsets = base + slots[:, None] * kv_slot + dims[None, :]
        tile_ok = slot_ok[:, None] & dim_ok[None, :]
        keys = tl.load(k_ptr + offsets, mask=tile_ok, other=0.0).to(tl.float32)
        scores = tl.where(slot_ok, tl.sum(keys * q[None, :], axis=1) * scale_log2, float("-inf"))  # log2 units
        m_new = tl.maximum(m, tl.max(scores, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no filled slot yet: keep every weight 0
        p = tl.exp2(scores - m_safe)
        correction = tl.exp2(m - m_safe)
        values = tl.load(v_ptr + offsets, mask=tile_ok, other=0.0).to(tl.float32)
        acc = acc * correction + tl.sum(p[:, None] * values, axis=0)
        l = l * correction + tl.sum(p, axis=0)
        m = m_new
    part = bh * SPLITS + split
    tl.store(m_ptr + part, m)
    tl.store(l_ptr + part, l)
    tl.store(acc_ptr + part * DH + dims, acc, mask=dim_ok)


@triton.jit
def ring_merge_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, SPLITS, DH: tl.constexpr, BDH: tl.constexpr,
                      BSPLIT: tl.constexpr):
    """Merge one (row, head)'s partial softmaxes: out [B * A, DH] (out's dtype) = sum 2^(m_i - M) acc_i
    / sum 2^(m_i - M) l_i. Slot 0 is always filled, so some split has a finite m."""
    bh = tl.program_id(0)
    splits = tl.arange(0, BSPLIT)
    split_ok = splits < SPLITS
    dims = tl.arange(0, BDH)
    dim_ok = dims < DH
    m = tl.load(m_ptr + bh * SPLITS + splits, mask=split_ok, other=float("-inf"))
    l = tl.load(l_ptr + bh * SPLITS + splits, mask=split_ok, other=0.0)
    top = tl.max(m, axis=0)
    weight = tl.where(m == float("-inf"), 0.0, tl.exp2(m - top))
    acc = tl.load(acc_ptr + (bh * SPLITS + splits)[:, None] * DH + dims[None, :],
                  mask=split_ok[:, None] & dim_ok[None, :], other=0.0)
    out = tl.sum(weight[:, None] * acc, axis=0) / tl.sum(weight * l, axis=0)
    tl.store(out_ptr + bh * DH + dims, out.to(out_ptr.dtype.element_ty), mask=dim_ok)


def split_count(rows_x_heads: int, window: int) -> int:
    """Splits of the ring per (row, head): about TARGET_PROGRAMS programs in all and at most
    MAX_TILES_PER_PROGRAM tiles a program, at least one tile each."""
    tiles = cdiv(window, SLOT_TILE)
    return max(1, min(tiles, max(cdiv(TARGET_PROGRAMS, rows_x_heads), cdiv(tiles, MAX_TILES_PER_PROGRAM))))


def _launch(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    batch, heads, window, head_dim = keys.shape
    if q.stride(-1) != 1:
        q = q.contiguous()
    if keys.stride(-1) != 1 or values.stride() != keys.stride():  # the kernel reads both through one set of strides
        keys, values = keys.contiguous(), values.contiguous()
    splits = split_count(batch * heads, window)
    tiles = cdiv(cdiv(window, SLOT_TILE), splits)
    splits = cdiv(cdiv(window, SLOT_TILE), tiles)  # no split left without a tile
    m = torch.empty(batch * heads, splits, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(batch * heads, splits, head_dim, dtype=torch.float32, device=q.device)
    block_dh = next_power_of_2(head_dim)
    ring_partial_kernel[(batch * heads, splits)](
        q, keys, values, positions, m, l, acc, heads, splits, LOG2E / math.sqrt(head_dim),
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        W=window, DH=head_dim, BS=SLOT_TILE, BDH=block_dh, TILES=tiles,
    )
    out = new_buffer((batch, heads, head_dim), q.dtype, q.device)
    ring_merge_kernel[(batch * heads,)](m, l, acc, out, splits, DH=head_dim, BDH=block_dh,
                                        BSPLIT=next_power_of_2(splits))
    return out


@torch.library.custom_op("tttla::ring_attention", mutates_args=())
def ring_attention_op(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return _launch(q, keys, values, positions)


@ring_attention_op.register_fake
def _(q, keys, values, positions):
    return q.new_empty(q.shape)


def ring_attention_reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """SDPA over the ring with the mask of its filled slots: [B, A, Dh] -> [B, A, Dh]."""
    filled = torch.arange(keys.shape[2], device=q.device) <= positions[:, None]  # [B, W]
    out = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=filled[:, None, None])
    return out[:, :, 0]


def ring_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, allow_triton: bool = True
) -> torch.Tensor:
    """One query per row and head over its ring -> [B, A, Dh] (q's dtype).

    q: [B, A, Dh] rotated queries; keys, values: [B, A, W, Dh] the ring (slot = position % W, written
    in order from position 0); positions: [B] int, each row's query position (slots <= it are filled).
    The Triton kernels run for fp32/bf16/fp16 where `kernels.triton_utils.use_triton(q, allow_triton)`
    says so; otherwise the SDPA form.
    """
    if q.dtype == torch.float64 or not use_triton(q, allow_triton):
        return ring_attention_reference(q, keys, values, positions)
    return ring_attention_op(q, keys, values, positions)
