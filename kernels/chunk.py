"""Triton chunk kernels for TTT as linear attention (the parallel form of `kernels.reference`).

Everything runs on a flat token axis: a batch `[B, T, H, *]` is viewed as one sequence of B*T
tokens whose documents start at `cu_seqlens` (a plain batch is B documents of T tokens). Chunks
restart at every document start; the state resets there. A `ChunkTable` lists every chunk's token
range and every document's range of chunks.

Four kernels, each over all chunks at once except the scans (one program per document, head and
state tile, walking its chunks in order). B documents of T tokens each (a plain batch) need no table on
the device: the kernels compute every chunk's range from T and C (`REGULAR`), so a call launches no
kernel to build one and keeps no tensor between calls (a cached table allocated inside a CUDA graph's
memory pool would be overwritten by its replays). Packed documents read their ranges from the table.

* `chunk_outer_kernel`:  out[c] = sum_{t in c} eta_t x_t y_t^T      (chunk updates A(c), and dS(c) in the backward)
* `state_scan_fwd_kernel`: S(c) = S(0) + sum_{c'<c} sign * M(c'), M(c) = beta_c M(c-1) + A(c)   (fp32)
* `state_scan_bwd_kernel`: its mirror, giving dA(c), dS(0), dM(0) and per-tile partial sums of dbeta
  For chunks of at most FUSED_SCAN_MAX_CHUNK tokens the scans form A(c) (and dS(c)) themselves, in
  registers, and chunk_outer does not run: the fp32 updates never touch memory (fla's chunk_fwd_h).
* `chunk_apply_kernel`: out_t = x_t W(c)^T + sign * sum_{s in c, s <= t (or >= t)} (x_t . y_s) z_s
  (the output, and in the backward dh(q), dh(k) and d(eta v); one kernel, four operand choices)

Operands are the input dtype (bf16 in training) with fp32 accumulation; states are accumulated in
fp32 and stored for the apply in the operand dtype, as the tensor cores read them.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from kernels.triton_utils import cdiv, dot_precision, launcher, new_buffer, tile


@dataclass
class ChunkTable:
    """Token ranges of all chunks of all documents, in order.

    Regular (`doc_len` > 0): `num_docs` documents of doc_len tokens each, chunk c of document i covering
    i * doc_len + c * C .. min(+C, (i + 1) * doc_len), computed by the kernels. Packed (`doc_len` 0):
    starts, ends: [NC] int32 token offsets on the flat axis; doc_chunks: [D + 1] int32, document i owns
    chunks doc_chunks[i] .. doc_chunks[i + 1] - 1.
    """

    num_docs: int
    num_chunks: int
    doc_len: int = 0
    starts: Optional[torch.Tensor] = None
    ends: Optional[torch.Tensor] = None
    doc_chunks: Optional[torch.Tensor] = None

    @property
    def regular(self) -> bool:
        return self.doc_len > 0

    def pointers(self, stand_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """starts, ends, doc_chunks as the kernels take them; `stand_in` for a regular table's (never read)."""
        if self.regular:
            return stand_in, stand_in, stand_in
        return self.starts, self.ends, self.doc_chunks


def regular_chunk_table(batch: int, seq_len: int, chunk_size: int) -> ChunkTable:
    """B documents of T tokens each: nothing on the device, nothing to synchronise."""
    return ChunkTable(batch, batch * math.ceil(seq_len / chunk_size), doc_len=seq_len)


def varlen_chunk_table(cu_seqlens: torch.Tensor, chunk_size: int, device) -> ChunkTable:
    """Documents at cu_seqlens ([D + 1], starting at 0, non-decreasing); empty documents own no chunk."""
    bounds = [int(x) for x in cu_seqlens.tolist()]
    starts, ends, doc_chunks = [], [], [0]
    for s, e in zip(bounds[:-1], bounds[1:]):
        for c in range(s, e, chunk_size):
            starts.append(c)
            ends.append(min(c + chunk_size, e))
        doc_chunks.append(len(starts))
    as_tensor = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    return ChunkTable(len(bounds) - 1, len(starts), starts=as_tensor(starts), ends=as_tensor(ends),
                      doc_chunks=as_tensor(doc_chunks))


