"""Causal sliding-window softmax attention over whole sequences, forward and backward, in Triton.

Query t attends to keys s with 0 <= t - s < W (and, with packed documents, only keys of its own
document). FlexAttention computes this through a block mask: per 128-row query block it walks a list
of key blocks and evaluates the mask function on the partial ones. Here the band is the kernel's own
loop bounds: query block [m0, m0 + BM) reads exactly the key blocks that meet [m0 - W + 1, m0 + BM),
so no mask is built per forward (nor per batch of packed documents: their ids are a tensor the
kernel compares), and a compiled block sees one opaque op (`tttla::window_attention`).

The kernels follow the two-pass FlashAttention-2 form (fp32 accumulation, softmax in base 2):

  forward     per query block: running max and sum over its key blocks; writes o and the row's
              log-sum-exp (lse, [B, A, T] fp32) for the backward;
  backward    delta_t = o_t . do_t; per key block, dK and dV over the query blocks that see it
              (window_dkdv_kernel); per query block, dQ over its key blocks (window_dq_kernel). No atomics.

With scale = Dh^-1/2 (SDPA's default), P = softmax(scale Q K^T) under the band mask:
  dV = P^T dO,  dS = P * (dO V^T - delta),  dQ = scale dS K,  dK = scale dS^T Q.

`window_attention_reference` is dense masked SDPA: the oracle the tests compare with in float64.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.triton_utils import cdiv, dot_precision, new_buffer, tile, use_triton

LOG2E = 1.4426950408889634
# Tile sides (query rows BM, key rows BN); the window's loop bounds are whole tiles, masked at the edges.
FORWARD_TILES = (128, 64)
BACKWARD_TILES = (64, 64)
MAX_HEAD_DIM = 256


def warps_for(block_head_dim: int) -> int:
    """Warps per program: 4 hold a tile's fp32 accumulators up to head dim 64 in registers; wider heads
    take 8 so that they do not spill."""
    return 4 if block_head_dim <= 64 else 8


@triton.jit
def _band(rows, cols, row_ok, col_ok, doc_ptr, doc_row, WINDOW, HAS_DOCS: tl.constexpr):
    """[BM, BN] mask of the pairs (row t, col s) with 0 <= t - s < WINDOW, both in range, same document."""
    distance = rows[:, None] - cols[None, :]
    keep = (distance >= 0) & (distance < WINDOW) & row_ok[:, None] & col_ok[None, :]
    if HAS_DOCS:
        row_doc = tl.load(doc_ptr + doc_row + rows, mask=row_ok, other=-1)
        col_doc = tl.load(doc_ptr + doc_row + cols, mask=col_ok, other=-2)
        keep = keep & (row_doc[:, None] == col_doc[None, :])
    return keep


@triton.jit
def _needs_mask(row0, col0, WINDOW, BM: tl.constexpr, BN: tl.constexpr, HAS_DOCS: tl.constexpr):
    """Whether tile (rows row0.., cols col0..) holds a pair outside the band (or documents are packed):
    interior tiles of the band skip the mask, as causal FlashAttention skips it off the diagonal.

    The sequence's end needs no test here: an interior tile's columns end at or before row0 < T, and its
    rows past T read zeros, so they add nothing to dK and dV and their outputs are never stored."""
    return (col0 + BN - 1 > row0) | (row0 + BM - 1 - col0 >= WINDOW) | HAS_DOCS


@triton.jit
def window_fwd_kernel(
    q_ptr, k_ptr, v_ptr, doc_ptr, o_ptr, lse_ptr, T, A, WINDOW, scale_log2,
    s_b, s_t, s_a, o_b, o_t, o_a, d_b,
    DH: tl.constexpr, BDH: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, HAS_DOCS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """q, k, v: [B, T, A, DH] (strides s_b, s_t, s_a, 1; q, k, v share them); o: [B, T, A, DH] (strides
    o_*); lse: [B, A, T] fp32 in log2 units; doc: [B, T] int (stride d_b). Program (query block, b * A + a)."""
    block = tl.program_id(0)
    bh = tl.program_id(1)
    b, a = bh // A, bh % A
    base = b.to(tl.int64) * s_b + a * s_a
    rows = block * BM + tl.arange(0, BM)
    dims = tl.arange(0, BDH)
    row_ok, dim_ok = rows < T, dims < DH
    q = tl.load(q_ptr + base + rows[:, None] * s_t + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    m = tl.full([BM], float("-inf"), tl.float32)
    l = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BDH], dtype=tl.float32)
    lo = tl.maximum(block * BM - WINDOW + 1, 0) // BN * BN
    hi = tl.minimum((block + 1) * BM, T)
    for start in range(lo, hi, BN):
        cols = start + tl.arange(0, BN)
        col_ok = cols < T
        kv_offsets = base + cols[:, None] * s_t + dims[None, :]
        kv_ok = col_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + kv_offsets, mask=kv_ok, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        if _needs_mask(block * BM, start, WINDOW, BM, BN, HAS_DOCS):
            keep = _band(rows, cols, row_ok, col_ok, doc_ptr, b.to(tl.int64) * d_b, WINDOW, HAS_DOCS)
            scores = tl.where(keep, scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet keeps every weight 0
        p = tl.exp2(scores - m_safe[:, None])
        correction = tl.exp2(m - m_safe)
        v = tl.load(v_ptr + kv_offsets, mask=kv_ok, other=0.0)
        acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        l = l * correction + tl.sum(p, axis=1)
        m = m_new
    l_safe = tl.where(row_ok, l, 1.0)  # rows past T never saw a key
    out = acc / l_safe[:, None]
    o_base = b.to(tl.int64) * o_b + a * o_a
    tl.store(o_ptr + o_base + rows[:, None] * o_t + dims[None, :], out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])
    tl.store(lse_ptr + bh.to(tl.int64) * T + rows, m + tl.log2(l_safe), mask=row_ok)


@triton.jit
def _backward_tile(q, k, v, do, lse, delta, rows, cols, row_ok, col_ok, row0, col0, doc_ptr, doc_row, WINDOW,
                   scale_log2, BM: tl.constexpr, BN: tl.constexpr, HAS_DOCS: tl.constexpr, PRECISION: tl.constexpr):
    """One [BM, BN] tile of the backward, shared by the dK/dV and dQ kernels: the probabilities P
    (recomputed from the forward's lse, 0 outside the band) and dS = P * (dO V^T - delta)."""
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
    p = tl.exp2(scores - lse[:, None])
    if _needs_mask(row0, col0, WINDOW, BM, BN, HAS_DOCS):
        keep = _band(rows, cols, row_ok, col_ok, doc_ptr, doc_row, WINDOW, HAS_DOCS)
        p = tl.where(keep, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    return p, p * (dp - delta[:, None])


@triton.jit
def window_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, doc_ptr, dk_ptr, dv_ptr, T, A, WINDOW, scale_log2, scale,
    s_b, s_t, s_a, g_b, g_t, g_a, d_b,
    DH: tl.constexpr, BDH: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, HAS_DOCS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dK, dV of key block `program_id(0)` over the query blocks whose window holds it. q, k, v: strides
    s_*; do, dk, dv: [B, T, A, DH] strides g_*; lse, delta: [B, A, T] fp32."""
    block = tl.program_id(0)
    bh = tl.program_id(1)
    b, a = bh // A, bh % A
    base = b.to(tl.int64) * s_b + a * s_a
    grad_base = b.to(tl.int64) * g_b + a * g_a
    cols = block * BN + tl.arange(0, BN)
    dims = tl.arange(0, BDH)
    col_ok, dim_ok = cols < T, dims < DH
    kv_ok = col_ok[:, None] & dim_ok[None, :]
    k = tl.load(k_ptr + base + cols[:, None] * s_t + dims[None, :], mask=kv_ok, other=0.0)
    v = tl.load(v_ptr + base + cols[:, None] * s_t + dims[None, :], mask=kv_ok, other=0.0)
    dk = tl.zeros([BN, BDH], dtype=tl.float32)
    dv = tl.zeros([BN, BDH], dtype=tl.float32)
    lo = block * BN // BM * BM
    hi = tl.minimum((block + 1) * BN + WINDOW - 1, T)
    for start in range(lo, hi, BM):
        rows = start + tl.arange(0, BM)
        row_ok = rows < T
        q_ok = row_ok[:, None] & dim_ok[None, :]
        q = tl.load(q_ptr + base + rows[:, None] * s_t + dims[None, :], mask=q_ok, other=0.0)
        do = tl.load(do_ptr + grad_base + rows[:, None] * g_t + dims[None, :], mask=q_ok, other=0.0)
        lse = tl.load(lse_ptr + bh.to(tl.int64) * T + rows, mask=row_ok, other=0.0)
        delta = tl.load(delta_ptr + bh.to(tl.int64) * T + rows, mask=row_ok, other=0.0)
        p, ds = _backward_tile(q, k, v, do, lse, delta, rows, cols, row_ok, col_ok, start, block * BN, doc_ptr,
                               b.to(tl.int64) * d_b, WINDOW, scale_log2, BM, BN, HAS_DOCS, PRECISION)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    store_base = grad_base + cols[:, None] * g_t + dims[None, :]
    tl.store(dk_ptr + store_base, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_ok)
    tl.store(dv_ptr + store_base, dv.to(dv_ptr.dtype.element_ty), mask=kv_ok)


@triton.jit
def window_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, doc_ptr, dq_ptr, T, A, WINDOW, scale_log2, scale,
    s_b, s_t, s_a, g_b, g_t, g_a, d_b,
    DH: tl.constexpr, BDH: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, HAS_DOCS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dQ of query block `program_id(0)` over the key blocks of its window (strides as window_dkdv_kernel)."""
    block = tl.program_id(0)
    bh = tl.program_id(1)
    b, a = bh // A, bh % A
    base = b.to(tl.int64) * s_b + a * s_a
    grad_base = b.to(tl.int64) * g_b + a * g_a
    rows = block * BM + tl.arange(0, BM)
    dims = tl.arange(0, BDH)
    row_ok, dim_ok = rows < T, dims < DH
    q_ok = row_ok[:, None] & dim_ok[None, :]
    q = tl.load(q_ptr + base + rows[:, None] * s_t + dims[None, :], mask=q_ok, other=0.0)
    do = tl.load(do_ptr + grad_base + rows[:, None] * g_t + dims[None, :], mask=q_ok, other=0.0)
    lse = tl.load(lse_ptr + bh.to(tl.int64) * T + rows, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + bh.to(tl.int64) * T + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BM, BDH], dtype=tl.float32)
    lo = tl.maximum(block * BM - WINDOW + 1, 0) // BN * BN
    hi = tl.minimum((block + 1) * BM, T)
    for start in range(lo, hi, BN):
        cols = start + tl.arange(0, BN)
        col_ok = cols < T
        kv_offsets = base + cols[:, None] * s_t + dims[None, :]
        kv_ok = col_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + kv_offsets, mask=kv_ok, other=0.0)
        v = tl.load(v_ptr + kv_offsets, mask=kv_ok, other=0.0)
        _, ds = _backward_tile(q, k, v, do, lse, delta, rows, cols, row_ok, col_ok, block * BM, start, doc_ptr,
                               b.to(tl.int64) * d_b, WINDOW, scale_log2, BM, BN, HAS_DOCS, PRECISION)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(dq_ptr + grad_base + rows[:, None] * g_t + dims[None, :], (dq * scale).to(dq_ptr.dtype.element_ty),
             mask=q_ok)


