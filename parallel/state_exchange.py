"""The state exchange of the parallel (chunk-scan) form: one all-gather of per-rank state maps per layer.

Rank r holds chunks c = 1..n of its slice (whole chunks, see `parallel.layout`), with updates
A(c) = sum_{t in c} eta1_t v_t h(k_t)^T and momentum decays beta_c. Whatever (state S, momentum m)
enters the slice, the scan of `kernels.reference.ttt_la_parallel_reference` gives

    M(c) = beta_c M(c-1) + A(c),  M(0) = m        =>  M(c) = p_c m + M0(c),  p_c = prod_{j<=c} beta_j
    chunk c reads S(c) = S + sign * sum_{c'<c} M(c') = S0(c) + S + sign * (sum_{c'<c} p_c') m

where M0, S0 are the same quantities started from zero. So the slice acts on what enters it as an
affine map (`StateMap`):

    S_out = S + D + sign * Q m,    m_out = P m + M
    D = sign * sum_c M0(c) = sign * sum_c (sum_{c'>=c} L[c', c]) A(c)     (L = `decay_matrix`)
    M = M0(n) = sum_c L[n, c] A(c),   P = p_n,   Q = sum_c p_c

and its outputs are the zero-state outputs plus a term linear in what enters:
o_t = o_t(0) + (S + sign * q_c m) h(q_t), q_c = sum_{c'<c} p_c'. Without momentum, D = sign * sum_t
eta1_t v_t h(k_t)^T and the correction is S h(q_t).

Each rank computes its own map (one weighted outer-product sum over its tokens), starts an async
all-gather of all maps (2 x [B, H, d, dh] + 2 x [B, H] fp32 values per rank with momentum, half without),
runs its zero-state scan while the maps travel, then composes the maps of the ranks before it
(composition of affine maps is associative) and applies the result to W1(0). The backward is the
mirror image: the gradient reaching the composed map of rank r is the gradient of the ranks before
it, and a reduce-scatter sums, for every rank's map, the gradients all later ranks computed for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from kernels.lact import ScanOptions, chunk_bounds
from kernels.reference import decay_matrix
from model.fast_weight_scan import ChunkScan
from parallel.collectives import all_gather_flat, reduce_scatter_flat
from parallel.groups import ParallelDims


@dataclass
class StateMap:
    """What a slice does to the (fast weight W1, momentum) entering it, in the scan's sign convention.

    state_shift D, momentum_shift M: [B, H, d, dh]; momentum_decay P, momentum_to_state Q: [B, H].
    The momentum fields are None when momentum is off (then the map is S -> S + D).
    """

    state_shift: torch.Tensor
    momentum_shift: Optional[torch.Tensor]
    momentum_decay: Optional[torch.Tensor]
    momentum_to_state: Optional[torch.Tensor]
    sign: float

    def then(self, later: "StateMap") -> "StateMap":
        """The map of this slice followed by `later` (the slice after it)."""
        if self.momentum_shift is None:
            return StateMap(self.state_shift + later.state_shift, None, None, None, self.sign)
        decay, gain = later.momentum_decay[..., None, None], later.momentum_to_state[..., None, None]
        return StateMap(
            state_shift=self.state_shift + later.state_shift + self.sign * gain * self.momentum_shift,
            momentum_shift=decay * self.momentum_shift + later.momentum_shift,
            momentum_decay=self.momentum_decay * later.momentum_decay,
            momentum_to_state=self.momentum_to_state + later.momentum_to_state * self.momentum_decay,
            sign=self.sign,
        )

    def apply(
        self, state: torch.Tensor, momentum: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(S, m) entering the slice -> (S, m) leaving it."""
        if self.momentum_shift is None:
            return state + self.state_shift, None
        leaving_state = state + self.state_shift + self.sign * self.momentum_to_state[..., None, None] * momentum
        return leaving_state, self.momentum_decay[..., None, None] * momentum + self.momentum_shift

    def flatten(self) -> torch.Tensor:
        """One contiguous buffer, so a single collective moves the whole map."""
        parts = (self.state_shift, self.momentum_shift, self.momentum_decay, self.momentum_to_state)
        return torch.cat([part.reshape(-1) for part in parts if part is not None])

    def unflatten(self, flat: torch.Tensor) -> "StateMap":
        """A map shaped like this one from a buffer of `flatten`'s layout."""
        state_shape, scalar_shape = self.state_shift.shape, self.state_shift.shape[:2]
        if self.momentum_shift is None:
            return StateMap(flat.reshape(state_shape), None, None, None, self.sign)
        sizes = [state_shape.numel(), state_shape.numel(), scalar_shape.numel(), scalar_shape.numel()]
        shift, momentum, decay, gain = flat.split(sizes)
        return StateMap(
            shift.reshape(state_shape), momentum.reshape(state_shape), decay.reshape(scalar_shape),
            gain.reshape(scalar_shape), self.sign,
        )  # fmt: skip

    def identity(self) -> "StateMap":
        zeros = torch.zeros_like(self.state_shift)
        if self.momentum_shift is None:
            return StateMap(zeros, None, None, None, self.sign)
        scalar = self.momentum_decay
        return StateMap(zeros, zeros, torch.ones_like(scalar), torch.zeros_like(scalar), self.sign)


