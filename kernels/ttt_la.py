"""Public entry point of the parallel TTT-as-linear-attention layer: Triton on CUDA, reference elsewhere."""

from __future__ import annotations

import os
from typing import Optional

import torch

from kernels import chunk as chunk_kernels
from kernels.reference import num_chunks, ttt_la_parallel_reference
from kernels.varlen_reference import ttt_la_parallel_varlen_reference

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MIN_HEAD_DIM, MAX_HEAD_DIM, HEAD_DIM_MULTIPLE = 16, 1024, 16


def use_triton(x: torch.Tensor) -> bool:
    """Triton on CUDA tensors; `TTTLA_FORCE_TRITON=1` also on CPU (with TRITON_INTERPRET=1, for tests)."""
    return x.is_cuda or os.environ.get("TTTLA_FORCE_TRITON", "0") == "1"


class ChunkTTTLAFunction(torch.autograd.Function):
    """Autograd around the Triton kernels of `kernels.chunk`; inputs as in `chunk_ttt_la` (no Muon)."""

    @staticmethod
    def forward(ctx, hq, hk, v, eta1, initial_state, beta, initial_momentum, chunk_size, token_causal,
                update_sign, cu_seqlens):
        ctx.set_materialize_grads(False)
        batch, seq_len, heads, dh = hq.shape
        d = v.shape[-1]
        if cu_seqlens is None:
            table = chunk_kernels.regular_chunk_table(batch, seq_len, chunk_size, hq.device)
        else:
            table = chunk_kernels.varlen_chunk_table(cu_seqlens, chunk_size, hq.device)
        flat = lambda x: x.reshape(batch * seq_len, heads, -1).contiguous()  # noqa: E731
        fhq, fhk, fv = flat(hq), flat(hk), flat(v)
        feta = eta1.reshape(batch * seq_len, heads).contiguous()
        fbeta = beta.reshape(-1, heads).contiguous() if beta is not None else None
        init = initial_state.contiguous() if initial_state is not None else None
        init_mom = initial_momentum.contiguous() if initial_momentum is not None else None
        o, final, final_mom, states, momenta = chunk_kernels.ttt_la_fwd(
            fhq, fhk, fv, feta, init, table, chunk_size, fbeta, init_mom, token_causal, update_sign)
        ctx.save_for_backward(fhq, fhk, fv, feta, states, momenta, fbeta)
        ctx.table = table
        ctx.config = (chunk_size, token_causal, update_sign)
        ctx.shapes = (batch, seq_len, heads, d, dh)
        ctx.input_meta = [(x.dtype, x.shape) if x is not None else None
                          for x in (initial_state, beta, initial_momentum)]
        return o.reshape(batch, seq_len, heads, d), final, final_mom

    @staticmethod
    def backward(ctx, do, dfinal, dfinal_mom):
        fhq, fhk, fv, feta, states, momenta, fbeta = ctx.saved_tensors
        chunk_size, token_causal, update_sign = ctx.config
        batch, seq_len, heads, d, dh = ctx.shapes
        if do is None:
            do = torch.zeros(batch, seq_len, heads, d, dtype=fhq.dtype, device=fhq.device)
        dhq, dhk, dv, deta, dinit, dinit_mom, dbeta = chunk_kernels.ttt_la_bwd(
            do.reshape(batch * seq_len, heads, d).to(fhq.dtype), fhq, fhk, fv, feta, states, momenta, fbeta,
            ctx.table, chunk_size, dfinal.contiguous() if dfinal is not None else None,
            dfinal_mom.contiguous() if dfinal_mom is not None else None, token_causal, update_sign)
        init_meta, beta_meta, mom_meta = ctx.input_meta
        cast = lambda g, meta: g.reshape(meta[1]).to(meta[0]) if meta is not None else None  # noqa: E731
        return (
            dhq.reshape(batch, seq_len, heads, dh),
            dhk.reshape(batch, seq_len, heads, dh),
            dv.reshape(batch, seq_len, heads, d),
            deta.reshape(batch, seq_len, heads).to(feta.dtype),
            cast(dinit, init_meta),
            cast(dbeta, beta_meta),
            cast(dinit_mom, mom_meta),
            None, None, None, None,
        )