def _shared_strides(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v with one set of strides and a unit last stride (the kernels read them through one set):
    the model's heads usually are (views of one projection, or its rotated copies); else contiguous copies."""
    if q.stride(-1) == 1 and q.stride() == k.stride() == v.stride():
        return q, k, v
    return q.contiguous(), k.contiguous(), v.contiguous()


def _docs(doc_ids: Optional[torch.Tensor], q: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the document ids the kernels read, their row stride): q itself as a never-read pointer without documents."""
    if doc_ids is None:
        return q, 0
    doc_ids = doc_ids.to(torch.int32).contiguous()
    return doc_ids, doc_ids.stride(0)


def _forward(q, k, v, doc_ids, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    batch, seq_len, heads, head_dim = q.shape
    q, k, v = _shared_strides(q, k, v)
    docs, doc_stride = _docs(doc_ids, q)
    out = new_buffer((batch, seq_len, heads, head_dim), q.dtype, q.device)
    lse = new_buffer((batch, heads, seq_len), torch.float32, q.device)
    block_m, block_n = FORWARD_TILES
    block_head_dim = tile(head_dim, MAX_HEAD_DIM)  # head dims beyond it never reach the op (`supports`)
    window_fwd_kernel[(cdiv(seq_len, block_m), batch * heads)](
        q, k, v, docs, out, lse, seq_len, heads, window, LOG2E / math.sqrt(head_dim),
        q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2), doc_stride,
        DH=head_dim, BDH=block_head_dim, BM=block_m, BN=block_n, HAS_DOCS=doc_ids is not None,
        PRECISION=dot_precision(q.dtype), num_warps=warps_for(block_head_dim),
    )
    return out, lse


def _backward(do, q, k, v, out, lse, doc_ids, window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, seq_len, heads, head_dim = q.shape
    q, k, v = _shared_strides(q, k, v)
    do = do.to(q.dtype).contiguous()
    docs, doc_stride = _docs(doc_ids, q)
    delta = (out.float() * do.float()).sum(-1).transpose(1, 2).contiguous()  # [B, A, T]
    dq, dk, dv = (new_buffer(do.shape, q.dtype, q.device) for _ in range(3))
    block_m, block_n = BACKWARD_TILES
    block_head_dim = tile(head_dim, MAX_HEAD_DIM)  # head dims beyond it never reach the op (`supports`)
    common = dict(DH=head_dim, BDH=block_head_dim, BM=block_m, BN=block_n, HAS_DOCS=doc_ids is not None,
                  PRECISION=dot_precision(q.dtype), num_warps=warps_for(block_head_dim))  # fmt: skip
    scale = 1.0 / math.sqrt(head_dim)
    strides = (q.stride(0), q.stride(1), q.stride(2), do.stride(0), do.stride(1), do.stride(2), doc_stride)
    window_dkdv_kernel[(cdiv(seq_len, block_n), batch * heads)](
        q, k, v, do, lse, delta, docs, dk, dv, seq_len, heads, window, LOG2E * scale, scale, *strides, **common)
    window_dq_kernel[(cdiv(seq_len, block_m), batch * heads)](
        q, k, v, do, lse, delta, docs, dq, seq_len, heads, window, LOG2E * scale, scale, *strides, **common)
    return dq, dk, dv


@torch.library.custom_op("tttla::window_attention", mutates_args=())
def window_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: Optional[torch.Tensor], window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v: [B, T, A, Dh]; doc_ids: [B, T] or None -> (o [B, T, A, Dh] in q's dtype, lse [B, A, T] fp32)."""
    return _forward(q, k, v, doc_ids, window)


@window_attention_op.register_fake
def _(q, k, v, doc_ids, window):
    batch, seq_len, heads, head_dim = q.shape
    return q.new_empty(batch, seq_len, heads, head_dim), q.new_empty(batch, heads, seq_len, dtype=torch.float32)


@torch.library.custom_op("tttla::window_attention_backward", mutates_args=())
def window_attention_backward_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    doc_ids: Optional[torch.Tensor], window: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv [B, T, A, Dh] (q's dtype) from do = dL/do and what the forward took and returned."""
    return _backward(do, q, k, v, out, lse, doc_ids, window)


@window_attention_backward_op.register_fake
def _(do, q, k, v, out, lse, doc_ids, window):
    return tuple(q.new_empty(q.shape) for _ in range(3))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, doc_ids, window = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, doc_ids)
    ctx.window = window
    ctx.set_materialize_grads(False)


def _window_backward(ctx, do, _dlse):
    q, k, v, out, lse, doc_ids = ctx.saved_tensors
    if do is None:
        return None, None, None, None, None
    dq, dk, dv = window_attention_backward_op(do, q, k, v, out, lse, doc_ids, ctx.window)
    return dq, dk, dv, None, None


window_attention_op.register_autograd(_window_backward, setup_context=_setup_context)


def window_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, doc_ids: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Dense masked SDPA over [B, T, A, Dh] (the oracle; O(T^2) memory)."""
    positions = torch.arange(q.shape[1], device=q.device)
    distance = positions[:, None] - positions[None, :]
    keep = (distance >= 0) & (distance < window)
    if doc_ids is not None:
        keep = keep & (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=keep)
    return out.transpose(1, 2)


def supports(q: torch.Tensor) -> bool:
    """Inputs the kernels serve: fp32/bf16/fp16 heads of at most MAX_HEAD_DIM."""
    return q.dtype in (torch.float32, torch.bfloat16, torch.float16) and q.shape[-1] <= MAX_HEAD_DIM


def window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, doc_ids: Optional[torch.Tensor] = None,
    allow_triton: bool = True,
) -> torch.Tensor:
    """q, k, v: [B, T, A, Dh] rotated heads -> [B, T, A, Dh]: query t attends keys t - window < s <= t
    (of its own document when doc_ids [B, T] is given). The Triton kernels where
    `kernels.triton_utils.use_triton(q, allow_triton)` and `supports(q)` say so, else the dense reference."""
    if window < 1:
        raise ValueError(f"window attention needs a window of at least 1 token, got {window}")
    if not supports(q) or not use_triton(q, allow_triton):
        return window_attention_reference(q, k, v, window, doc_ids)
    return window_attention_op(q, k, v, doc_ids, window)[0]