# Tile shapes (tuned on H100 at d = 384, dh = 768, C = 2048; `benchmarks.kernel_ops --sweep` re-measures them).
OUTER_TILES = dict(BT=32, BX=128, BY=128, num_warps=8, num_stages=4)
APPLY_TILES = dict(BT=64, BM=64, BN=128, num_warps=4, num_stages=3)  # no intra-chunk term
APPLY_INTRA_TILES = dict(BT=64, BM=64, BN=128, num_warps=4, num_stages=3)  # token-causal
SCAN_TILES = dict(B1=64, B2=64, num_warps=4, num_stages=3)  # scan over stored chunk updates
FUSED_SCAN_TILES = dict(B1=64, B2=64, BT=64, num_warps=4, num_stages=2)  # update formed inside the scan (d x dh tile)
# Token-causal apply with a narrow output tile (BN < 64, i.e. a head dim of at most 32 on the z side)
# in 16-bit operands: the [BT, BT] x [BT, BN] score product miscompiles at BT = 64 on Hopper with
# Triton 3.6 (an out-of-bounds shared-memory read under compute-sanitizer; crashes or wrong dh(q),
# dh(k)), and is exact at BT = 32 over the randomised suite (tests/gpu/kernel_fuzz.py). fp32 operands
# take the IEEE FMA path and are unaffected; wider tiles (every default model shape) keep BT = 64.
NARROW_INTRA_MIN_BN, NARROW_INTRA_MAX_BT = 64, 32
# Chunks up to this many tokens form their update inside the scan (one program per state tile walks
# the whole document, as fla's chunk_fwd_h); longer chunks use chunk_outer over all chunks at once,
# which has C / BT times more parallel work per state tile. Measured in docs/kernels.md.
FUSED_SCAN_MAX_CHUNK = 256
# The fused scans halve their d tile until they have this many programs (long documents, few of them).
MIN_SCAN_PROGRAMS = 256


def fuse_update_into_scan(chunk_size: int) -> bool:
    return chunk_size <= FUSED_SCAN_MAX_CHUNK


# ----------------------------------------------------------------------------------------------
# chunk outer products: out[c, h] = sum_{t in c} eta_t x_t y_t^T   [NC, H, DX, DY] fp32


@triton.jit
def _chunk_range(i_c, starts_ptr, ends_ptr, doc_len, chunk_size, REGULAR: tl.constexpr):
    """Token range start .. end - 1 of chunk i_c on the flat axis (`ChunkTable`)."""
    if REGULAR:
        per_doc = (doc_len + chunk_size - 1) // chunk_size
        doc = i_c // per_doc
        start = doc * doc_len + (i_c - doc * per_doc) * chunk_size
        end = tl.minimum(start + chunk_size, (doc + 1) * doc_len)
    else:
        start = tl.load(starts_ptr + i_c)
        end = tl.load(ends_ptr + i_c)
    return start, end


@triton.jit
def _doc_range(i_doc, starts_ptr, ends_ptr, doc_chunks_ptr, doc_len, chunk_size, REGULAR: tl.constexpr):
    """Document i_doc's chunks c0 .. c1 - 1 and its tokens doc_start .. doc_end - 1 (`ChunkTable`)."""
    if REGULAR:
        per_doc = (doc_len + chunk_size - 1) // chunk_size
        c0 = i_doc * per_doc
        c1 = c0 + per_doc
        doc_start = i_doc * doc_len
        doc_end = doc_start + doc_len
    else:
        c0 = tl.load(doc_chunks_ptr + i_doc)
        c1 = tl.load(doc_chunks_ptr + i_doc + 1)
        doc_start = tl.load(starts_ptr + c0, mask=c1 > c0, other=0)
        doc_end = tl.load(ends_ptr + c1 - 1, mask=c1 > c0, other=0)
    return c0, c1, doc_start, doc_end


@triton.jit
def chunk_outer_kernel(
    x_ptr, y_ptr, eta_ptr, out_ptr, starts_ptr, ends_ptr, doc_len, chunk_size, H,
    DX: tl.constexpr, DY: tl.constexpr, BT: tl.constexpr, BX: tl.constexpr, BY: tl.constexpr,
    USE_ETA: tl.constexpr, PRECISION: tl.constexpr, REGULAR: tl.constexpr,
):
    i_c = tl.program_id(0)
    i_xy = tl.program_id(1)
    i_h = tl.program_id(2)
    NY: tl.constexpr = (DY + BY - 1) // BY
    i_x = i_xy // NY
    i_y = i_xy % NY
    start, end = _chunk_range(i_c, starts_ptr, ends_ptr, doc_len, chunk_size, REGULAR)
    offs_x = i_x * BX + tl.arange(0, BX)
    offs_y = i_y * BY + tl.arange(0, BY)
    acc = tl.zeros([BX, BY], dtype=tl.float32)
    for t0 in range(start, end, BT):
        offs_t = t0 + tl.arange(0, BT)
        mask_t = offs_t < end
        x = tl.load(x_ptr + (offs_t[:, None] * H + i_h) * DX + offs_x[None, :],
                    mask=mask_t[:, None] & (offs_x[None, :] < DX), other=0.0)
        y = tl.load(y_ptr + (offs_t[:, None] * H + i_h) * DY + offs_y[None, :],
                    mask=mask_t[:, None] & (offs_y[None, :] < DY), other=0.0)
        if USE_ETA:
            eta = tl.load(eta_ptr + offs_t * H + i_h, mask=mask_t, other=0.0).to(tl.float32)
            x = (x.to(tl.float32) * eta[:, None]).to(y.dtype)
        acc += tl.dot(tl.trans(x), y, input_precision=PRECISION)
    out = out_ptr + (i_c * H + i_h) * DX * DY + offs_x[:, None] * DY + offs_y[None, :]
    tl.store(out, acc, mask=(offs_x[:, None] < DX) & (offs_y[None, :] < DY))


