"""The SwiGLU feature map h(x) = silu(W0 x) * (W2 x): a fused Triton kernel and the torch form.

`swiglu_features(x, w0, w2)` is the public op: it runs the fused kernels below where
`kernels.triton_utils.use_triton` says so (CUDA tensors by default), elsewhere
`kernels.lact.swiglu_features`.

Forward, one kernel (`swiglu_projection_kernel`): a program owns a [BM tokens, BN features] tile of
one head, runs both GEMMs x W0^T and x W2^T over the same x tiles (two fp32 accumulators) and writes
silu(a) * b in the input dtype straight into [B, T, H, dh], the layout the chunk kernels read: no
[T, H, 2 dh] intermediate, no head-major copies.

Backward, three launches:
  1. the same kernel with GRAD=True recomputes a, b (or reads them when the forward saved them,
     `SAVE_PROJECTIONS`) and writes da = g b silu'(a), db = g silu(a) as one [TT, H, 2 dh] tensor;
  2. `head_matmul_kernel`: dx = da W0 + db W2 (K = 2 dh, the stacked weights);
  3. `head_matmul_kernel`: [dW0; dW2] = [da, db]^T x, split over tokens into fp32 partial sums.
Both matmuls read the token-major layouts through strides; nothing is permuted.

Forward and backward are registered as torch.library ops (`tttla::swiglu_features`,
`tttla::swiglu_features_backward`) with fake implementations and an autograd formula, so
torch.compile keeps them whole in a graph (no break) and fuses the elementwise work around them.

The torch form (`swiglu_features_packed`: one cuBLAS GEMM over stacked weights, gate and product
fused by torch.compile) is kept for the benchmark's comparison; docs/kernels.md measures both.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import lact
from kernels.triton_utils import (
    SUPPORTED_DTYPES, absent, cdiv, dot_precision, inline_kernels, inline_op, launcher, new_buffer, tile, use_triton,
)

# Tile shapes (measured at d = 384, dh = 768; `benchmarks.kernel_ops --variants` re-measures them).
PROJECTION_TILES = dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=3)
MATMUL_TILES = dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=3)
# Keep a and b from the forward (2 dh values per token and head, operand dtype; only when a gradient
# will be taken) instead of recomputing them in the backward: on the device, a layer-shape fwd+bwd
# took 5.6 ms per input saved vs 6.6 ms recomputed, for 2 dh x 2 bytes more activation memory per
# token and head. docs/kernels.md has the numbers.
SAVE_PROJECTIONS = True
# Enough programs to fill the GPU when the token axis is split for the weight gradient.
WEIGHT_GRAD_PROGRAMS = 512


@triton.jit
def swiglu_projection_kernel(
    x_ptr, w0_ptr, w2_ptr, out_ptr, ab_ptr, g_ptr, TT, H,
    D: tl.constexpr, DH: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    GRAD: tl.constexpr, SAVE_AB: tl.constexpr, LOAD_AB: tl.constexpr, PRECISION: tl.constexpr,
):
    """x: [TT, H, D]; w0, w2: [H, DH, D]; ab: [TT, H, 2 DH] (a then b).

    GRAD=False: out [TT, H, DH] = silu(a) * b, and a, b to ab when SAVE_AB.
    GRAD=True: g [TT, H, DH] is dL/dh; out [TT, H, 2 DH] = (da, db); a, b read from ab when LOAD_AB.
    """
    i_m = tl.program_id(0)
    i_n = tl.program_id(1)
    i_h = tl.program_id(2)
    offs_m = i_m * BM + tl.arange(0, BM)
    offs_n = i_n * BN + tl.arange(0, BN)
    mask_m = offs_m < TT
    mask_n = offs_n < DH
    mask = mask_m[:, None] & mask_n[None, :]
    ab_rows = ab_ptr + (offs_m[:, None] * H + i_h) * (2 * DH) + offs_n[None, :]
    if LOAD_AB:
        a = tl.load(ab_rows, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(ab_rows + DH, mask=mask, other=0.0).to(tl.float32)
    else:
        a = tl.zeros([BM, BN], dtype=tl.float32)
        b = tl.zeros([BM, BN], dtype=tl.float32)
        w_base = i_h * DH * D
        for k0 in range(0, D, BK):
            offs_k = k0 + tl.arange(0, BK)
            mask_k = offs_k < D
            x = tl.load(x_ptr + (offs_m[:, None] * H + i_h) * D + offs_k[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w_offs = w_base + offs_n[None, :] * D + offs_k[:, None]  # W^T tile [BK, BN]
            w_mask = mask_k[:, None] & mask_n[None, :]
            a += tl.dot(x, tl.load(w0_ptr + w_offs, mask=w_mask, other=0.0), input_precision=PRECISION)
            b += tl.dot(x, tl.load(w2_ptr + w_offs, mask=w_mask, other=0.0), input_precision=PRECISION)
    sig = 1.0 / (1.0 + tl.exp(-a))
    silu = a * sig
    if GRAD:
        g = tl.load(g_ptr + (offs_m[:, None] * H + i_h) * DH + offs_n[None, :], mask=mask, other=0.0)
        g = g.to(tl.float32)
        da = g * b * sig * (1.0 + a * (1.0 - sig))
        db = g * silu
        out_rows = out_ptr + (offs_m[:, None] * H + i_h) * (2 * DH) + offs_n[None, :]
        tl.store(out_rows, da.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_rows + DH, db.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + (offs_m[:, None] * H + i_h) * DH + offs_n[None, :],
                 (silu * b).to(out_ptr.dtype.element_ty), mask=mask)
        if SAVE_AB:
            tl.store(ab_rows, a.to(ab_ptr.dtype.element_ty), mask=mask)
            tl.store(ab_rows + DH, b.to(ab_ptr.dtype.element_ty), mask=mask)


@triton.jit
def head_matmul_kernel(
    a_ptr, b_ptr, c_ptr, M, N, K, K_SPLIT,
    stride_ah, stride_am, stride_ak, stride_bh, stride_bk, stride_bn,
    stride_cs, stride_ch, stride_cm, stride_cn,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
):
    """c[s, h] = sum_{k in split s} a[h][:, k] b[h][k, :], every operand through its strides."""
    i_mn = tl.program_id(0)
    i_h = tl.program_id(1)
    i_s = tl.program_id(2)
    num_n = tl.cdiv(N, BN)
    offs_m = (i_mn // num_n) * BM + tl.arange(0, BM)
    offs_n = (i_mn % num_n) * BN + tl.arange(0, BN)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_base = a_ptr + i_h * stride_ah + offs_m[:, None] * stride_am
    b_base = b_ptr + i_h * stride_bh + offs_n[None, :] * stride_bn
    k_lo = i_s * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        offs_k = k0 + tl.arange(0, BK)
        mask_k = offs_k < k_hi
        a = tl.load(a_base + offs_k[None, :] * stride_ak, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_base + offs_k[:, None] * stride_bk, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc += tl.dot(a, b, input_precision=PRECISION)
    c = c_ptr + i_s * stride_cs + i_h * stride_ch + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _head_matmul(a, a_strides, b, b_strides, c, c_strides, M, N, K, heads, splits=1):
    """Launches `head_matmul_kernel`; strides as (h, m, k), (h, k, n) and (split, h, m, n)."""
    tiles = MATMUL_TILES
    bm, bn, bk = tile(M, tiles["BM"]), tile(N, tiles["BN"]), tile(K, tiles["BK"])
    k_split = cdiv(cdiv(K, splits), bk) * bk
    grid = (cdiv(M, bm) * cdiv(N, bn), heads, cdiv(K, k_split))
    launcher(head_matmul_kernel)[grid](
        a, b, c, M, N, K, k_split, *a_strides, *b_strides, *c_strides, BM=bm, BN=bn, BK=bk,
        PRECISION=dot_precision(a.dtype), num_warps=tiles["num_warps"], num_stages=tiles["num_stages"],
    )
    return grid[2]


def _projection(x, w0, w2, out, ab, g, grad: bool, save_ab: bool, load_ab: bool) -> None:
    tt, heads, d = x.shape
    dh = w0.shape[1]
    tiles = PROJECTION_TILES
    bm, bn, bk = tile(tt, tiles["BM"]), tile(dh, tiles["BN"]), tile(d, tiles["BK"])
    grid = (cdiv(tt, bm), cdiv(dh, bn), heads)
    any_ = x  # an input stands in for pointers a variant does not touch
    launcher(swiglu_projection_kernel)[grid](
        x, w0, w2, out, ab if ab is not None else any_, g if g is not None else any_, tt, heads,
        D=d, DH=dh, BM=bm, BN=bn, BK=bk, GRAD=grad, SAVE_AB=save_ab, LOAD_AB=load_ab,
        PRECISION=dot_precision(x.dtype), num_warps=tiles["num_warps"], num_stages=tiles["num_stages"],
    )


def swiglu_features_fwd(x: torch.Tensor, w0: torch.Tensor, w2: torch.Tensor, save_projections: bool):
    """x: [TT, H, d]; w0, w2: [H, dh, d] in x's dtype. Returns h [TT, H, dh] and, when
    `save_projections`, (a, b) as one [TT, H, 2 dh] tensor for the backward (else None)."""
    tt, heads, _ = x.shape
    dh = w0.shape[1]
    out = new_buffer((tt, heads, dh), x.dtype, x.device)
    ab = new_buffer((tt, heads, 2 * dh), x.dtype, x.device) if save_projections else None
    _projection(x, w0, w2, out, ab, None, grad=False, save_ab=save_projections, load_ab=False)
    return out, ab


def swiglu_features_bwd(grad_h, x, w0, w2, ab, x_grad: bool, weight_grad: bool):
    """grad_h: [TT, H, dh] dL/dh; x, w0, w2, ab as `swiglu_features_fwd` used and returned them.
    Returns dx [TT, H, d] (x's dtype) when `x_grad`, and [dw0; dw2] [H, 2 dh, d] fp32 when
    `weight_grad` (None otherwise)."""
    tt, heads, d = x.shape
    dh = w0.shape[1]
    g = grad_h.to(x.dtype).contiguous()
    dab = new_buffer((tt, heads, 2 * dh), x.dtype, x.device)  # [da, db] per token and head
    _projection(x, w0, w2, dab, ab, g, grad=True, save_ab=False, load_ab=ab is not None)
    dx = dw02 = None
    if x_grad:
        w02 = torch.cat([w0, w2], dim=1)  # [H, 2 dh, d]
        dx = new_buffer((tt, heads, d), x.dtype, x.device)
        _head_matmul(dab, (2 * dh, heads * 2 * dh, 1), w02, (2 * dh * d, d, 1), dx, (0, d, heads * d, 1),
                     M=tt, N=d, K=2 * dh, heads=heads)
    if weight_grad:
        bm, bn = tile(2 * dh, MATMUL_TILES["BM"]), tile(d, MATMUL_TILES["BN"])
        base_programs = cdiv(2 * dh, bm) * cdiv(d, bn) * heads
        splits = max(1, min(cdiv(tt, 1024), cdiv(WEIGHT_GRAD_PROGRAMS, base_programs)))
        partial = new_buffer((splits, heads, 2 * dh, d), torch.float32, x.device)
        used = _head_matmul(dab, (2 * dh, 1, heads * 2 * dh), x, (d, heads * d, 1), partial,
                            (heads * 2 * dh * d, 2 * dh * d, d, 1), M=2 * dh, N=d, K=tt, heads=heads, splits=splits)
        dw02 = partial[:used].sum(0)
    return dx, dw02


# ----------------------------------------------------------------------------------------------
# torch.library ops (`tttla::swiglu_features` and its backward): opaque to torch.compile, which traces
# around them through the fake implementations and fuses the glue on either side; each also has an
# inlined registration whose kernels Inductor launches itself (`kernels.triton_utils.inline_op`). An
# output that is absent (projections not saved, a gradient not asked for) is an empty tensor: op
# schemas cannot return None.


def _swiglu_features(
    x: torch.Tensor, w0: torch.Tensor, w2: torch.Tensor, save_projections: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [TT, H, d]; w0, w2: [H, dh, d] (any float dtype, cast to x's). Returns h [TT, H, dh] in x's
    dtype and the projections (a, b) [TT, H, 2 dh] when `save_projections` (else empty)."""
    out, ab = swiglu_features_fwd(x.contiguous(), w0.to(x.dtype).contiguous(), w2.to(x.dtype).contiguous(),
                                  save_projections)
    return out, ab if ab is not None else absent(x)


def _swiglu_features_backward(
    grad_h: torch.Tensor, x: torch.Tensor, w0: torch.Tensor, w2: torch.Tensor, projections: Optional[torch.Tensor],
    x_grad: bool, weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns dx [TT, H, d] in x's dtype (empty unless `x_grad`) and [dw0; dw2] [H, 2 dh, d] in w0's
    dtype (empty unless `weight_grad`); `projections` is what the forward saved (None: recompute them)."""
    dx, dw02 = swiglu_features_bwd(grad_h, x.contiguous(), w0.to(x.dtype).contiguous(),
                                   w2.to(x.dtype).contiguous(), projections, x_grad, weight_grad)
    return dx if x_grad else absent(x), dw02.to(w0.dtype) if weight_grad else absent(w0)


swiglu_features_op = torch.library.custom_op("tttla::swiglu_features", _swiglu_features, mutates_args=())
swiglu_features_backward_op = torch.library.custom_op(
    "tttla::swiglu_features_backward", _swiglu_features_backward, mutates_args=())
_FEATURE_KERNELS = (swiglu_projection_kernel, head_matmul_kernel)
swiglu_features_inline_op = inline_op("tttla::swiglu_features_inline", _swiglu_features, _FEATURE_KERNELS)
swiglu_features_backward_inline_op = inline_op(
    "tttla::swiglu_features_backward_inline", _swiglu_features_backward, _FEATURE_KERNELS)


@swiglu_features_op.register_fake
def _(x, w0, w2, save_projections):
    tt, heads, _ = x.shape
    dh = w0.shape[1]
    return x.new_empty(tt, heads, dh), x.new_empty(tt, heads, 2 * dh) if save_projections else absent(x)


@swiglu_features_backward_op.register_fake
def _(grad_h, x, w0, w2, projections, x_grad, weight_grad):
    heads, dh, d = w0.shape
    return torch.empty_like(x) if x_grad else absent(x), w0.new_empty(heads, 2 * dh, d) if weight_grad else absent(w0)


def swiglu_features_flat(x: torch.Tensor, w0: torch.Tensor, w2: torch.Tensor, save_projections: bool) -> tuple:
    """`tttla::swiglu_features`, or its inlined registration where `kernels.triton_utils.inline_kernels` allows."""
    op = swiglu_features_inline_op if inline_kernels(x, w0) else swiglu_features_op
    return op(x, w0, w2, save_projections)


def swiglu_features_backward(grad_h, x, w0, w2, projections, x_grad: bool, weight_grad: bool) -> tuple:
    """`tttla::swiglu_features_backward`, inlined where `swiglu_features_flat` is."""
    op = swiglu_features_backward_inline_op if inline_kernels(x, w0) else swiglu_features_backward_op
    return op(grad_h, x, w0, w2, projections, x_grad, weight_grad)


def _setup_swiglu_context(ctx, inputs, output) -> None:
    x, w0, w2, save_projections = inputs
    _, projections = output
    ctx.set_materialize_grads(False)  # no zero-filled [TT, H, 2 dh] gradient for the projections
    ctx.save_for_backward(x, w0, w2, projections if save_projections else None)


def _swiglu_backward(ctx, grad_h, _grad_projections):
    if grad_h is None:
        return None, None, None, None
    x, w0, w2, projections = ctx.saved_tensors
    x_grad, weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    dx, dw02 = swiglu_features_backward(grad_h, x, w0, w2, projections, x_grad, weight_grad)
    dw0, dw2 = dw02.chunk(2, dim=1) if weight_grad else (None, None)
    return (dx if x_grad else None, dw0 if ctx.needs_input_grad[1] else None,
            dw2 if ctx.needs_input_grad[2] else None, None)


swiglu_features_op.register_autograd(_swiglu_backward, setup_context=_setup_swiglu_context)
swiglu_features_inline_op.register_autograd(_swiglu_backward, setup_context=_setup_swiglu_context)


def swiglu_features(
    x: torch.Tensor, w0: torch.Tensor, w2: torch.Tensor, *, allow_triton: bool = True,
    save_projections: Optional[bool] = None,
) -> torch.Tensor:
    """h(x) = silu(W0 x) * (W2 x): the fused kernels or the reference, chosen here.

    x: [B, T, H, d] (bf16/fp16/fp32 operands, fp32 accumulation); w0, w2: [H, dh, d] shared by the
    batch. Returns h(x) [B, T, H, dh] in x's dtype, contiguous, in the layout `chunk_ttt_la` reads.
    Gradients flow to x, w0 and w2 (in their dtypes). The kernels run where
    `kernels.triton_utils.use_triton(x, allow_triton)` says so (the layer passes
    `model.ttt.use_kernel`); other dtypes (float64) always take the reference. `save_projections`
    keeps the kernel's projections for the backward instead of recomputing them (None: `SAVE_PROJECTIONS`).
    """
    if w0.dim() != 3 or w2.shape != w0.shape or x.shape[-1] != w0.shape[-1] or x.shape[-2] != w0.shape[0]:
        raise ValueError(f"swiglu_features needs x [B, T, H, d] and w0, w2 [H, dh, d]; got x {tuple(x.shape)}, "
                         f"w0 {tuple(w0.shape)}, w2 {tuple(w2.shape)}")
    if not use_triton(x, allow_triton) or x.dtype not in SUPPORTED_DTYPES:
        return lact.swiglu_features(x, w0, w2)
    heads, dh, d = w0.shape
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or w0.requires_grad or w2.requires_grad)
    save = SAVE_PROJECTIONS if save_projections is None else save_projections
    h, _ = swiglu_features_flat(x.reshape(-1, heads, d), w0, w2, save and needs_grad)
    return h.reshape(*x.shape[:-1], dh)


def pack_swiglu_weights(w0: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """w0, w2: [H, dh, d] -> [H, 2 dh, d] (gate rows first)."""
    return torch.cat([w0, w2], dim=1)


def swiglu_features_packed(x: torch.Tensor, w02: torch.Tensor) -> torch.Tensor:
    """The torch form. x: [B, T, H, d]; w02: [H, 2 dh, d] from `pack_swiglu_weights`. Returns [B, T, H, dh]."""
    projected = torch.einsum("bthd,hed->bthe", x, w02)  # [B, T, H, 2 dh]
    gate, value = projected.chunk(2, dim=-1)
    return F.silu(gate) * value


@lru_cache(maxsize=None)
def compiled_swiglu_features():
    """`swiglu_features_packed` through torch.compile (the GEMM stays cuBLAS, the epilogue fuses): the
    benchmark's `tttla_torch_features`."""
    return torch.compile(swiglu_features_packed)
