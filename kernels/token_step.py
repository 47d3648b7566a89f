"""One decoded token of the fast-weight branch as one kernel: its features, its terms of the chunk's
gradient and its read, for every row and head at once (fla's `fused_recurrent` beside `chunk`).

At batch 1 a decode step is bound by its kernel count, not its bytes: in torch the branch is the
features of q and k (head-batched matrix-vector products and the gates), the token's outer-product
terms added to the partial chunk's gradients, the token-causal read weight and its product with h(q),
several kernels a layer of a few microseconds each. Each kernel here does all of it in one launch and
reads every state tile once, which is all a step can cost at larger batches.

W1 only (`w1_token_step`), per (row b, head h), with eta = eta1[b, h] and s = update_sign:

  hq = h(q), hk = h(k)                  h(x) = silu(W0 x) * (W2 x)  (or x, the identity map)
  G1 <- G1 - eta v hk^T                 the token's term of its chunk's gradient (`kernels.lact.chunk_gradients`)
  o  = (W1 - s G1) hq   (token-causal)  or  W1 hq

A program owns `BD` rows of one (row, head)'s [d, dh] state: it computes h(q), h(k) itself from the
learned W0, W2 (4 d dh multiply-adds, read from L2 by every program of the head), updates its rows of
G1 in place and answers its rows of the output.

`w1_token_read` (o = W1 h(q), no G1: the step of a decoder that keeps the partial chunk as its tokens,
`decoding.pending`, from `DEFER_FROM_BATCH` rows on) has a kernel of its own, `w1_token_read_kernel`,
built for many rows: a program owns `READ_ROWS` rows of one head and `BD` rows of their states, forms
their h(q) as one [READ_ROWS, d] x [d, dh] product pair on the tensor cores (W0, W2 read once for
all its rows, where the step kernel reads them once per row and state block: at batch 64 and d = 192
that was about 340 MB of L2 reads a layer for a 38 MB state), then streams each row's block of W1.
The step kernel without G1 (`w1_token_read_tiled`) stays for the comparison (`benchmarks.token_read`).

All three fast (`lact_token_step`, the recurrent LaCT form), with a = W0 k, b = W2 k, g = W1^T v and the
row's own W0, W1, W2 (`kernels.lact.lact_chunk_gradients` for one token):

  G1 <- G1 - eta1 v h(k)^T,  G0 <- G0 - eta0 (g * b * silu'(a)) k^T,  G2 <- G2 - eta2 (g * silu(a)) k^T
  o  = (W1 - s G1) hq   (token-causal)  or  W1 hq

A program owns `BE` of the dh features of one (row, head): its rows of W0, W2, G0, G2, its columns of
W1 and G1; it writes its share of o, which the caller sums over the feature tiles.

`w1_token_step_reference` and `lact_token_step_reference` are the torch forms the kernels are tested
against, and what runs where they do not (the CPU, float64).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kernels.fast_weights import ChunkGradients, FastWeights
from kernels.lact import lact_chunk_gradients, swiglu_features
from kernels.triton_utils import cdiv, dot_precision, new_buffer, next_power_of_2, tile, use_triton

# Rows of the [d, dh] state a W1 program owns: few at batch 1, so the state is read by about
# TARGET_PROGRAMS programs; more at larger batches, up to a tile that stays in registers.
MIN_ROWS_PER_PROGRAM, MAX_ROWS_PER_PROGRAM = 16, 64
TARGET_PROGRAMS = 128
# Feature columns (dh) per pass, and the reduction over d per pass: the whole of d at model sizes, so
# a program's feature pass is one wide load of W0 and W2 rather than a chain of dependent small ones
# (at 64 a batch-1 launch took about 15 us on an H100, its programs waiting on nine loads in turn).
COLUMN_TILE, REDUCTION_TILE = 64, 256
# The read kernel: rows (tokens) a program forms h(q) for at once (tl.dot's least M), and the state
# rows it streams per token: halved from the most until the launch has about TARGET_READ_PROGRAMS programs.
READ_ROWS, MAX_READ_STATE_ROWS, MIN_READ_STATE_ROWS, TARGET_READ_PROGRAMS = 16, 64, 16, 256
# Features per program of the LaCT step (it holds [BE, d] tiles of W0, W2, G0, G2 and [d, BE] of W1, G1).
LACT_FEATURE_TILE = 32


@triton.jit
def w1_token_step_kernel(
    q_ptr, k_ptr, v_ptr, eta_ptr, w0_ptr, w2_ptr, w1_ptr, g1_ptr, o_ptr, H, sign,
    q_row, q_head, k_row, k_head, v_row, v_head, eta_row, eta_head,
    D: tl.constexpr, DH: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr,
    SWIGLU: tl.constexpr, TOKEN_CAUSAL: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    """q, k, v: [B, H, D] (strides *_row, *_head, 1); eta: [B, H] (strides eta_row, eta_head);
    w0, w2: [H, DH, D]; w1, g1 (in place): [B, H, D, DH] fp32; o: [B, H, D] fp32.
    Program (b * H + h, row block) owns rows [BD * block, + BD) of W1 and G1. Without ACCUMULATE
    (never token-causal) k, v, eta and g1 are not read: o = W1 h(q)."""
    bh = tl.program_id(0)
    row, head = bh // H, bh % H
    q_ptr += row * q_row + head * q_head
    k_ptr += row * k_row + head * k_head
    v_ptr += row * v_row + head * v_head
    rows = tl.program_id(1) * BD + tl.arange(0, BD)
    row_ok = rows < D
    state = bh.to(tl.int64) * D * DH
    if ACCUMULATE:
        eta = tl.load(eta_ptr + row * eta_row + head * eta_head).to(tl.float32)
        v_rows = tl.load(v_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    out = tl.zeros([BD], dtype=tl.float32)
    for e0 in range(0, DH, BE):
        cols = e0 + tl.arange(0, BE)
        col_ok = cols < DH
        if SWIGLU:
            aq = tl.zeros([BE], dtype=tl.float32)
            bq = tl.zeros([BE], dtype=tl.float32)
            ak = tl.zeros([BE], dtype=tl.float32)
            bk = tl.zeros([BE], dtype=tl.float32)
            for k0 in range(0, D, BK):
                red = k0 + tl.arange(0, BK)
                red_ok = red < D
                w_offsets = head * DH * D + cols[:, None] * D + red[None, :]
                w_ok = col_ok[:, None] & red_ok[None, :]
                w0 = tl.load(w0_ptr + w_offsets, mask=w_ok, other=0.0).to(tl.float32)  # [BE, BK]
                w2 = tl.load(w2_ptr + w_offsets, mask=w_ok, other=0.0).to(tl.float32)
                xq = tl.load(q_ptr + red, mask=red_ok, other=0.0).to(tl.float32)[None, :]
                aq += tl.sum(w0 * xq, axis=1)
                bq += tl.sum(w2 * xq, axis=1)
                if ACCUMULATE:
                    xk = tl.load(k_ptr + red, mask=red_ok, other=0.0).to(tl.float32)[None, :]
                    ak += tl.sum(w0 * xk, axis=1)
                    bk += tl.sum(w2 * xk, axis=1)
            hq = aq * tl.sigmoid(aq) * bq
            hk = ak * tl.sigmoid(ak) * bk
        else:  # the identity map: D == DH
            hq = tl.load(q_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            if ACCUMULATE:
                hk = tl.load(k_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        offsets = state + rows[:, None] * DH + cols[None, :]
        tile_ok = row_ok[:, None] & col_ok[None, :]
        read = tl.load(w1_ptr + offsets, mask=tile_ok, other=0.0)
        if ACCUMULATE:
            g1 = tl.load(g1_ptr + offsets, mask=tile_ok, other=0.0) - eta * v_rows[:, None] * hk[None, :]
            tl.store(g1_ptr + offsets, g1, mask=tile_ok)
            if TOKEN_CAUSAL:
                read = read - sign * g1
        out += tl.sum(read * hq[None, :], axis=1)
    tl.store(o_ptr + bh * D + rows, out, mask=row_ok)


def _rows_per_program(rows: int, programs_per_block: int) -> int:
    """A power of two of state rows per program: few enough that batch-1 steps spread over about
    `TARGET_PROGRAMS` programs, at most `MAX_ROWS_PER_PROGRAM` (a [rows, dh tile] fp32 tile in registers)."""
    split = max(1, TARGET_PROGRAMS // max(programs_per_block, 1))
    return min(MAX_ROWS_PER_PROGRAM, max(MIN_ROWS_PER_PROGRAM, next_power_of_2(cdiv(rows, split))))


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    """x, or a copy when its last dim is not contiguous (the kernel reads rows and heads through strides)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch(q, k, v, eta1, w0, w2, w1, g1, update_sign: float, token_causal: bool, swiglu: bool,
            accumulate: bool = True, tiles: Optional[tuple[int, int]] = None) -> torch.Tensor:  # fmt: skip
    """`tiles`: (state rows, feature columns) a program takes at once, powers of two; None: the defaults."""
    batch, heads, d = v.shape
    q, k, v = (_unit_last_stride(x) for x in (q, k, v))
    dh = w1.shape[-1]
    out = new_buffer((batch, heads, d), torch.float32, v.device)
    rows_per_program, column_tile = tiles or (_rows_per_program(d, batch * heads), min(COLUMN_TILE, next_power_of_2(dh)))
    grid = (batch * heads, cdiv(d, rows_per_program))
    w1_token_step_kernel[grid](
        q, k, v, eta1, w0.contiguous(), w2.contiguous(), w1.contiguous(), g1, out, heads, float(update_sign),
        *q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *eta1.stride(), D=d, DH=dh, BD=rows_per_program,
        BE=column_tile, BK=min(REDUCTION_TILE, next_power_of_2(d)),
        SWIGLU=swiglu, TOKEN_CAUSAL=token_causal, ACCUMULATE=accumulate, num_warps=8,
    )
    return out