def _check_inputs(hq, hk, v, eta1, initial_state, chunk_size, beta, initial_momentum, cu_seqlens) -> None:
    if hq.dim() != 4 or hk.shape != hq.shape:
        raise ValueError(f"hq and hk must both be [B, T, H, dh]; got {tuple(hq.shape)} and {tuple(hk.shape)}")
    batch, seq_len, heads, dh = hq.shape
    if v.dim() != 4 or v.shape[:3] != hq.shape[:3]:
        raise ValueError(f"v must be [B, T, H, d] = [{batch}, {seq_len}, {heads}, d]; got {tuple(v.shape)}")
    d = v.shape[-1]
    if eta1.shape != hq.shape[:3]:
        raise ValueError(f"eta1 must be [B, T, H] = {tuple(hq.shape[:3])}; got {tuple(eta1.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be a positive number of tokens")
    docs = batch if cu_seqlens is None else cu_seqlens.numel() - 1
    if cu_seqlens is not None:
        if batch != 1:
            raise ValueError(f"cu_seqlens needs the documents packed on one row (B=1), got B={batch}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError("cu_seqlens must be [D + 1] token offsets starting at 0 and ending at T")
    state_shape = (docs, heads, d, dh)
    if initial_state is not None and tuple(initial_state.shape) != state_shape:
        raise ValueError(f"initial_state must be [B or D, H, d, dh] = {state_shape}; got {tuple(initial_state.shape)}")
    if initial_momentum is not None:
        if beta is None:
            raise ValueError("initial_momentum needs beta (momentum is off without per-chunk beta)")
        if tuple(initial_momentum.shape) != state_shape:
            raise ValueError(f"initial_momentum must be {state_shape}; got {tuple(initial_momentum.shape)}")
    if beta is not None:
        if cu_seqlens is None:
            expected = (batch, num_chunks(seq_len, chunk_size), heads)
        else:
            bounds = cu_seqlens.tolist()
            expected = (1, sum(num_chunks(e - s, chunk_size) for s, e in zip(bounds[:-1], bounds[1:])), heads)
        if tuple(beta.shape) != expected:
            raise ValueError(f"beta must be [B, N, H] = {expected} (N chunks of {chunk_size} tokens); "
                             f"got {tuple(beta.shape)}")


def _check_kernel_inputs(hq, hk, v) -> None:
    if hq.dtype not in SUPPORTED_DTYPES or hk.dtype != hq.dtype or v.dtype != hq.dtype:
        raise ValueError(f"the Triton kernel takes hq, hk, v all in one of {SUPPORTED_DTYPES}; "
                         f"got {hq.dtype}, {hk.dtype}, {v.dtype}")
    for name, dim in (("dh (hq/hk last dim)", hq.shape[-1]), ("d (v last dim)", v.shape[-1])):
        if not (MIN_HEAD_DIM <= dim <= MAX_HEAD_DIM and dim % HEAD_DIM_MULTIPLE == 0):
            raise ValueError(f"head dim {name}={dim} is not supported by the Triton kernel: it must be a "
                             f"multiple of {HEAD_DIM_MULTIPLE} in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]")


def chunk_ttt_la(
    hq: torch.Tensor,
    hk: torch.Tensor,
    v: torch.Tensor,
    eta1: torch.Tensor,
    initial_state: Optional[torch.Tensor],
    chunk_size: int,
    *,
    beta: Optional[torch.Tensor] = None,
    initial_momentum: Optional[torch.Tensor] = None,
    muon: bool = False,
    token_causal: bool = False,
    update_sign: float = 1.0,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Block-causal linear attention with a chunk scan of fp32 states (W1-only TTT, no weight norm).

    The semantics of `kernels.reference.ttt_la_parallel_reference`, per (document, head):

      A(c) = sum_{t in c} eta1_t v_t h(k_t)^T,   M(c) = beta_c M(c-1) + A(c)  (momentum on; else M = A)
      S(c) = initial_state + update_sign * sum_{c' < c} M(c')        (the state chunk c reads)
      o_t  = S(c) h(q_t)  [+ update_sign * sum_{s <= t, s in c} eta1_s (h(q_t) . h(k_s)) v_s  if token_causal]

    Shapes (D documents: D = B, or len(cu_seqlens) - 1 with B = 1):
      hq, hk:            [B, T, H, dh]   features h(q), h(k); bf16/fp16/fp32 operands
      v:                 [B, T, H, d]    same dtype as hq
      eta1:              [B, T, H]       per-token learning rates
      initial_state:     [D, H, d, dh]   fp32 state entering each document (None: zeros)
      beta:              [B, N, H]       per-chunk momentum, N = ceil(T / chunk_size); with cu_seqlens
                                         [1, NC, H], the chunks of each document counted from its start
      initial_momentum:  [D, H, d, dh]   momentum entering each document (None: zeros; needs beta)
      cu_seqlens:        [D + 1]         document offsets on the packed row (as in fla): the state and
                                         momentum reset, and chunks restart, at every document start
    Returns o [B, T, H, d] (dtype of hq), the final state [D, H, d, dh] (fp32 on the kernel path) and
    the final momentum [D, H, d, dh] (None when beta is None).

    Gradients flow to hq, hk, v, eta1, initial_state, beta and initial_momentum. The Triton path runs
    when the tensors are on CUDA (or `TTTLA_FORCE_TRITON=1`); otherwise the float-exact reference runs.
    `muon=True` always runs the reference: Newton-Schulz acts on each chunk's whole momentum matrix, a
    non-linear map that does not distribute over the sum of chunk updates, so the scan cannot be fused.
    The kernel needs head dims that are multiples of 16 in [16, 1024].
    """
    _check_inputs(hq, hk, v, eta1, initial_state, chunk_size, beta, initial_momentum, cu_seqlens)
    if muon or not use_triton(hq):
        kwargs = dict(beta=beta, initial_momentum=initial_momentum, muon=muon, token_causal=token_causal,
                      update_sign=update_sign)
        if initial_state is None:
            batch, _, heads, dh = hq.shape
            docs = batch if cu_seqlens is None else cu_seqlens.numel() - 1
            initial_state = hq.new_zeros(docs, heads, v.shape[-1], dh)
        if cu_seqlens is not None:
            return ttt_la_parallel_varlen_reference(hq, hk, v, eta1, initial_state, chunk_size, cu_seqlens, **kwargs)
        return ttt_la_parallel_reference(hq, hk, v, eta1, initial_state, chunk_size, **kwargs)
    _check_kernel_inputs(hq, hk, v)
    return ChunkTTTLAFunction.apply(hq, hk, v, eta1, initial_state, beta, initial_momentum, chunk_size,
                                    token_causal, float(update_sign), cu_seqlens)