def _token_weights(per_chunk: torch.Tensor, seq_len: int, chunk_size: int, dim: int) -> torch.Tensor:
    """Repeat a per-chunk quantity along `dim` for every token of its chunk (the last chunk may be short)."""
    lengths = torch.tensor([end - start for start, end in chunk_bounds(seq_len, chunk_size)], device=per_chunk.device)
    return per_chunk.repeat_interleave(lengths, dim=dim)


def _carried_decay(beta: torch.Tensor) -> torch.Tensor:
    """p_c = prod_{j<=c} beta_j: [B, N, H] (in log space, as the reference scan computes it)."""
    return torch.exp(torch.cumsum(torch.log(beta), dim=1))


def local_state_map(
    hk: torch.Tensor,
    v: torch.Tensor,
    eta1: torch.Tensor,
    beta: Optional[torch.Tensor],
    chunk_size: int,
    sign: float,
    dtype: torch.dtype,
) -> StateMap:
    """The map of this rank's slice (module docstring), in `dtype` (fp32 states; fp64 in the proofs).

    hk: [B, T, H, dh]; v: [B, T, H, d]; eta1: [B, T, H]; beta: [B, N, H] or None.
    """
    seq_len = hk.shape[1]
    weighted_v = v.to(dtype) * eta1.to(dtype)[..., None]  # [B, T, H, d]
    hk = hk.to(dtype)
    if beta is None:
        return StateMap(sign * torch.einsum("bthd,bthe->bhde", weighted_v, hk), None, None, None, sign)
    beta = beta.to(dtype)
    decay = decay_matrix(beta)  # [B, H, N, N], decay[c', c] = prod_{c < j <= c'} beta_j
    chunk_weights = torch.stack([sign * decay.sum(dim=-2), decay[..., -1, :]], dim=1)  # [B, 2, H, N]
    token_weights = _token_weights(chunk_weights, seq_len, chunk_size, dim=-1)  # [B, 2, H, T]
    shifts = torch.einsum("bsht,bthd,bthe->bshde", token_weights, weighted_v, hk)  # [B, 2, H, d, dh]
    carried = _carried_decay(beta)
    return StateMap(shifts[:, 0], shifts[:, 1], carried[:, -1], carried.sum(dim=1), sign)


def entering_state_output(
    hq: torch.Tensor,
    state: torch.Tensor,
    momentum: Optional[torch.Tensor],
    beta: Optional[torch.Tensor],
    chunk_size: int,
    sign: float,
) -> torch.Tensor:
    """The output term of what enters the slice: (S + sign * q_c m) h(q_t) -> [B, T, H, d].

    hq: [B, T, H, dh] (operand dtype; the state is cast to it, as the scan's apply does);
    state, momentum: [B, H, d, dh]; beta: [B, N, H] (None: no momentum term).
    """
    out = torch.einsum("bhde,bthe->bthd", state.to(hq.dtype), hq)
    if momentum is None:
        return out
    carried = _carried_decay(beta.to(state.dtype))
    reads = _token_weights(torch.cumsum(carried, dim=1) - carried, hq.shape[1], chunk_size, dim=1)  # q_c, [B, T, H]
    from_momentum = torch.einsum("bhde,bthe->bthd", momentum.to(hq.dtype), hq)
    return out + (sign * reads.to(hq.dtype))[..., None] * from_momentum


def compose_prefix(gathered: torch.Tensor, rank: int, like: StateMap) -> torch.Tensor:
    """The flattened composition of the maps of ranks 0..rank-1 (the identity for rank 0); gathered [sp, n]."""
    composed = like.identity()
    for earlier in range(rank):
        composed = composed.then(like.unflatten(gathered[earlier]))
    return composed.flatten()