def w1_token_step_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta1: torch.Tensor, w0: Optional[torch.Tensor],
    w2: Optional[torch.Tensor], w1: torch.Tensor, g1: torch.Tensor, update_sign: float, token_causal: bool,
) -> torch.Tensor:
    """The torch form of the kernel, in the state's dtype (w0 None: the identity map); updates g1."""
    dtype = w1.dtype
    q, k, v, eta1 = (x.to(dtype) for x in (q, k, v, eta1))

    def features(x: torch.Tensor) -> torch.Tensor:  # [B, H, d] -> [B, H, dh]
        return x if w0 is None else swiglu_features(x[:, None], w0.to(dtype), w2.to(dtype))[:, 0]

    hq, hk = features(q), features(k)
    g1.sub_(torch.einsum("bhd,bhe->bhde", v * eta1[..., None], hk))
    read = w1 - update_sign * g1 if token_causal else w1
    return torch.einsum("bhde,bhe->bhd", read, hq)


@torch.library.custom_op("tttla::w1_token_step", mutates_args=("g1",))
def w1_token_step_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta1: torch.Tensor, w0: Optional[torch.Tensor],
    w2: Optional[torch.Tensor], w1: torch.Tensor, g1: torch.Tensor, update_sign: float, token_causal: bool,
) -> torch.Tensor:
    """The kernel as an op a compiled decode step keeps whole (it writes g1 in place)."""
    swiglu = w0 is not None
    return _launch(q, k, v, eta1, w0 if swiglu else w1, w2 if swiglu else w1, w1, g1, update_sign, token_causal, swiglu)


