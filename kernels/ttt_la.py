"""Public op of the parallel TTT-as-linear-attention scan: it picks the Triton kernels or the reference.

`chunk_ttt_la` is the one function the layer calls for the chunk scan, plain batches and packed
documents alike; `kernels.triton_utils.use_triton` is the rule it decides by.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from kernels import chunk as chunk_kernels
from kernels.lact import ScanOptions, num_chunks
from kernels.reference import ttt_la_parallel_reference
from kernels.triton_utils import SUPPORTED_DTYPES, absent, inline_kernels, inline_op, use_triton

MIN_HEAD_DIM, MAX_HEAD_DIM, HEAD_DIM_MULTIPLE = 16, 1024, 16


# ----------------------------------------------------------------------------------------------
# torch.library ops (`tttla::chunk_scan` and its backward) on the flat token axis [TT = B * T, H, *].
# torch.compile keeps them whole in a graph (no break) and fuses the glue around them. The chunk
# table is built inside the ops from (rows, cu_seqlens), so a compiled graph never sees its host
# synchronisation. Absent outputs (momentum off, a gradient not asked for) are empty tensors: op
# schemas cannot return None. Plain rows also have the inlined registration (`tttla::chunk_scan_rows`
# and its backward, `kernels.triton_utils.inline_op`); packed documents' chunk count depends on
# cu_seqlens' values, which a traced body cannot read, so they keep the opaque op.


def _chunk_table(tokens: int, rows: int, cu_seqlens: Optional[torch.Tensor], chunk_size: int, device):
    """`rows` documents of tokens / rows tokens each, or the packed documents of cu_seqlens."""
    if cu_seqlens is None:
        return chunk_kernels.regular_chunk_table(rows, tokens // rows, chunk_size)
    return chunk_kernels.varlen_chunk_table(cu_seqlens, chunk_size, device)


def _absent(like: torch.Tensor) -> torch.Tensor:
    """An output the op does not produce: empty, fp32 like the momenta and gradients it stands for."""
    return absent(like, torch.float32)


def _contiguous(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return x.contiguous() if x is not None else None


def _scan_forward(hq, hk, v, eta, initial_state, beta, initial_momentum, table: chunk_kernels.ChunkTable,
                  chunk_size: int, token_causal: bool, update_sign: float) -> tuple:
    """The forward op's body on a built chunk table (see `chunk_scan_op`)."""
    o, final, final_mom, states, momenta = chunk_kernels.ttt_la_fwd(
        hq.contiguous(), hk.contiguous(), v.contiguous(), eta.contiguous(), _contiguous(initial_state), table,
        chunk_size, _contiguous(beta), _contiguous(initial_momentum), token_causal, update_sign)
    return o, final, final_mom if beta is not None else _absent(hq), states, momenta if beta is not None else _absent(hq)


def _scan_backward(do, hq, hk, v, eta, states, momenta, beta, dfinal, dfinal_momentum,
                   table: chunk_kernels.ChunkTable, chunk_size: int, token_causal: bool, update_sign: float) -> tuple:
    """The backward op's body on a built chunk table (see `chunk_scan_backward_op`)."""
    dhq, dhk, dv, deta, dinit, dinit_mom, dbeta = chunk_kernels.ttt_la_bwd(
        do.to(hq.dtype).contiguous(), hq.contiguous(), hk.contiguous(), v.contiguous(), eta.contiguous(),
        states.contiguous(), _contiguous(momenta), _contiguous(beta), table, chunk_size, _contiguous(dfinal),
        _contiguous(dfinal_momentum), token_causal, update_sign)
    if beta is None:
        dinit_mom, dbeta = _absent(hq), _absent(hq)
    return dhq, dhk, dv, deta, dinit, dinit_mom, dbeta