class PendingExchange:
    """An all-gather in flight; `finish()` waits for it and returns the map of the earlier ranks."""

    def __init__(self, local: StateMap, dims: ParallelDims) -> None:
        self.like = local
        self.dims = dims
        self.handle: Optional[dist.Work] = None
        self.sent: Optional[torch.Tensor] = None
        self.gathered = _StartGather.apply(local.flatten(), self)

    def finish(self) -> StateMap:
        return self.like.unflatten(_FinishGather.apply(self.gathered, self))


class _StartGather(torch.autograd.Function):
    """Forward: launch the all-gather of every rank's flattened map. Backward: reduce-scatter."""

    @staticmethod
    def forward(ctx, flat: torch.Tensor, pending: PendingExchange) -> torch.Tensor:
        dims = pending.dims
        flat = flat.contiguous()
        gathered = flat.new_empty((dims.sp, flat.numel()))
        pending.handle = all_gather_flat(gathered.view(-1), flat, group=dims.sp_group, async_op=True)
        pending.sent = flat  # the collective reads it until finish()
        ctx.dims = dims
        return gathered

    @staticmethod
    def backward(ctx, grad_gathered: torch.Tensor):
        dims = ctx.dims
        grad_flat = grad_gathered.new_empty(grad_gathered.shape[1:])
        reduce_scatter_flat(grad_flat, grad_gathered.contiguous().view(-1), group=dims.sp_group)
        return grad_flat, None


class _FinishGather(torch.autograd.Function):
    """Forward: wait, compose the earlier ranks' maps. Backward: this rank's gradient for every gathered map."""

    @staticmethod
    def forward(ctx, gathered: torch.Tensor, pending: PendingExchange) -> torch.Tensor:
        pending.handle.wait()
        ctx.save_for_backward(gathered)
        ctx.like, ctx.rank = pending.like, pending.dims.sp_rank
        return compose_prefix(gathered, ctx.rank, ctx.like)

    @staticmethod
    def backward(ctx, grad_prefix: torch.Tensor):
        (gathered,) = ctx.saved_tensors
        if ctx.rank == 0:  # the first slice starts from W1(0) alone
            return torch.zeros_like(gathered), None
        leaf = gathered.detach().requires_grad_(True)
        with torch.enable_grad():
            prefix = compose_prefix(leaf, ctx.rank, ctx.like)
            (grad,) = torch.autograd.grad(prefix, leaf, grad_prefix)
        return grad, None


def state_exchange_scan(
    local_scan: ChunkScan,
    dims: ParallelDims,
    hq: torch.Tensor,
    hk: torch.Tensor,
    v: torch.Tensor,
    eta1: torch.Tensor,
    initial_state: torch.Tensor,
    options: ScanOptions,
    *,
    beta: Optional[torch.Tensor] = None,
    initial_momentum: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The W1 chunk scan of one slice of a sequence per rank, with `ttt_la_parallel_reference`'s
    arguments after `local_scan` and `dims`, and what the single-process scan returns for this
    slice: outputs [B, T, H, d], and the state and momentum leaving the slice.

    `local_scan` is the local W1 chunk scan (`model.fast_weight_scan.local_w1_chunk_scan`: Triton on
    CUDA, the reference elsewhere); it runs from the zero state while the maps travel. `options.muon`
    is off whenever this runs: `SequenceParallelLM` refuses Muon in the parallel form (`MUON_ERROR`)
    before it sets any scan.
    """
    chunk_size, update_sign = options.chunk_size, options.update_sign
    local = local_state_map(hk, v, eta1, beta, chunk_size, update_sign, initial_state.dtype)
    pending = PendingExchange(local, dims)
    out, _, _ = local_scan(hq, hk, v, eta1, torch.zeros_like(initial_state), options, beta=beta)
    earlier = pending.finish()
    if beta is not None and initial_momentum is None:
        initial_momentum = torch.zeros_like(initial_state)
    state_in, momentum_in = earlier.apply(initial_state, initial_momentum if beta is not None else None)
    out = out + entering_state_output(hq, state_in, momentum_in, beta, chunk_size, update_sign)
    state_out, momentum_out = local.apply(state_in, momentum_in)
    return out, state_out, momentum_out


MUON_ERROR = (
    "model.ttt.muon=true cannot run with parallel.sp > 1 in model.ttt.mode=linear_attention: Newton-Schulz of the "
    "momentum carried into a slice is not a linear function of it, so slices cannot start before the "
    "previous slice has finished; set model.ttt.muon=false, or model.ttt.mode=recurrent (the serial ring), "
    "or parallel.sp=1"
)