@w1_token_step_op.register_fake
def _(q, k, v, eta1, w0, w2, w1, g1, update_sign, token_causal):
    return v.new_empty(v.shape, dtype=torch.float32)


def w1_token_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta1: torch.Tensor, w0: Optional[torch.Tensor],
    w2: Optional[torch.Tensor], w1: torch.Tensor, g1: torch.Tensor, update_sign: float, token_causal: bool,
    allow_triton: bool = True,
) -> torch.Tensor:
    """One token per row through the W1-only fast-weight branch -> o [B, H, d] (w1's dtype).

    q, k, v: [B, H, d] (any float dtype; the maths runs in fp32, as the decoder's state); eta1: [B, H];
    w0, w2: the learned feature weights [H, dh, d] (None: the identity map, dh = d); w1: [B, H, d, dh]
    the fast weight after the last complete chunk; g1: [B, H, d, dh] the partial chunk's gradient,
    which gains the token's term in place. The Triton kernel runs for fp32 states where
    `kernels.triton_utils.use_triton(w1, allow_triton)` says so; otherwise the torch form (float64 in
    the tests).
    """
    if w1.dtype != torch.float32 or g1.dtype != torch.float32 or not use_triton(w1, allow_triton):
        return w1_token_step_reference(q, k, v, eta1, w0, w2, w1, g1, update_sign, token_causal)
    if not g1.is_contiguous():
        raise ValueError("the token step updates g1 in place: it must be a contiguous [B, H, d, dh] tensor")
    return w1_token_step_op(q, k, v, eta1, w0, w2, w1, g1, float(update_sign), bool(token_causal))