@torch.library.custom_op("tttla::chunk_scan", mutates_args=())
def chunk_scan_op(
    hq: torch.Tensor, hk: torch.Tensor, v: torch.Tensor, eta: torch.Tensor, initial_state: Optional[torch.Tensor],
    beta: Optional[torch.Tensor], initial_momentum: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
    rows: int, chunk_size: int, token_causal: bool, update_sign: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hq, hk: [TT, H, dh]; v: [TT, H, d]; eta: [TT, H]; initial_state, initial_momentum: [D, H, d, dh];
    beta: [NC, H]; cu_seqlens: [D + 1] (None: `rows` documents of TT / rows tokens).

    Returns o [TT, H, d] (hq's dtype), final state [D, H, d, dh] fp32, final momentum (fp32, empty
    without beta), and for the backward the state each chunk read [NC, H, d, dh] (hq's dtype) and
    the momentum it read (fp32, empty without beta).
    """
    table = _chunk_table(hq.shape[0], rows, cu_seqlens, chunk_size, hq.device)
    return _scan_forward(hq, hk, v, eta, initial_state, beta, initial_momentum, table, chunk_size, token_causal,
                         update_sign)


@chunk_scan_op.register_fake
def _(hq, hk, v, eta, initial_state, beta, initial_momentum, cu_seqlens, rows, chunk_size, token_causal,
      update_sign):
    tokens, heads, dh = hq.shape
    d = v.shape[-1]
    if cu_seqlens is None:
        docs, chunks = rows, rows * num_chunks(tokens // rows, chunk_size)
    elif beta is not None:
        docs, chunks = cu_seqlens.shape[0] - 1, beta.shape[0]
    else:  # the chunk count of packed documents depends on their lengths, known only when the op runs
        docs, chunks = cu_seqlens.shape[0] - 1, torch.library.get_ctx().new_dynamic_size()
    state = lambda n, dtype: hq.new_empty(n, heads, d, dh, dtype=dtype)  # noqa: E731
    momentum = beta is not None
    return (v.new_empty(tokens, heads, d, dtype=hq.dtype), state(docs, torch.float32),
            state(docs, torch.float32) if momentum else _absent(hq), state(chunks, hq.dtype),
            state(chunks, torch.float32) if momentum else _absent(hq))


@torch.library.custom_op("tttla::chunk_scan_backward", mutates_args=())
def chunk_scan_backward_op(
    do: torch.Tensor, hq: torch.Tensor, hk: torch.Tensor, v: torch.Tensor, eta: torch.Tensor, states: torch.Tensor,
    momenta: Optional[torch.Tensor], beta: Optional[torch.Tensor], dfinal: Optional[torch.Tensor],
    dfinal_momentum: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], rows: int, chunk_size: int,
    token_causal: bool, update_sign: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs as `tttla::chunk_scan` took and returned them, do = dL/do [TT, H, d], dfinal and dfinal_momentum
    [D, H, d, dh] (None: no gradient). Returns dhq, dhk, dv (input dtype), deta [TT, H] fp32,
    dinit [D, H, d, dh] fp32, and with beta dinit_momentum [D, H, d, dh] and dbeta [NC, H] fp32
    (empty without beta)."""
    table = _chunk_table(hq.shape[0], rows, cu_seqlens, chunk_size, hq.device)
    return _scan_backward(do, hq, hk, v, eta, states, momenta, beta, dfinal, dfinal_momentum, table, chunk_size,
                          token_causal, update_sign)


@chunk_scan_backward_op.register_fake
def _(do, hq, hk, v, eta, states, momenta, beta, dfinal, dfinal_momentum, cu_seqlens, rows, chunk_size,
      token_causal, update_sign):
    tokens, heads, dh = hq.shape
    d = v.shape[-1]
    docs = rows if cu_seqlens is None else cu_seqlens.shape[0] - 1
    dinit = hq.new_empty(docs, heads, d, dh, dtype=torch.float32)
    momentum = beta is not None
    return (torch.empty_like(hq), torch.empty_like(hk), torch.empty_like(v), eta.new_empty(tokens, heads, dtype=torch.float32),
            dinit, torch.empty_like(dinit) if momentum else _absent(hq),
            beta.new_empty(beta.shape, dtype=torch.float32) if momentum else _absent(hq))


def _chunk_scan_rows(
    hq: torch.Tensor, hk: torch.Tensor, v: torch.Tensor, eta: torch.Tensor, initial_state: Optional[torch.Tensor],
    beta: Optional[torch.Tensor], initial_momentum: Optional[torch.Tensor], rows: int, chunk_size: int,
    token_causal: bool, update_sign: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`tttla::chunk_scan` of `rows` documents of TT / rows tokens (no packed documents), inlined."""
    table = chunk_kernels.regular_chunk_table(rows, hq.shape[0] // rows, chunk_size)
    return _scan_forward(hq, hk, v, eta, initial_state, beta, initial_momentum, table, chunk_size, token_causal,
                         update_sign)


def _chunk_scan_rows_backward(
    do: torch.Tensor, hq: torch.Tensor, hk: torch.Tensor, v: torch.Tensor, eta: torch.Tensor, states: torch.Tensor,
    momenta: Optional[torch.Tensor], beta: Optional[torch.Tensor], dfinal: Optional[torch.Tensor],
    dfinal_momentum: Optional[torch.Tensor], rows: int, chunk_size: int, token_causal: bool, update_sign: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`tttla::chunk_scan_backward` of `rows` documents, inlined."""
    table = chunk_kernels.regular_chunk_table(rows, hq.shape[0] // rows, chunk_size)
    return _scan_backward(do, hq, hk, v, eta, states, momenta, beta, dfinal, dfinal_momentum, table, chunk_size,
                          token_causal, update_sign)


_SCAN_KERNELS = (chunk_kernels.chunk_outer_kernel, chunk_kernels.state_scan_fwd_kernel,
                 chunk_kernels.state_scan_bwd_kernel, chunk_kernels.chunk_apply_kernel)
chunk_scan_rows_op = inline_op("tttla::chunk_scan_rows", _chunk_scan_rows, _SCAN_KERNELS)
chunk_scan_rows_backward_op = inline_op("tttla::chunk_scan_rows_backward", _chunk_scan_rows_backward, _SCAN_KERNELS)


def chunk_scan(hq, hk, v, eta, initial_state, beta, initial_momentum, cu_seqlens, rows: int, chunk_size: int,
               token_causal: bool, update_sign: float) -> tuple:
    """`tttla::chunk_scan` (arguments and results as it takes and returns them), through the inlined op
    where `kernels.triton_utils.inline_kernels` allows it and the documents are plain rows."""
    if cu_seqlens is None and inline_kernels(hq, v):
        return chunk_scan_rows_op(hq, hk, v, eta, initial_state, beta, initial_momentum, rows, chunk_size,
                                  token_causal, update_sign)
    return chunk_scan_op(hq, hk, v, eta, initial_state, beta, initial_momentum, cu_seqlens, rows, chunk_size,
                         token_causal, update_sign)


def chunk_scan_backward(do, hq, hk, v, eta, states, momenta, beta, dfinal, dfinal_momentum, cu_seqlens, rows: int,
                        chunk_size: int, token_causal: bool, update_sign: float) -> tuple:
    """`tttla::chunk_scan_backward`, through the inlined op where `chunk_scan` would take it."""
    if cu_seqlens is None and inline_kernels(hq, v):
        return chunk_scan_rows_backward_op(do, hq, hk, v, eta, states, momenta, beta, dfinal, dfinal_momentum, rows,
                                           chunk_size, token_causal, update_sign)
    return chunk_scan_backward_op(do, hq, hk, v, eta, states, momenta, beta, dfinal, dfinal_momentum, cu_seqlens,
                                  rows, chunk_size, token_causal, update_sign)


def _setup_chunk_scan_context(ctx, inputs, output) -> None:
    hq, hk, v, eta, initial_state, beta, initial_momentum, cu_seqlens, rows, chunk_size, token_causal, sign = inputs
    _save_scan_context(ctx, hq, hk, v, eta, initial_state, beta, initial_momentum, cu_seqlens, output,
                       (rows, chunk_size, token_causal, sign), trailing_arguments=5)


def _setup_chunk_scan_rows_context(ctx, inputs, output) -> None:
    hq, hk, v, eta, initial_state, beta, initial_momentum, rows, chunk_size, token_causal, sign = inputs
    _save_scan_context(ctx, hq, hk, v, eta, initial_state, beta, initial_momentum, None, output,
                       (rows, chunk_size, token_causal, sign), trailing_arguments=4)


def _save_scan_context(ctx, hq, hk, v, eta, initial_state, beta, initial_momentum, cu_seqlens, output,
                       config: tuple, trailing_arguments: int) -> None:
    """What the backward reads; `trailing_arguments`: the op's arguments after its tensors (cu_seqlens
    where it takes it, rows, chunk_size, token_causal, update_sign), which get no gradient."""
    _, _, _, states, momenta = output
    ctx.set_materialize_grads(False)  # no zero-filled [NC, H, d, dh] gradients for the saved states
    ctx.save_for_backward(hq, hk, v, eta, states, momenta if beta is not None else None, beta, cu_seqlens)
    ctx.config = config
    ctx.trailing_arguments = trailing_arguments
    ctx.input_dtypes = scan_input_dtypes(eta, initial_state, beta, initial_momentum)


def _chunk_scan_backward(ctx, do, dfinal, dfinal_momentum, _dstates, _dmomenta):
    """The gradients of either registration's inputs: the tensors', then None for the trailing arguments."""
    hq, hk, v, eta, states, momenta, beta, cu_seqlens = ctx.saved_tensors
    gradients = chunk_scan_gradients(do, dfinal, dfinal_momentum, hq, hk, v, eta, states, momenta, beta, cu_seqlens,
                                     ctx.config, ctx.input_dtypes)  # fmt: skip
    return (*gradients, *[None] * ctx.trailing_arguments)


def scan_input_dtypes(eta, initial_state, beta, initial_momentum) -> list[Optional[torch.dtype]]:
    """The dtypes `chunk_scan_gradients` returns the gradients of these inputs in (None: input absent)."""
    return [x.dtype if x is not None else None for x in (eta, initial_state, beta, initial_momentum)]


def chunk_scan_gradients(do, dfinal, dfinal_momentum, hq, hk, v, eta, states, momenta, beta, cu_seqlens,
                         config: tuple, input_dtypes: list[Optional[torch.dtype]]) -> tuple:  # fmt: skip
    """The scan's backward op on what its forward kept, for an autograd formula around it: dhq, dhk, dv,
    deta, dinit, dbeta, dinit_momentum, each in its input's dtype (None for an absent input). `do` None:
    only the final state or momentum is used. `config`: (rows, chunk_size, token_causal, update_sign)."""
    rows, chunk_size, token_causal, sign = config
    if do is None:
        do = v.new_zeros(v.shape)
    dhq, dhk, dv, deta, dinit, dinit_mom, dbeta = chunk_scan_backward(
        do, hq, hk, v, eta, states, momenta, beta, dfinal, dfinal_momentum if beta is not None else None,
        cu_seqlens, rows, chunk_size, token_causal, sign)
    eta_dtype, init_dtype, beta_dtype, mom_dtype = input_dtypes
    cast = lambda g, dtype: g.to(dtype) if dtype is not None else None  # noqa: E731
    return dhq, dhk, dv, deta.to(eta_dtype), cast(dinit, init_dtype), cast(dbeta, beta_dtype), cast(dinit_mom, mom_dtype)


chunk_scan_op.register_autograd(_chunk_scan_backward, setup_context=_setup_chunk_scan_context)
chunk_scan_rows_op.register_autograd(_chunk_scan_backward, setup_context=_setup_chunk_scan_rows_context)


def _chunk_scan(hq, hk, v, eta1, initial_state, beta, initial_momentum, chunk_size, token_causal, update_sign,
                cu_seqlens):
    """`chunk_ttt_la`'s kernel path: [B, T, H, *] viewed as the flat token axis the op takes."""
    batch, seq_len, heads, dh = hq.shape
    d = v.shape[-1]
    flat = lambda x: x.reshape(batch * seq_len, heads, -1)  # noqa: E731
    o, final, final_mom, _, _ = chunk_scan(
        flat(hq), flat(hk), flat(v), eta1.reshape(batch * seq_len, heads), initial_state,
        beta.reshape(-1, heads) if beta is not None else None, initial_momentum, cu_seqlens, batch, chunk_size,
        token_causal, update_sign)
    return o.reshape(batch, seq_len, heads, d), final, final_mom if beta is not None else None


@torch.library.custom_op("tttla::chunk_updates", mutates_args=())
def chunk_updates_op(x: torch.Tensor, y: torch.Tensor, eta: torch.Tensor, rows: int, chunk_size: int) -> torch.Tensor:
    """x [TT, H, DX], y [TT, H, DY], eta [TT, H] of `rows` documents of TT / rows tokens -> every chunk's
    sum_t eta_t x_t y_t^T, [NC, H, DX, DY] fp32 (`kernels.chunk.chunk_outer`)."""
    table = chunk_kernels.regular_chunk_table(rows, x.shape[0] // rows, chunk_size)
    return chunk_kernels.chunk_outer(x.contiguous(), y.contiguous(), eta.contiguous(), table, chunk_size)


@chunk_updates_op.register_fake
def _(x, y, eta, rows, chunk_size):
    tokens, heads, dx = x.shape
    chunks = rows * num_chunks(tokens // rows, chunk_size)
    return x.new_empty(chunks, heads, dx, y.shape[-1], dtype=torch.float32)


def chunk_updates(x: torch.Tensor, y: torch.Tensor, eta: torch.Tensor, chunk_size: int,
                  allow_triton: bool = True) -> torch.Tensor:  # fmt: skip
    """Each chunk's update as the scan forms it, A(c) = sum_{t in c} eta_t x_t y_t^T, alone.

    x: [B, T, H, DX] and y: [B, T, H, DY] in one dtype; eta: [B, T, H] (any float dtype). Returns
    [B, N, H, DX, DY] fp32 (float64 for float64 inputs), N = ceil(T / chunk_size), chunks counted from
    each row's start. eta x is
    rounded to x's dtype and the products accumulate in fp32, as in the scan's kernels. The Triton
    kernel where `kernels.triton_utils.use_triton(x, allow_triton)` says so and x is 16- or 32-bit;
    otherwise the same sums in torch (a decoder's chunk gradient from its pending tokens,
    `decoding.pending`)."""
    batch, seq_len, heads, dx = x.shape
    dy = y.shape[-1]
    if y.shape[:3] != x.shape[:3] or eta.shape != x.shape[:3] or y.dtype != x.dtype:
        raise ValueError(f"chunk_updates needs x [B, T, H, DX], y [B, T, H, DY] of x's dtype and eta [B, T, H]; "
                         f"got x {tuple(x.shape)} {x.dtype}, y {tuple(y.shape)} {y.dtype}, eta {tuple(eta.shape)}")
    chunks = num_chunks(seq_len, chunk_size)
    if use_triton(x, allow_triton) and x.dtype in SUPPORTED_DTYPES:
        flat = lambda t: t.reshape(batch * seq_len, heads, -1)  # noqa: E731
        out = chunk_updates_op(flat(x), flat(y), eta.reshape(batch * seq_len, heads), batch, chunk_size)
        return out.view(batch, chunks, heads, dx, dy)
    pad = chunks * chunk_size - seq_len  # zero tokens add nothing
    accumulate = torch.float64 if x.dtype == torch.float64 else torch.float32
    scaled = (x.to(accumulate) * eta.to(accumulate)[..., None]).to(x.dtype)
    by_chunk = lambda t: F.pad(t, (0, 0, 0, 0, 0, pad)).view(batch, chunks, chunk_size, heads, -1)  # noqa: E731
    return torch.einsum("bnchx,bnchy->bnhxy", by_chunk(scaled).to(accumulate), by_chunk(y).to(accumulate))


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


def kernel_head_dim(dim: int) -> bool:
    """Whether the Triton kernels take a head dim of this size."""
    return MIN_HEAD_DIM <= dim <= MAX_HEAD_DIM and dim % HEAD_DIM_MULTIPLE == 0


def _check_kernel_inputs(hq, hk, v) -> None:
    if hq.dtype not in SUPPORTED_DTYPES or hk.dtype != hq.dtype or v.dtype != hq.dtype:
        raise ValueError(f"the Triton kernel takes hq, hk, v all in one of {SUPPORTED_DTYPES}; "
                         f"got {hq.dtype}, {hk.dtype}, {v.dtype}")
    for name, dim in (("dh (hq/hk last dim)", hq.shape[-1]), ("d (v last dim)", v.shape[-1])):
        if not kernel_head_dim(dim):
            raise ValueError(f"head dim {name}={dim} is not supported by the Triton kernel: it must be a "
                             f"multiple of {HEAD_DIM_MULTIPLE} in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]")


def chunk_ttt_la(
    hq: torch.Tensor,
    hk: torch.Tensor,
    v: torch.Tensor,
    eta1: torch.Tensor,
    initial_state: Optional[torch.Tensor],
    options: ScanOptions,
    *,
    beta: Optional[torch.Tensor] = None,
    initial_momentum: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    allow_triton: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Block-causal linear attention with a chunk scan of fp32 states (W1-only TTT, no weight norm).

    The semantics of `kernels.reference.ttt_la_parallel_reference`, per (document, head):

      A(c) = sum_{t in c} eta1_t v_t h(k_t)^T,   M(c) = beta_c M(c-1) + A(c)  (momentum on; else M = A)
      S(c) = initial_state + update_sign * sum_{c' < c} M(c')        (the state chunk c reads)
      o_t  = S(c) h(q_t)  [+ update_sign * sum_{s <= t, s in c} eta1_s (h(q_t) . h(k_s)) v_s  if token_causal]

    `options` (`kernels.lact.ScanOptions`): the chunk size C, Muon, token_causal and update_sign.
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
    where `kernels.triton_utils.use_triton(hq, allow_triton)` says so (the layer passes
    `model.ttt.use_kernel`); otherwise the float-exact reference runs (`ttt_la_parallel_reference`,
    packed documents included).
    Muon (`options.muon`) always runs the reference: Newton-Schulz acts on each chunk's whole momentum
    matrix, a non-linear map that does not distribute over the sum of chunk updates, so the scan cannot
    be fused.
    The kernel needs head dims that are multiples of 16 in [16, 1024].
    """
    chunk_size = options.chunk_size
    _check_inputs(hq, hk, v, eta1, initial_state, chunk_size, beta, initial_momentum, cu_seqlens)
    if options.muon or not use_triton(hq, allow_triton):
        if initial_state is None:
            batch, _, heads, dh = hq.shape
            docs = batch if cu_seqlens is None else cu_seqlens.numel() - 1
            initial_state = hq.new_zeros(docs, heads, v.shape[-1], dh)
        return ttt_la_parallel_reference(hq, hk, v, eta1, initial_state, options, beta=beta,
                                         initial_momentum=initial_momentum, cu_seqlens=cu_seqlens)  # fmt: skip
    _check_kernel_inputs(hq, hk, v)
    return _chunk_scan(hq, hk, v, eta1, initial_state, beta, initial_momentum, chunk_size, options.token_causal,
                       float(options.update_sign), cu_seqlens)