def chunk_outer(x, y, eta, table: ChunkTable, chunk_size: int) -> torch.Tensor:
    """x: [TT, H, DX], y: [TT, H, DY], eta: [TT, H] or None -> [NC, H, DX, DY] fp32."""
    _, heads, dx = x.shape
    dy = y.shape[-1]
    out = new_buffer((table.num_chunks, heads, dx, dy), torch.float32, x.device)
    tiles = OUTER_TILES
    bx, by = tile(dx, tiles["BX"]), tile(dy, tiles["BY"])
    grid = (table.num_chunks, cdiv(dx, bx) * cdiv(dy, by), heads)
    starts, ends, _ = table.pointers(x)
    launcher(chunk_outer_kernel)[grid](
        x, y, eta if eta is not None else x, out, starts, ends, table.doc_len, chunk_size, heads,
        DX=dx, DY=dy, BT=tiles["BT"], BX=bx, BY=by, USE_ETA=eta is not None,
        PRECISION=dot_precision(x.dtype), REGULAR=table.regular, num_warps=tiles["num_warps"],
        num_stages=tiles["num_stages"],
    )
    return out


# ----------------------------------------------------------------------------------------------
# state scans (one program per document, head and state tile; chunks in order)


@triton.jit
def _state_tile(H, D1: tl.constexpr, D2: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr):
    """This program's [B1, B2] tile of one document's and head's [D1, D2] state, as both state scans
    lay out their grid (tile, document, head): the tile, document and head indices, the row and
    column offsets, the flat offsets and bounds mask within the state, and where that state starts."""
    i_tile = tl.program_id(0)
    i_doc = tl.program_id(1)
    i_h = tl.program_id(2)
    N2: tl.constexpr = (D2 + B2 - 1) // B2
    offs_1 = (i_tile // N2) * B1 + tl.arange(0, B1)
    offs_2 = (i_tile % N2) * B2 + tl.arange(0, B2)
    offs = offs_1[:, None] * D2 + offs_2[None, :]
    mask = (offs_1[:, None] < D1) & (offs_2[None, :] < D2)
    doc_base = (i_doc * H + i_h) * D1 * D2
    return i_tile, i_doc, i_h, offs_1, offs_2, offs, mask, doc_base


@triton.jit
def _chunk_outer_tile(x_ptr, y_ptr, eta_ptr, start, end, i_h, H, offs_1, offs_2,
                      D1: tl.constexpr, D2: tl.constexpr, BT: tl.constexpr, NSUB: tl.constexpr,
                      USE_ETA: tl.constexpr, PRECISION: tl.constexpr):
    """sum_{start <= t < end} eta_t x_t[offs_1] y_t[offs_2]^T: [B1, B2] fp32 (end - start <= NSUB * BT)."""
    acc = tl.zeros([offs_1.shape[0], offs_2.shape[0]], dtype=tl.float32)
    for j in range(NSUB):
        offs_t = start + j * BT + tl.arange(0, BT)
        mask_t = offs_t < end
        x = tl.load(x_ptr + (offs_t[:, None] * H + i_h) * D1 + offs_1[None, :],
                    mask=mask_t[:, None] & (offs_1[None, :] < D1), other=0.0)
        y = tl.load(y_ptr + (offs_t[:, None] * H + i_h) * D2 + offs_2[None, :],
                    mask=mask_t[:, None] & (offs_2[None, :] < D2), other=0.0)
        if USE_ETA:
            eta = tl.load(eta_ptr + offs_t * H + i_h, mask=mask_t, other=0.0).to(tl.float32)
            x = (x.to(tl.float32) * eta[:, None]).to(y.dtype)
        acc += tl.dot(tl.trans(x), y, input_precision=PRECISION)
    return acc


@triton.jit
def state_scan_fwd_kernel(
    upd_ptr, x_ptr, y_ptr, eta_ptr, starts_ptr, ends_ptr, doc_len, chunk_size,
    states_ptr, init_ptr, final_ptr, beta_ptr, init_mom_ptr, final_mom_ptr, mom_ptr,
    doc_chunks_ptr, H, sign,
    D1: tl.constexpr, D2: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr,
    HAS_INIT: tl.constexpr, HAS_MOM: tl.constexpr, HAS_INIT_MOM: tl.constexpr,
    FUSED: tl.constexpr, BT: tl.constexpr, NSUB: tl.constexpr, PRECISION: tl.constexpr, REGULAR: tl.constexpr,
):
    """FUSED: the chunk update A(c) = sum_t eta_t x_t y_t^T is computed here, from x = v [TT, H, D1]
    and y = h(k) [TT, H, D2], and never leaves registers; otherwise it is read from upd_ptr."""
    sign = tl.cast(sign, tl.float32)  # a compiled graph launching the kernel itself passes Python floats as fp64
    i_tile, i_doc, i_h, offs_1, offs_2, offs, mask, doc_base = _state_tile(H, D1, D2, B1, B2)
    state = tl.zeros([B1, B2], dtype=tl.float32)
    if HAS_INIT:
        state = tl.load(init_ptr + doc_base + offs, mask=mask, other=0.0).to(tl.float32)
    momentum = tl.zeros([B1, B2], dtype=tl.float32)
    if HAS_INIT_MOM:
        momentum = tl.load(init_mom_ptr + doc_base + offs, mask=mask, other=0.0).to(tl.float32)
    # chunk c of the document covers doc_start + (c - c0) C .. min(+C, doc_end)
    c0, c1, doc_start, doc_end = _doc_range(i_doc, starts_ptr, ends_ptr, doc_chunks_ptr, doc_len, chunk_size, REGULAR)
    for c in range(c0, c1):
        base = (c * H + i_h) * D1 * D2
        if FUSED:
            start = doc_start + (c - c0) * chunk_size
            update = _chunk_outer_tile(x_ptr, y_ptr, eta_ptr, start, tl.minimum(start + chunk_size, doc_end),
                                       i_h, H, offs_1, offs_2, D1, D2, BT, NSUB, True, PRECISION)
        else:
            update = tl.load(upd_ptr + base + offs, mask=mask, other=0.0)
        tl.store(states_ptr + base + offs, state.to(states_ptr.dtype.element_ty), mask=mask)
        if HAS_MOM:
            tl.store(mom_ptr + base + offs, momentum, mask=mask)
            beta = tl.load(beta_ptr + c * H + i_h).to(tl.float32)
            momentum = beta * momentum + update
            state += sign * momentum
        else:
            state += sign * update
    tl.store(final_ptr + doc_base + offs, state, mask=mask)
    if HAS_MOM:
        tl.store(final_mom_ptr + doc_base + offs, momentum, mask=mask)


@triton.jit
def state_scan_bwd_kernel(
    dstate_ptr, x_ptr, y_ptr, starts_ptr, ends_ptr, doc_len, chunk_size,
    dupd_ptr, dfinal_ptr, dinit_ptr, beta_ptr, mom_ptr, dfinal_mom_ptr, dinit_mom_ptr,
    dbeta_ptr, doc_chunks_ptr, H, sign, NTILES,
    D1: tl.constexpr, D2: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr,
    HAS_DFINAL: tl.constexpr, HAS_MOM: tl.constexpr, HAS_DFINAL_MOM: tl.constexpr,
    FUSED: tl.constexpr, BT: tl.constexpr, NSUB: tl.constexpr, PRECISION: tl.constexpr, REGULAR: tl.constexpr,
):
    """FUSED: dL/dS(c) = sum_t x_t y_t^T is computed here from x = dO [TT, H, D1] and y = h(q) [TT, H, D2];
    otherwise it is read from dstate_ptr."""
    sign = tl.cast(sign, tl.float32)  # a compiled graph launching the kernel itself passes Python floats as fp64
    i_tile, i_doc, i_h, offs_1, offs_2, offs, mask, doc_base = _state_tile(H, D1, D2, B1, B2)
    # suffix: dL/dU(c) = dS_final + sum_{c' > c} dS(c')
    suffix = tl.zeros([B1, B2], dtype=tl.float32)
    if HAS_DFINAL:
        suffix = tl.load(dfinal_ptr + doc_base + offs, mask=mask, other=0.0).to(tl.float32)
    # carry: beta_{c+1} dM(c+1), the momentum gradient flowing back into chunk c
    carry = tl.zeros([B1, B2], dtype=tl.float32)
    if HAS_DFINAL_MOM:
        carry = tl.load(dfinal_mom_ptr + doc_base + offs, mask=mask, other=0.0).to(tl.float32)
    c0, c1, doc_start, doc_end = _doc_range(i_doc, starts_ptr, ends_ptr, doc_chunks_ptr, doc_len, chunk_size, REGULAR)
    for i in range(0, c1 - c0):
        c = c1 - 1 - i
        base = (c * H + i_h) * D1 * D2
        if FUSED:
            start = doc_start + (c - c0) * chunk_size
            dstate = _chunk_outer_tile(x_ptr, y_ptr, x_ptr, start, tl.minimum(start + chunk_size, doc_end),
                                       i_h, H, offs_1, offs_2, D1, D2, BT, NSUB, False, PRECISION)
        else:
            dstate = tl.load(dstate_ptr + base + offs, mask=mask, other=0.0)
        if HAS_MOM:
            dmom = sign * suffix + carry
            tl.store(dupd_ptr + base + offs, dmom.to(dupd_ptr.dtype.element_ty), mask=mask)
            mom_prev = tl.load(mom_ptr + base + offs, mask=mask, other=0.0)
            tl.store(dbeta_ptr + (c * H + i_h) * NTILES + i_tile, tl.sum(tl.sum(dmom * mom_prev, axis=1), axis=0))
            beta = tl.load(beta_ptr + c * H + i_h).to(tl.float32)
            carry = beta * dmom
        else:
            tl.store(dupd_ptr + base + offs, (sign * suffix).to(dupd_ptr.dtype.element_ty), mask=mask)
        suffix += dstate
    tl.store(dinit_ptr + doc_base + offs, suffix, mask=mask)
    if HAS_MOM:
        tl.store(dinit_mom_ptr + doc_base + offs, carry, mask=mask)


@functools.lru_cache(maxsize=256)
def _scan_launch(d1: int, d2: int, chunk_size: int, fused: bool, dtype, docs_x_heads: int) -> dict:
    """Tile shapes and the fused-update constants of one scan launch."""
    tiles = FUSED_SCAN_TILES if fused else SCAN_TILES
    b1, b2 = tile(d1, tiles["B1"]), tile(d2, tiles["B2"])
    while fused and b1 > 16 and docs_x_heads * cdiv(d1, b1) * cdiv(d2, b2) < MIN_SCAN_PROGRAMS:
        b1 //= 2
    bt = min(tiles["BT"], tile(chunk_size, tiles["BT"])) if fused else 16
    return dict(B1=b1, B2=b2, FUSED=fused, BT=bt, NSUB=cdiv(chunk_size, bt) if fused else 1,
                PRECISION=dot_precision(dtype), num_warps=tiles["num_warps"],
                num_stages=tiles["num_stages"])


def state_scan_fwd(table: ChunkTable, initial_state, beta, initial_momentum, sign: float, dtype, *,
                   chunk_size: int, updates=None, v=None, hk=None, eta=None):
    """The state each chunk reads, from either the chunk updates A(c) (`updates` [NC, H, d, dh] fp32,
    from `chunk_outer`) or, fused, from v [TT, H, d], hk [TT, H, dh] and eta [TT, H]:
    A(c) = sum_{t in c} eta_t v_t hk_t^T is then formed in registers and never stored. `chunk_size`
    places the chunks (a regular table's, and the fused update's).
    beta: [NC, H] or None.

    Returns (states [NC, H, d, dh] in `dtype`: the state each chunk reads; final [D, H, d, dh] fp32;
    final momentum [D, H, d, dh] fp32 or None; momenta [NC, H, d, dh] fp32 (M(c-1)) or None).
    """
    fused = updates is None
    if fused:
        heads, d1, d2 = v.shape[1], v.shape[2], hk.shape[2]
        device = v.device
    else:
        _, heads, d1, d2 = updates.shape
        device = updates.device
    shape = (table.num_chunks, heads, d1, d2)
    states = new_buffer(shape, dtype, device)
    final = new_buffer((table.num_docs, heads, d1, d2), torch.float32, device)
    has_mom = beta is not None
    final_mom = new_buffer(final.shape, torch.float32, device) if has_mom else None
    momenta = new_buffer(shape, torch.float32, device) if has_mom else None
    launch = _scan_launch(d1, d2, chunk_size, fused, dtype, table.num_docs * heads)
    grid = (cdiv(d1, launch["B1"]) * cdiv(d2, launch["B2"]), table.num_docs, heads)
    any_ = v if fused else updates  # an input stands in for pointers a variant does not touch
    starts, ends, doc_chunks = table.pointers(any_)
    launcher(state_scan_fwd_kernel)[grid](
        any_ if fused else updates, v if fused else any_, hk if fused else any_, eta if fused else any_,
        starts, ends, table.doc_len, chunk_size, states, initial_state if initial_state is not None else any_, final,
        beta if has_mom else any_, initial_momentum if initial_momentum is not None else any_,
        final_mom if has_mom else any_, momenta if has_mom else any_,
        doc_chunks, heads, float(sign), D1=d1, D2=d2, HAS_INIT=initial_state is not None, HAS_MOM=has_mom,
        HAS_INIT_MOM=initial_momentum is not None, REGULAR=table.regular, **launch,
    )
    return states, final, final_mom, momenta


def state_scan_bwd(table: ChunkTable, dfinal, beta, momenta, dfinal_mom, sign: float, dtype, *,
                   chunk_size: int, dstates=None, do=None, hq=None):
    """Mirror of `state_scan_fwd`. dL/dS(c) for the state each chunk read comes either from `dstates`
    ([NC, H, d, dh] fp32, from `chunk_outer`) or, fused, from do [TT, H, d] and hq [TT, H, dh]
    (dL/dS(c) = sum_{t in c} do_t hq_t^T, formed in registers).

    Returns (dupdates [NC, H, d, dh] in `dtype`: dL/dA(c); dinit [D, H, d, dh] fp32;
    dinit_momentum fp32 or None; dbeta [NC, H] fp32 or None).
    """
    fused = dstates is None
    if fused:
        heads, d1, d2 = do.shape[1], do.shape[2], hq.shape[2]
        device = do.device
    else:
        _, heads, d1, d2 = dstates.shape
        device = dstates.device
    nc = table.num_chunks
    dupdates = new_buffer((nc, heads, d1, d2), dtype, device)
    dinit = new_buffer((table.num_docs, heads, d1, d2), torch.float32, device)
    has_mom = beta is not None
    dinit_mom = new_buffer(dinit.shape, torch.float32, device) if has_mom else None
    launch = _scan_launch(d1, d2, chunk_size, fused, dtype, table.num_docs * heads)
    ntiles = cdiv(d1, launch["B1"]) * cdiv(d2, launch["B2"])
    dbeta_tiles = new_buffer((nc, heads, ntiles), torch.float32, device) if has_mom else None
    grid = (ntiles, table.num_docs, heads)
    any_ = do if fused else dstates  # an input stands in for pointers a variant does not touch
    starts, ends, doc_chunks = table.pointers(any_)
    launcher(state_scan_bwd_kernel)[grid](
        any_ if fused else dstates, do if fused else any_, hq if fused else any_, starts, ends, table.doc_len,
        chunk_size, dupdates, dfinal if dfinal is not None else any_, dinit,
        beta if has_mom else any_, momenta if has_mom else any_,
        dfinal_mom if dfinal_mom is not None else any_, dinit_mom if has_mom else any_,
        dbeta_tiles if has_mom else any_, doc_chunks, heads, float(sign), ntiles,
        D1=d1, D2=d2, HAS_DFINAL=dfinal is not None, HAS_MOM=has_mom,
        HAS_DFINAL_MOM=has_mom and dfinal_mom is not None, REGULAR=table.regular, **launch,
    )
    dbeta = dbeta_tiles.sum(-1) if has_mom else None
    return dupdates, dinit, dinit_mom, dbeta


# ----------------------------------------------------------------------------------------------
# chunk apply: out_t = x_t W(c)^T + sign * sum_{s in c, s <= t (REVERSE: s >= t)} (x_t . y_s) z_s


@triton.jit
def _masked_scores_times_z(scores, z_ptr, eta_ptr, offs_t, offs_s, mask_s, offs_n, mask_n, i_h, H,
                           DZ: tl.constexpr, REVERSE: tl.constexpr, ETA_COL: tl.constexpr, PRECISION: tl.constexpr):
    """(scores [BT, BS], eta_s-scaled when ETA_COL, kept where s <= t (REVERSE: s >= t)) @ z[offs_s, offs_n]."""
    if ETA_COL:
        eta_s = tl.load(eta_ptr + offs_s * H + i_h, mask=mask_s, other=0.0).to(tl.float32)
        scores = scores * eta_s[None, :]
    if REVERSE:
        keep = (offs_t[:, None] <= offs_s[None, :]) & mask_s[None, :]
    else:
        keep = (offs_t[:, None] >= offs_s[None, :]) & mask_s[None, :]
    scores = tl.where(keep, scores, 0.0)
    z = tl.load(z_ptr + (offs_s[:, None] * H + i_h) * DZ + offs_n[None, :],
                mask=mask_s[:, None] & mask_n[None, :], other=0.0)
    return tl.dot(scores.to(z.dtype), z, input_precision=PRECISION)


@triton.jit
def chunk_apply_kernel(
    x_ptr, y_ptr, z_ptr, w_ptr, eta_ptr, out_ptr, vdot_ptr, deta_ptr, starts_ptr, ends_ptr, doc_len, chunk_size,
    H, sign, stride_wm, stride_wn,
    DX: tl.constexpr, DZ: tl.constexpr, NSUB: tl.constexpr,
    BT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    INTRA: tl.constexpr, REVERSE: tl.constexpr, ETA_ROW: tl.constexpr, ETA_COL: tl.constexpr,
    ETA_DOT: tl.constexpr, PRECISION: tl.constexpr, REGULAR: tl.constexpr,
):
    """x, y: [TT, H, DX]; z, out: [TT, H, DZ]; w: [NC, H, *] read as W^T[m, n] = w[m*stride_wm + n*stride_wn].

    ETA_COL scales the intra-chunk scores by eta_s (keys weighted), ETA_ROW scales the output rows
    by eta_t; ETA_DOT also writes deta partials sum_n vdot[t, n] * out[t, n] (before ETA_ROW).
    """
    sign = tl.cast(sign, tl.float32)  # a compiled graph launching the kernel itself passes Python floats as fp64
    i_cb = tl.program_id(0)
    i_n = tl.program_id(1)
    i_h = tl.program_id(2)
    i_c = i_cb // NSUB
    start, end = _chunk_range(i_c, starts_ptr, ends_ptr, doc_len, chunk_size, REGULAR)
    t0 = start + (i_cb % NSUB) * BT
    if t0 >= end:
        return
    offs_t = t0 + tl.arange(0, BT)
    mask_t = offs_t < end
    offs_n = i_n * BN + tl.arange(0, BN)
    mask_n = offs_n < DZ
    w_base = w_ptr + (i_c * H + i_h) * DX * DZ
    # A chunk of one sub-block (NSUB == 1) has only the diagonal score block: its scores share the
    # x tiles of the state product and are accumulated in the same loop.
    ONE_BLOCK: tl.constexpr = INTRA and NSUB == 1
    acc = tl.zeros([BT, BN], dtype=tl.float32)
    diag_scores = tl.zeros([BT, BT], dtype=tl.float32)
    for m0 in range(0, DX, BM):
        offs_m = m0 + tl.arange(0, BM)
        mask_m = offs_m < DX
        x = tl.load(x_ptr + (offs_t[:, None] * H + i_h) * DX + offs_m[None, :],
                    mask=mask_t[:, None] & mask_m[None, :], other=0.0)
        w = tl.load(w_base + offs_m[:, None] * stride_wm + offs_n[None, :] * stride_wn,
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        acc += tl.dot(x, w.to(x.dtype), input_precision=PRECISION)
        if ONE_BLOCK:
            y = tl.load(y_ptr + (offs_t[:, None] * H + i_h) * DX + offs_m[None, :],
                        mask=mask_t[:, None] & mask_m[None, :], other=0.0)
            diag_scores += tl.dot(x, tl.trans(y), input_precision=PRECISION)
    if ONE_BLOCK:
        acc += sign * _masked_scores_times_z(diag_scores, z_ptr, eta_ptr, offs_t, offs_t, mask_t, offs_n, mask_n,
                                             i_h, H, DZ, REVERSE, ETA_COL, PRECISION)
    elif INTRA:
        if REVERSE:
            lo = t0
            hi = end
        else:
            lo = start
            hi = tl.minimum(t0 + BT, end)
        intra = tl.zeros([BT, BN], dtype=tl.float32)
        for s0 in range(lo, hi, BT):
            offs_s = s0 + tl.arange(0, BT)
            mask_s = offs_s < end
            scores = tl.zeros([BT, BT], dtype=tl.float32)
            for m0 in range(0, DX, BM):
                offs_m = m0 + tl.arange(0, BM)
                mask_m = offs_m < DX
                x = tl.load(x_ptr + (offs_t[:, None] * H + i_h) * DX + offs_m[None, :],
                            mask=mask_t[:, None] & mask_m[None, :], other=0.0)
                y = tl.load(y_ptr + (offs_s[:, None] * H + i_h) * DX + offs_m[None, :],
                            mask=mask_s[:, None] & mask_m[None, :], other=0.0)
                scores += tl.dot(x, tl.trans(y), input_precision=PRECISION)
            intra += _masked_scores_times_z(scores, z_ptr, eta_ptr, offs_t, offs_s, mask_s, offs_n, mask_n,
                                            i_h, H, DZ, REVERSE, ETA_COL, PRECISION)
        acc += sign * intra
    if ETA_DOT:
        vd = tl.load(vdot_ptr + (offs_t[:, None] * H + i_h) * DZ + offs_n[None, :],
                     mask=mask_t[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        tl.store(deta_ptr + (offs_t * H + i_h) * tl.num_programs(1) + i_n,
                 tl.sum(vd * acc, axis=1), mask=mask_t)
    if ETA_ROW:
        eta_t = tl.load(eta_ptr + offs_t * H + i_h, mask=mask_t, other=0.0).to(tl.float32)
        acc = acc * eta_t[:, None]
    tl.store(out_ptr + (offs_t[:, None] * H + i_h) * DZ + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_t[:, None] & mask_n[None, :])


def chunk_apply(
    x, y, z, w, w_transposed: bool, eta, table: ChunkTable, chunk_size: int, *, intra: bool,
    reverse: bool = False, eta_row: bool = False, eta_col: bool = False, vdot=None, sign: float = 1.0,
):
    """x, y: [TT, H, DX]; z: [TT, H, DZ]; w: [NC, H, DZ, DX] (w_transposed=False: out = x W^T)
    or [NC, H, DX, DZ] (w_transposed=True: out = x W). Returns out [TT, H, DZ] in x's dtype and,
    when vdot is given, deta [TT, H] fp32 = sum_n vdot * out (out before eta_row scaling).
    """
    tt, heads, dx = x.shape
    dz = z.shape[-1]
    out = new_buffer((tt, heads, dz), x.dtype, x.device)
    launch = _apply_launch(dx, dz, chunk_size, intra, x.dtype)
    nn = cdiv(dz, launch["BN"])
    deta_tiles = new_buffer((tt, heads, nn), torch.float32, x.device) if vdot is not None else None
    stride_wm, stride_wn = (dz, 1) if w_transposed else (1, dx)
    grid = (table.num_chunks * launch["NSUB"], nn, heads)
    starts, ends, _ = table.pointers(x)
    launcher(chunk_apply_kernel)[grid](
        x, y, z, w, eta if eta is not None else x, out, vdot if vdot is not None else x,
        deta_tiles if vdot is not None else x, starts, ends, table.doc_len, chunk_size, heads, float(sign),
        stride_wm, stride_wn, DX=dx, DZ=dz, INTRA=intra, REVERSE=reverse, ETA_ROW=eta_row, ETA_COL=eta_col,
        ETA_DOT=vdot is not None, PRECISION=dot_precision(x.dtype), REGULAR=table.regular, **launch,
    )
    return out, (deta_tiles.sum(-1) if vdot is not None else None)


@functools.lru_cache(maxsize=256)
def _apply_launch(dx: int, dz: int, chunk_size: int, intra: bool, dtype: torch.dtype) -> dict:
    """Tile shapes of one `chunk_apply_kernel` launch."""
    tiles = APPLY_INTRA_TILES if intra else APPLY_TILES
    bt = min(tiles["BT"], tile(chunk_size, tiles["BT"]))
    bm, bn = tile(dx, tiles["BM"]), tile(dz, tiles["BN"])
    if intra and bn < NARROW_INTRA_MIN_BN and dtype != torch.float32:
        bt = min(bt, NARROW_INTRA_MAX_BT)
    return dict(BT=bt, BM=bm, BN=bn, NSUB=cdiv(chunk_size, bt),
                num_warps=tiles["num_warps"] if bn * bt >= 64 * 128 else 4, num_stages=tiles["num_stages"])


# ----------------------------------------------------------------------------------------------
# forward and backward of the whole layer on the flat token axis


def ttt_la_fwd(hq, hk, v, eta, initial_state, table: ChunkTable, chunk_size: int, beta, initial_momentum,
               token_causal: bool, sign: float):
    """hq, hk: [TT, H, dh]; v: [TT, H, d]; eta: [TT, H]; initial_state: [D, H, d, dh] or None;
    beta: [NC, H] or None. Returns o [TT, H, d], final [D, H, d, dh], final momentum or None,
    and what the backward needs (states [NC, H, d, dh], momenta or None)."""
    scan_args = (table, initial_state, beta, initial_momentum, sign, hq.dtype)
    if fuse_update_into_scan(chunk_size):
        states, final, final_mom, momenta = state_scan_fwd(*scan_args, v=v, hk=hk, eta=eta, chunk_size=chunk_size)
    else:
        updates = chunk_outer(v, hk, eta, table, chunk_size)  # A(c): [NC, H, d, dh] fp32
        states, final, final_mom, momenta = state_scan_fwd(*scan_args, updates=updates, chunk_size=chunk_size)
        del updates
    o, _ = chunk_apply(hq, hk, v, states, False, eta, table, chunk_size, intra=token_causal, eta_col=True,
                       sign=sign)
    return o, final, final_mom, states, momenta


def ttt_la_bwd(do, hq, hk, v, eta, states, momenta, beta, table: ChunkTable, chunk_size: int,
               dfinal, dfinal_mom, token_causal: bool, sign: float):
    """Returns dhq, dhk, dv (input dtype), deta [TT, H] fp32, dinit [D, H, d, dh] fp32,
    dinit_momentum or None, dbeta [NC, H] or None."""
    do = do.contiguous()
    scan_args = (table, dfinal, beta, momenta, dfinal_mom, sign, hq.dtype)
    if fuse_update_into_scan(chunk_size):
        dupdates, dinit, dinit_mom, dbeta = state_scan_bwd(*scan_args, do=do, hq=hq, chunk_size=chunk_size)
    else:
        dstates = chunk_outer(do, hq, None, table, chunk_size)  # dL/dS(c) = sum_t do_t hq_t^T, [NC, H, d, dh] fp32
        dupdates, dinit, dinit_mom, dbeta = state_scan_bwd(*scan_args, dstates=dstates, chunk_size=chunk_size)
        del dstates
    # dhq_t = S(c)^T do_t + sign * sum_{s <= t} eta_s (do_t . v_s) hk_s
    dhq, _ = chunk_apply(do, v, hk, states, True, eta, table, chunk_size, intra=token_causal, eta_col=True,
                         sign=sign)
    # dhk_s = eta_s (dA(c)^T v_s + sign * sum_{t >= s} (v_s . do_t) hq_t)
    dhk, _ = chunk_apply(v, do, hq, dupdates, True, eta, table, chunk_size, intra=token_causal, reverse=True,
                         eta_row=True, sign=sign)
    # g_s = dL/d(eta_s v_s) = dA(c) hk_s + sign * sum_{t >= s} (hk_s . hq_t) do_t;  dv = eta g, deta = v . g
    dv, deta = chunk_apply(hk, hq, do, dupdates, False, eta, table, chunk_size, intra=token_causal,
                           reverse=True, eta_row=True, vdot=v, sign=sign)
    return dhq, dhk, dv, deta, dinit, dinit_mom, dbeta