def w1_token_read_reference(
    q: torch.Tensor, w0: Optional[torch.Tensor], w2: Optional[torch.Tensor], w1: torch.Tensor
) -> torch.Tensor:
    """The torch form of the read alone, o = W1 h(q), in the state's dtype (w0 None: the identity map)."""
    dtype = w1.dtype
    hq = q.to(dtype) if w0 is None else swiglu_features(q.to(dtype)[:, None], w0.to(dtype), w2.to(dtype))[:, 0]
    return torch.einsum("bhde,bhe->bhd", w1, hq)


@triton.jit
def w1_token_read_kernel(
    q_ptr, k_ptr, w0_ptr, w2_ptr, w1_ptr, o_ptr, hk_ptr, B, H, q_row, q_head, k_row, k_head,
    D: tl.constexpr, DH: tl.constexpr, DHP: tl.constexpr, BB: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr,
    SWIGLU: tl.constexpr, KEYS: tl.constexpr, PRECISION: tl.constexpr,
):
    """q, k: [B, H, D] (strides q_row, q_head, 1 and k_row, k_head, 1); w0, w2: [H, DH, D] in q's dtype;
    w1: [B, H, D, DH] fp32; o: [B, H, D] fp32; hk: [B, H, DH] in k's dtype. Program (row block, head,
    state block) owns rows [BB * i, + BB) and state rows [BD * j, + BD): o[b, h, rows] = W1[b, h, rows]
    h(q[b, h]); with KEYS (SWIGLU only) the first state block's programs also write hk = h(k), from the
    W0, W2 tiles they load for h(q). DHP: DH's next power of two."""
    first = tl.program_id(0) * BB
    head = tl.program_id(1)
    tokens = first + tl.arange(0, BB)
    token_ok = tokens < B
    cols = tl.arange(0, DHP)
    col_ok = cols < DH
    if SWIGLU:  # [BB, D] x [D, DH] twice (four times with KEYS), fp32 accumulation
        a = tl.zeros([BB, DHP], dtype=tl.float32)
        g = tl.zeros([BB, DHP], dtype=tl.float32)
        ak = tl.zeros([BB, DHP], dtype=tl.float32)
        gk = tl.zeros([BB, DHP], dtype=tl.float32)
        for k0 in range(0, D, BK):
            red = k0 + tl.arange(0, BK)
            red_ok = red < D
            x_ok = token_ok[:, None] & red_ok[None, :]
            x = tl.load(q_ptr + tokens[:, None] * q_row + head * q_head + red[None, :], mask=x_ok, other=0.0)
            w_offsets = head * DH * D + cols[None, :] * D + red[:, None]  # [BK, DHP]: W^T
            w_ok = red_ok[:, None] & col_ok[None, :]
            w0 = tl.load(w0_ptr + w_offsets, mask=w_ok, other=0.0)
            w2 = tl.load(w2_ptr + w_offsets, mask=w_ok, other=0.0)
            a += tl.dot(x, w0, input_precision=PRECISION)
            g += tl.dot(x, w2, input_precision=PRECISION)
            if KEYS:
                if tl.program_id(2) == 0:  # only the first state block writes h(k)
                    xk = tl.load(k_ptr + tokens[:, None] * k_row + head * k_head + red[None, :], mask=x_ok, other=0.0)
                    ak += tl.dot(xk, w0, input_precision=PRECISION)
                    gk += tl.dot(xk, w2, input_precision=PRECISION)
        hq = a * tl.sigmoid(a) * g
        if KEYS:
            hk = ak * tl.sigmoid(ak) * gk
            hk_ok = token_ok[:, None] & col_ok[None, :] & (tl.program_id(2) == 0)
            tl.store(hk_ptr + (tokens[:, None] * H + head) * DH + cols[None, :], hk.to(hk_ptr.dtype.element_ty),
                     mask=hk_ok)
    else:  # the identity map: D == DH
        hq = tl.load(q_ptr + tokens[:, None] * q_row + head * q_head + cols[None, :],
                     mask=token_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    state_rows = tl.program_id(2) * BD + tl.arange(0, BD)
    state_ok = state_rows < D
    token_index = tl.arange(0, BB)
    for i in tl.static_range(BB):
        token = first + i
        h = tl.sum(tl.where((token_index == i)[:, None], hq, 0.0), axis=0)  # [DHP]: this token's h(q)
        state = (token * H + head).to(tl.int64) * D * DH
        tile_ok = (state_ok[:, None] & col_ok[None, :]) & (token < B)
        w1 = tl.load(w1_ptr + state + state_rows[:, None] * DH + cols[None, :], mask=tile_ok, other=0.0)
        tl.store(o_ptr + (token * H + head) * D + state_rows, tl.sum(w1 * h[None, :], axis=1),
                 mask=state_ok & (token < B))


def _read_state_rows(batch: int, heads: int, d: int) -> int:
    """State rows a read program streams per token: the most (up to MAX_READ_STATE_ROWS) that still give
    the launch about TARGET_READ_PROGRAMS programs, at least MIN_READ_STATE_ROWS."""
    rows = min(MAX_READ_STATE_ROWS, max(MIN_READ_STATE_ROWS, next_power_of_2(d)))
    while rows > MIN_READ_STATE_ROWS and cdiv(batch, READ_ROWS) * heads * cdiv(d, rows) < TARGET_READ_PROGRAMS:
        rows //= 2
    return rows


def _read_reduction_tile(dtype: torch.dtype) -> int:
    """The read kernel's reduction over d per pass: 64 for 16-bit operands; 32 for fp32 ones, whose
    pipelined [BK, dh] tiles of W0 and W2 at 64 need 264 KB of shared memory at dh = 192 (an H100 has 227)."""
    return 32 if dtype == torch.float32 else 64


def _read_launch(q: torch.Tensor, w0: Optional[torch.Tensor], w2: Optional[torch.Tensor], w1: torch.Tensor,
                 state_rows: Optional[int] = None, k: Optional[torch.Tensor] = None,
                 ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:  # fmt: skip
    """`w1_token_read_kernel` over every row and head -> (o, h(k) in k's dtype, or None without `k` or
    without W0, W2); `state_rows` (a power of two) overrides the default."""
    batch, heads, d = q.shape
    dh = w1.shape[-1]
    swiglu = w0 is not None
    keys = swiglu and k is not None
    out = new_buffer((batch, heads, d), torch.float32, q.device)
    hk = new_buffer((batch, heads, dh), k.dtype, q.device) if keys else out  # unwritten without KEYS
    if swiglu and (q.dtype != w0.dtype or w2.dtype != w0.dtype):  # one operand dtype for the products
        q, w0, w2 = q.float(), w0.float(), w2.float()
    q = _unit_last_stride(q)
    k = _unit_last_stride(k.to(q.dtype)) if keys else q  # unread without KEYS
    features = (w0.contiguous(), w2.contiguous()) if swiglu else (q, q)  # unread without SWIGLU
    rows = state_rows or _read_state_rows(batch, heads, d)
    w1_token_read_kernel[(cdiv(batch, READ_ROWS), heads, cdiv(d, rows))](
        q, k, *features, w1.contiguous(), out, hk, batch, heads, *q.stride()[:2], *k.stride()[:2], D=d, DH=dh,
        DHP=max(16, next_power_of_2(dh)), BB=READ_ROWS, BD=rows, BK=tile(d, _read_reduction_tile(q.dtype)),
        SWIGLU=swiglu, KEYS=keys, PRECISION=dot_precision(q.dtype), num_warps=8,
    )
    return out, (hk if keys else None)


@torch.library.custom_op("tttla::w1_token_read", mutates_args=())
def w1_token_read_op(q: torch.Tensor, w0: Optional[torch.Tensor], w2: Optional[torch.Tensor], w1: torch.Tensor) -> torch.Tensor:
    """The read kernel as an op a compiled decode step keeps whole."""
    return _read_launch(q, w0, w2, w1)[0]


@torch.library.custom_op("tttla::w1_token_read_keys", mutates_args=())
def w1_token_read_keys_op(
    q: torch.Tensor, k: torch.Tensor, w0: torch.Tensor, w2: torch.Tensor, w1: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The read kernel that also writes the keys' features, as an op a compiled decode step keeps whole."""
    out, hk = _read_launch(q, w0, w2, w1, k=k)
    return out, hk


def w1_token_read_rows(q: torch.Tensor, w0: Optional[torch.Tensor], w2: Optional[torch.Tensor], w1: torch.Tensor,
                       state_rows: int) -> torch.Tensor:  # fmt: skip
    """The read kernel with `state_rows` (a power of two) state rows a program streams per token instead of
    its default, for `benchmarks.token_read` to weigh against it."""
    return _read_launch(q, w0, w2, w1, state_rows)[0]


def w1_token_read_tiled(
    q: torch.Tensor, w0: Optional[torch.Tensor], w2: Optional[torch.Tensor], w1: torch.Tensor,
    tiles: Optional[tuple[int, int]] = None,
) -> torch.Tensor:
    """The read through the step kernel (without G1), a program's (state rows, feature columns) chosen by
    the caller (None: the step's defaults), for `benchmarks.token_read` to weigh against the read
    kernel: each program recomputes one token's h(q) for the state rows it owns."""
    swiglu = w0 is not None
    features = (w0, w2) if swiglu else (w1, w1)  # unread without SWIGLU; k, v, eta, g1 unread without ACCUMULATE
    return _launch(q, q, q, q[..., 0], *features, w1, w1, 1.0, False, swiglu, False, tiles)  # accumulate=False


@w1_token_read_op.register_fake
def _(q, w0, w2, w1):
    return q.new_empty(q.shape, dtype=torch.float32)


@w1_token_read_keys_op.register_fake
def _(q, k, w0, w2, w1):
    return q.new_empty(q.shape, dtype=torch.float32), k.new_empty((*k.shape[:2], w1.shape[-1]))


def w1_token_read(
    q: torch.Tensor, w0: Optional[torch.Tensor], w2: Optional[torch.Tensor], w1: torch.Tensor, allow_triton: bool = True
) -> torch.Tensor:
    """One token per row read from the fast weight alone, o = W1 h(q) -> [B, H, d] (w1's dtype): q [B, H, d]
    (any float dtype), w0, w2 the learned feature weights [H, dh, d] (None: the identity map), w1
    [B, H, d, dh]. The Triton kernel for fp32 states where `use_triton(w1, allow_triton)` says so."""
    if w1.dtype != torch.float32 or not use_triton(w1, allow_triton):
        return w1_token_read_reference(q, w0, w2, w1)
    return w1_token_read_op(q, w0, w2, w1)


def w1_token_read_with_key_features(
    q: torch.Tensor, k: torch.Tensor, w0: Optional[torch.Tensor], w2: Optional[torch.Tensor], w1: torch.Tensor,
    allow_triton: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`w1_token_read`, and the token's key features h(k) [B, H, dh] in k's dtype (k itself for the identity
    map): what a pending-token decoder keeps of the key (`decoding.pending`), formed by the read kernel
    from the W0, W2 tiles it loads for h(q), so the chunk-completing step has no features to form."""
    if w0 is None:
        return w1_token_read(q, None, None, w1, allow_triton), k
    if w1.dtype != torch.float32 or not use_triton(w1, allow_triton):
        hk = swiglu_features(k[:, None], w0.to(k.dtype), w2.to(k.dtype))[:, 0]
        return w1_token_read_reference(q, w0, w2, w1), hk
    return w1_token_read_keys_op(q, k, w0, w2, w1)


@triton.jit
def lact_token_step_kernel(
    q_ptr, k_ptr, v_ptr, eta_ptr, w0_ptr, w1_ptr, w2_ptr, g0_ptr, g1_ptr, g2_ptr, part_ptr, H, sign,
    q_row, q_head, k_row, k_head, v_row, v_head, eta_row, eta_rate, eta_head,
    D: tl.constexpr, DH: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, TOKEN_CAUSAL: tl.constexpr,
):
    """q, k, v: [B, H, D] (strides *_row, *_head, 1); eta: [B, 3, H] (strides eta_row, eta_rate, eta_head);
    w0, w2, g0, g2 (in place): [B, H, DH, D] fp32; w1, g1 (in place): [B, H, D, DH] fp32;
    part: [B * H, cdiv(DH, BE), D] fp32, this program's share of o. Program (b * H + h, feature tile)."""
    bh = tl.program_id(0)
    feature_tile = tl.program_id(1)
    row, head = bh // H, bh % H
    dims = tl.arange(0, BD)
    dim_ok = dims < D
    cols = feature_tile * BE + tl.arange(0, BE)
    col_ok = cols < DH
    q = tl.load(q_ptr + row * q_row + head * q_head + dims, mask=dim_ok, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + row * k_row + head * k_head + dims, mask=dim_ok, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + row * v_row + head * v_head + dims, mask=dim_ok, other=0.0).to(tl.float32)
    eta_base = eta_ptr + row * eta_row + head * eta_head
    eta0 = tl.load(eta_base).to(tl.float32)
    eta1 = tl.load(eta_base + eta_rate).to(tl.float32)
    eta2 = tl.load(eta_base + 2 * eta_rate).to(tl.float32)
    base = bh.to(tl.int64) * D * DH
    by_feature = base + cols[:, None] * D + dims[None, :]  # [BE, BD] of W0, W2, G0, G2
    feature_ok = col_ok[:, None] & dim_ok[None, :]
    by_dim = base + dims[:, None] * DH + cols[None, :]  # [BD, BE] of W1, G1
    dim_tile_ok = dim_ok[:, None] & col_ok[None, :]
    w0 = tl.load(w0_ptr + by_feature, mask=feature_ok, other=0.0)
    w2 = tl.load(w2_ptr + by_feature, mask=feature_ok, other=0.0)
    a_k = tl.sum(w0 * k[None, :], axis=1)
    b_k = tl.sum(w2 * k[None, :], axis=1)
    a_q = tl.sum(w0 * q[None, :], axis=1)
    hq = a_q * tl.sigmoid(a_q) * tl.sum(w2 * q[None, :], axis=1)
    sig_k = tl.sigmoid(a_k)
    gate_k = a_k * sig_k
    w1 = tl.load(w1_ptr + by_dim, mask=dim_tile_ok, other=0.0)
    hidden_grad = tl.sum(w1 * v[:, None], axis=0)  # (W1^T v) on these features
    g1 = tl.load(g1_ptr + by_dim, mask=dim_tile_ok, other=0.0) - eta1 * v[:, None] * (gate_k * b_k)[None, :]
    tl.store(g1_ptr + by_dim, g1, mask=dim_tile_ok)
    silu_grad = sig_k * (1.0 + a_k * (1.0 - sig_k))
    g0 = tl.load(g0_ptr + by_feature, mask=feature_ok, other=0.0)
    g0 -= eta0 * (hidden_grad * b_k * silu_grad)[:, None] * k[None, :]
    tl.store(g0_ptr + by_feature, g0, mask=feature_ok)
    g2 = tl.load(g2_ptr + by_feature, mask=feature_ok, other=0.0) - eta2 * (hidden_grad * gate_k)[:, None] * k[None, :]
    tl.store(g2_ptr + by_feature, g2, mask=feature_ok)
    read = w1
    if TOKEN_CAUSAL:
        read = w1 - sign * g1
    tl.store(part_ptr + (bh * tl.num_programs(1) + feature_tile) * D + dims, tl.sum(read * hq[None, :], axis=1),
             mask=dim_ok)


def lact_token_step_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, etas: torch.Tensor, fast: FastWeights,
    grads: ChunkGradients, update_sign: float, token_causal: bool,
) -> torch.Tensor:
    """The torch form of the LaCT kernel in the state's dtype (`kernels.lact`); updates grads in place."""
    dtype = fast.w1.dtype
    q, k, v, etas = (x.to(dtype) for x in (q, k, v, etas))
    eta0, eta1, eta2 = (e[:, None] for e in etas.unbind(dim=1))  # [B, 1, H]
    grads.add_(lact_chunk_gradients(k[:, None], v[:, None], eta0, eta1, eta2, fast))
    read = fast.w1 - update_sign * grads.g1 if token_causal else fast.w1
    hq = swiglu_features(q[:, None], fast.w0, fast.w2)[:, 0]  # [B, H, dh]
    return torch.einsum("bhde,bhe->bhd", read, hq)


@torch.library.custom_op("tttla::lact_token_step", mutates_args=("g0", "g1", "g2"))
def lact_token_step_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, etas: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor,
    w2: torch.Tensor, g0: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor, update_sign: float, token_causal: bool,
) -> torch.Tensor:
    """The LaCT kernel as an op a compiled decode step keeps whole -> o's shares [B, H, tiles, d] fp32."""
    batch, heads, d = v.shape
    dh = w1.shape[-1]
    q, k, v = (_unit_last_stride(x) for x in (q, k, v))
    w0, w1, w2 = (w.contiguous() for w in (w0, w1, w2))
    tiles = cdiv(dh, LACT_FEATURE_TILE)
    parts = new_buffer((batch, heads, tiles, d), torch.float32, v.device)
    lact_token_step_kernel[(batch * heads, tiles)](
        q, k, v, etas, w0, w1, w2, g0, g1, g2, parts, heads, float(update_sign),
        *q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *etas.stride(),
        D=d, DH=dh, BD=next_power_of_2(d), BE=LACT_FEATURE_TILE, TOKEN_CAUSAL=token_causal, num_warps=8,
    )
    return parts


@lact_token_step_op.register_fake
def _(q, k, v, etas, w0, w1, w2, g0, g1, g2, update_sign, token_causal):
    batch, heads, d = v.shape
    return v.new_empty(batch, heads, cdiv(w1.shape[-1], LACT_FEATURE_TILE), d, dtype=torch.float32)


def lact_token_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, etas: torch.Tensor, fast: FastWeights,
    grads: ChunkGradients, update_sign: float, token_causal: bool, allow_triton: bool = True,
) -> torch.Tensor:
    """One token per row through the fast-weight branch with W0, W1, W2 all fast -> o [B, H, d] (fp32
    on the kernel path, the state's dtype otherwise).

    q, k, v: [B, H, d] (any float dtype; the maths runs in the state's dtype); etas: [B, 3, H] the
    token's rates for W0, W1, W2; fast: the row's weights after the last complete chunk, w0, w2
    [B, H, dh, d] and w1 [B, H, d, dh]; grads: the partial chunk's gradients g0, g1, g2, which gain the
    token's terms in place. The Triton kernel runs for fp32 states where
    `kernels.triton_utils.use_triton(fast.w1, allow_triton)` says so; otherwise the torch form.
    """
    tensors = (fast.w0, fast.w1, fast.w2, grads.g0, grads.g1, grads.g2)
    if any(t.dtype != torch.float32 for t in tensors) or not use_triton(fast.w1, allow_triton):
        return lact_token_step_reference(q, k, v, etas, fast, grads, update_sign, token_causal)
    if not all(g.is_contiguous() for g in tensors[3:]):
        raise ValueError("the token step updates g0, g1, g2 in place: each must be a contiguous tensor")
    parts = lact_token_step_op(q, k, v, etas, fast.w0, fast.w1, fast.w2, *tensors[3:], float(update_sign),
                               bool(token_causal))
    return parts.sum(dim=2)
