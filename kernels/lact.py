"""The LaCT update in PyTorch: what the recurrent form and decoding run, and the pieces the parallel
form shares with them.

* `lact_recurrent`: the faithful LaCT inner loop. Fast weights W0, W2 `[B, H, dh, d]`, W1
  `[B, H, d, dh]`; each chunk is first answered with the weights left by earlier chunks, then takes
  one (optionally momentum / Muon / weight-normed) gradient step on `-<f(k), v>`. The step is two
  functions: `chunk_gradients` (a sum of per-token terms at the chunk's entering weights, so it can
  equally be summed token by token, as decoding does) and `apply_chunk_gradients` (momentum, Muon,
  the signed step and weight norm, from that sum alone; `ChunkStep` holds its options).
* the options of the linear-attention form's W1 chunk scan (`ScanOptions`),
* Muon's Newton-Schulz map (`NewtonSchulz`, `newton_schulz5`), the torch feature maps
  (`swiglu_features`, the form `kernels.features` falls back to, and `identity_features`), the chunk
  arithmetic (`chunk_bounds`, `num_chunks`, `chunk_mean`) and the one loop over packed documents
  (`scan_documents`).

All tensors are in the layout `[B, T, H, *]`. Learning rates are per token (`eta*` `[B, T, H]`);
momentum coefficients are per chunk (`beta` `[B, N, H]`, N = ceil(T / C)). A sequence whose length
is not a multiple of the chunk size ends in a shorter chunk. States are computed in the dtype of the
inputs (float64 in the proofs, float32 when the layer runs them). The naive parallel form, the oracle
of the Triton chunk kernels, is `kernels.reference`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence, TypeVar

import torch
import torch.nn.functional as F

from kernels.fast_weights import ChunkGradients, FastWeights

# Muon's Newton-Schulz iteration x <- a x + (b G + c G^2) x, G = x x^T, one (a, b, c) per step.
# "classic": the fixed quintic of Keller Jordan's Muon, five times. "lact": the five-step schedule of
# the released LaCT language models (a1600012888/LaCT, lact_llm), a different (a, b, c) per step.
NS_SCHEDULES: dict[str, tuple[tuple[float, float, float], ...]] = {
    "classic": ((3.4445, -4.7750, 2.0315),) * 5,
    "lact": (
        (4.0848, -6.8946, 2.9270),
        (3.9505, -6.3029, 2.6377),
        (3.7418, -5.5913, 2.3037),
        (2.8769, -3.1427, 1.2046),
        (2.8366, -3.0525, 1.2012),
    ),
}
NS_EPS = 1e-7  # added to the Frobenius norm before the first step


@dataclass(frozen=True)
class NewtonSchulz:
    """Muon's orthogonalisation: which coefficient schedule, and the dtype the iteration runs in.

    `compute_dtype=None` iterates in the update's own dtype (float64 in the proofs); the layer passes
    its operand dtype, which is bf16 under autocast, as the released LaCT code iterates in bf16.
    """

    schedule: str = "lact"
    compute_dtype: Optional[torch.dtype] = None

    @property
    def coefficients(self) -> tuple[tuple[float, float, float], ...]:
        return NS_SCHEDULES[self.schedule]


def resolve_muon(muon: "bool | NewtonSchulz | None") -> Optional[NewtonSchulz]:
    """`muon` as the references take it: False/None (off), True (the default schedule) or a NewtonSchulz."""
    if isinstance(muon, NewtonSchulz):
        return muon
    return NewtonSchulz() if muon else None


@dataclass(frozen=True)
class ScanOptions:
    """How the linear-attention form's W1 chunk scan runs, besides its tensors: the one options object of
    the naive form (`kernels.reference.ttt_la_parallel_reference`), the public op
    (`kernels.ttt_la.chunk_ttt_la`) and the state exchange across sp ranks."""

    chunk_size: int  # tokens per chunk; the last chunk of a sequence (or document) may be shorter
    muon: "bool | NewtonSchulz | None" = False  # Newton-Schulz on each chunk's update (True: the default map)
    token_causal: bool = False  # add the intra-chunk term sum_{s <= t} eta1_s (h(q_t) . h(k_s)) v_s
    update_sign: float = 1.0  # +1 descends the inner loss, -1 ascends it


def swiglu_features(x: torch.Tensor, w0: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """h(x) = silu(W0 x) * (W2 x).

    x: [B, T, H, d]; w0, w2: [H, dh, d] (shared) or [B, H, dh, d] (per sequence). Returns [B, T, H, dh].
    """
    pattern = "bthd,hed->bthe" if w0.dim() == 3 else "bthd,bhed->bthe"
    return F.silu(torch.einsum(pattern, x, w0)) * torch.einsum(pattern, x, w2)


def identity_features(x: torch.Tensor, w0: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """h(x) = x: the fast weight is one linear layer f(x) = W1 x (the ladder's "V3"); w0, w2 unused."""
    return x


def newton_schulz5(update: torch.Tensor, muon: NewtonSchulz = NewtonSchulz()) -> torch.Tensor:
    """Muon's orthogonalisation of each trailing matrix of `update` ([..., m, n]), in its dtype out.

    Works on the wide orientation (m <= n) so the Gram matrix is the small one, as Muon does; the
    Frobenius norm (+ NS_EPS) bounds the spectral norm by 1 before the first step.
    """
    return newton_schulz5_many([update], muon)[0]


def newton_schulz5_many(updates: Sequence[torch.Tensor], muon: NewtonSchulz = NewtonSchulz()) -> list[torch.Tensor]:
    """`newton_schulz5` of each tensor of `updates`, its matrices iterated together: those of one wide
    shape and dtype are stacked into one batch, so each step is one batched product for all of them
    rather than one per tensor. Every matrix is normalised and iterated on its own, so the results are
    `newton_schulz5`'s. Where a decoder updates every layer's three fast weights at once, that is 15
    products in place of 15 per weight and layer, each a launch of a few microseconds at batch 1."""
    wide = [u.transpose(-1, -2) if u.shape[-2] > u.shape[-1] else u for u in updates]
    groups: dict[tuple, list[int]] = {}
    for index, x in enumerate(wide):
        groups.setdefault((x.shape[-2:], x.dtype), []).append(index)
    results: list[Optional[torch.Tensor]] = [None] * len(updates)
    for indices in groups.values():
        stacked = torch.cat([wide[i].reshape(-1, *wide[i].shape[-2:]) for i in indices])
        done = _orthogonalise(stacked.to(muon.compute_dtype or stacked.dtype), muon)
        for i, part in zip(indices, done.split([wide[i][..., 0, 0].numel() for i in indices])):
            x = part.reshape(wide[i].shape).to(updates[i].dtype)
            results[i] = x.transpose(-1, -2) if updates[i].shape[-2] > updates[i].shape[-1] else x
    return results


def _orthogonalise(x: torch.Tensor, muon: NewtonSchulz) -> torch.Tensor:
    """The Newton-Schulz iteration on wide matrices x [N, m, n] (m <= n), each normalised first."""
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + NS_EPS)
    for a, b, c in muon.coefficients:
        gram = x @ x.transpose(-1, -2)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x


def chunk_bounds(seq_len: int, chunk_size: int) -> list[tuple[int, int]]:
    """[(start, end)] of each chunk; the last one is shorter when chunk_size does not divide seq_len."""
    return [(s, min(s + chunk_size, seq_len)) for s in range(0, seq_len, chunk_size)]


def num_chunks(seq_len: int, chunk_size: int) -> int:
    return math.ceil(seq_len / chunk_size)


def chunk_mean(per_token: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Mean over each chunk of a per-token quantity: [B, T, H] -> [B, N, H] (the last chunk may be short)."""
    return torch.stack([per_token[:, s:e].mean(dim=1) for s, e in chunk_bounds(per_token.shape[1], chunk_size)], 1)


Result = TypeVar("Result")


def scan_documents(
    scan_document: Callable[[int, slice, Optional[torch.Tensor]], Result],
    cu_seqlens: torch.Tensor,
    chunk_size: int,
    beta: Optional[torch.Tensor],
) -> list[Result]:
    """The one loop over documents packed on a row (fla's `cu_seqlens` layout), each scanned on its own.

    Calls `scan_document(i, tokens, doc_beta)` for every document i, in order: tokens is the slice of
    the row's T axis it covers, doc_beta its [1, n_i, H] rows of beta (None when beta is None).
    cu_seqlens: [D + 1] token offsets (0 first, T last); beta: [1, NC, H] per-chunk momentum, the
    chunks of every document counted from its own start. Returns the D results in document order.
    The parallel reference runs its packed documents in it, and the layer its recurrent form.
    """
    bounds = [int(x) for x in cu_seqlens.tolist()]
    results, chunk = [], 0
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        n = num_chunks(end - start, chunk_size)
        doc_beta = None if beta is None else beta[:, chunk : chunk + n]
        results.append(scan_document(i, slice(start, end), doc_beta))
        chunk += n
    return results


def lact_chunk_gradients(
    k: torch.Tensor, v: torch.Tensor, eta0: torch.Tensor, eta1: torch.Tensor, eta2: torch.Tensor, weights: FastWeights
) -> ChunkGradients:
    """The hand-derived gradient of one chunk's inner loss (what LaCT computes instead of autograd).

    k, v: [B, n, H, d]; eta*: [B, n, H]. With a = W0 k, b = W2 k, h = silu(a) b, g = W1^T v:
      dl/dW1 = -v h^T,  dl/dW0 = -(g * b * silu'(a)) k^T,  dl/dW2 = -(g * silu(a)) k^T.
    """
    gate_pre = torch.einsum("bnhd,bhed->bnhe", k, weights.w0)  # [B, n, H, dh]
    value_pre = torch.einsum("bnhd,bhed->bnhe", k, weights.w2)
    gate = F.silu(gate_pre)
    hidden = gate * value_pre
    hidden_grad = torch.einsum("bnhd,bhde->bnhe", v, weights.w1)  # g = W1^T v, [B, n, H, dh]
    sig = torch.sigmoid(gate_pre)
    silu_grad = sig * (1 + gate_pre * (1 - sig))
    g1 = -torch.einsum("bnhd,bnhe->bhde", v * eta1.unsqueeze(-1), hidden)
    g0 = -torch.einsum("bnhe,bnhd->bhed", hidden_grad * value_pre * silu_grad * eta0.unsqueeze(-1), k)
    g2 = -torch.einsum("bnhe,bnhd->bhed", hidden_grad * gate * eta2.unsqueeze(-1), k)
    return ChunkGradients(g0=g0, g1=g1, g2=g2)


def chunk_gradients(
    k: torch.Tensor,
    v: torch.Tensor,
    eta0: torch.Tensor,
    eta1: torch.Tensor,
    eta2: torch.Tensor,
    weights: FastWeights,
    fast_weights: str = "all",
    features: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = swiglu_features,
) -> ChunkGradients:
    """G_i = sum over the given tokens of eta_i,t * grad_{W_i} l_t(weights), for the fast weights only.

    k, v: [B, n, H, d]; eta*: [B, n, H]; returns [B, H, *, *] gradients. The weights are fixed (those
    entering the chunk), so G_i is a plain sum of per-token terms: the chunk's gradient is the sum of
    this function over any split of its tokens, down to one token at a time. `fast_weights="w1"` gives
    G1 = -sum_t eta1_t v_t h(k_t)^T alone, for any feature map h = `features`.
    """
    if fast_weights == "all":
        return lact_chunk_gradients(k, v, eta0, eta1, eta2, weights)
    hk = features(k, weights.w0, weights.w2)  # [B, n, H, dh]
    return ChunkGradients(g1=-torch.einsum("bnhd,bnhe->bhde", v * eta1.unsqueeze(-1), hk))


@dataclass(frozen=True)
class ChunkStep:
    """How a chunk's gradient becomes its step, besides the gradient and the momentum decay."""

    muon: Optional[NewtonSchulz] = None  # Newton-Schulz on the update (None: off)
    update_sign: float = 1.0  # +1 descends the inner loss, -1 ascends it
    row_norms: Optional[FastWeights] = None  # weight norm's target norm of every row, [B or 1, H, rows, 1] (None: off)
    weight_norm_eps: float = 0.0


def row_norms_of(weights: FastWeights) -> FastWeights:
    """The norm of every row of W0, W1, W2 ([..., rows, 1] each): the targets weight norm restores."""
    return weights.weights().map(lambda x: x.norm(dim=-1, keepdim=True))


def _row_normalise(w: torch.Tensor, row_norm: torch.Tensor, eps: float) -> torch.Tensor:
    """Weight norm: rescale every row of w ([..., rows, cols]) to the given norms ([..., rows, 1]),
    dividing by (norm + eps) as the released LaCT code does (eps = 1e-5 there)."""
    return w / (w.norm(dim=-1, keepdim=True) + eps) * row_norm


def _momentum_update(
    momentum: Optional[torch.Tensor], grad: torch.Tensor, beta_c: Optional[torch.Tensor]
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """M(c) = beta_c M(c-1) + G(c); returns (the update direction, the new momentum)."""
    if beta_c is None:
        return grad, None
    new_momentum = beta_c[:, :, None, None] * momentum + grad
    return new_momentum, new_momentum


def _chunk_directions(
    w: FastWeights, grads: ChunkGradients, beta_c: Optional[torch.Tensor]
) -> tuple[dict[str, torch.Tensor], FastWeights]:
    """The first half of a chunk's step: each stepped weight's direction ({"w0": M0, ...}: the momentum
    M = beta_c M + G, or G without momentum) and the state holding the new momenta."""
    updated, directions = replace(w), {}
    for name, grad in grads.named_tensors():
        index = name[1]  # g0, g1, g2 step w0, w1, w2
        directions[f"w{index}"], new_momentum = _momentum_update(getattr(w, f"m{index}"), grad, beta_c)
        setattr(updated, f"m{index}", new_momentum)
    return directions, updated


def _step_weights(updated: FastWeights, updates: dict[str, torch.Tensor], step: ChunkStep) -> FastWeights:
    """The second half: W <- W - update_sign * U for each weight's update U (its direction, through Muon
    when on), rows renormalised (weight norm); `updated` from `_chunk_directions` (modified in place)."""
    for name, update in updates.items():
        weight = getattr(updated, name) - step.update_sign * update
        if step.row_norms is not None:
            weight = _row_normalise(weight, getattr(step.row_norms, name), step.weight_norm_eps)
        setattr(updated, name, weight)
    return updated


def apply_chunk_gradients(
    w: FastWeights, grads: ChunkGradients, beta_c: Optional[torch.Tensor], step: ChunkStep
) -> FastWeights:
    """The fast weights after one chunk's step, from its gradients alone (`chunk_gradients`).

    Per weight with a gradient: M = beta_c M + G (when momentum is on), U = NS5(M) (Muon),
    W <- W - update_sign * U, rows renormalised (weight norm). w: [B, H, *, *], with the momenta of
    the fast weights when beta_c ([B, H]) is given; grads: [B, H, *, *]. Returns a new state (w is
    left as it is); weights without a gradient are carried over. No token is read here: this is all
    that remains of a chunk's update once its gradient has been summed.
    """
    return apply_chunk_gradients_many([(w, grads, beta_c, step)])[0]


def apply_chunk_gradients_many(
    chunks: Sequence[tuple[FastWeights, ChunkGradients, Optional[torch.Tensor], ChunkStep]],
) -> list[FastWeights]:
    """`apply_chunk_gradients` of several independent states (w, grads, beta_c, step), such as every
    layer of a decoder, with their Muon iterations run as one (`newton_schulz5_many`): per weight and
    state they would be 15 small products each. The steps share their Muon setting (one model's
    layers do); each keeps its own sign and weight-norm targets."""
    halves = [_chunk_directions(w, grads, beta_c) for w, grads, beta_c, _ in chunks]
    muon = chunks[0][3].muon
    if muon is not None:
        done = iter(newton_schulz5_many([d for directions, _ in halves for d in directions.values()], muon))
        halves = [({name: next(done) for name in directions}, updated) for directions, updated in halves]
    return [_step_weights(updated, updates, chunk[3]) for (updates, updated), chunk in zip(halves, chunks)]


@dataclass
class RecurrentTrace:
    """What the recurrent loop saw at each chunk: the weights it answered and featurised keys with."""

    w0: list[torch.Tensor]  # W0(c-1) used by chunk c, [B, H, dh, d] each
    w1: list[torch.Tensor]  # W1(c-1)
    w2: list[torch.Tensor]


def lact_recurrent(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,  # [B, T, H, d]
    eta0: torch.Tensor, eta1: torch.Tensor, eta2: torch.Tensor,  # [B, T, H]
    initial: FastWeights,
    chunk_size: int,
    *,
    beta: Optional[torch.Tensor] = None,
    muon: "bool | NewtonSchulz" = False,
    weight_norm: bool = False, weight_norm_eps: float = 0.0, row_norms: Optional[FastWeights] = None,
    fast_weights: str = "all",
    update_sign: float = 1.0,
    features: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = swiglu_features,
    trace: Optional[RecurrentTrace] = None,
) -> tuple[torch.Tensor, FastWeights]:
    """The faithful LaCT layer: block-causal, apply-then-update, one gradient step per chunk.

    q, k, v: [B, T, H, d]; eta0/1/2: [B, T, H]; beta: [B, N, H] per-chunk momentum (None: off);
    `fast_weights="w1"` freezes W0, W2; `update_sign=-1` ascends the inner loss instead;
    `features(x, w0, w2)` is the feature map h (SwiGLU; another map needs `fast_weights="w1"`,
    because the hand-derived W0/W2 gradients are SwiGLU's). Weight norm restores every row to its
    norm in `row_norms` ([B or 1, H, rows, 1] each): those of the sequence's first weights, which a
    continued sequence must pass because its entering rows are (with eps > 0) slightly shorter.
    Returns the output o [B, T, H, d] and the weights after the last chunk (for continuing a
    sequence). `trace`, when given, records the weights each chunk used (for the unrolled rewrite).
    """
    if initial.w0.dim() != 4:
        raise ValueError("initial fast weights must be per sequence: [B, H, rows, cols]")
    if fast_weights not in ("all", "w1"):
        raise ValueError(f"fast_weights={fast_weights!r} must be 'all' or 'w1'")
    if fast_weights == "all" and features is not swiglu_features:
        raise ValueError("fast_weights='all' needs the SwiGLU feature map (its W0/W2 gradients are written for it)")
    w = initial.with_momenta() if beta is not None else initial.weights()
    targets = row_norms if row_norms is not None else w
    step = ChunkStep(resolve_muon(muon), update_sign, row_norms_of(targets) if weight_norm else None, weight_norm_eps)
    outputs = []
    for c, (s, e) in enumerate(chunk_bounds(q.shape[1], chunk_size)):
        if trace is not None:
            trace.w0.append(w.w0)
            trace.w1.append(w.w1)
            trace.w2.append(w.w2)
        hq = features(q[:, s:e], w.w0, w.w2)
        outputs.append(torch.einsum("bhde,bnhe->bnhd", w.w1, hq))
        grads = chunk_gradients(k[:, s:e], v[:, s:e], eta0[:, s:e], eta1[:, s:e], eta2[:, s:e], w, fast_weights, features)
        w = apply_chunk_gradients(w, grads, None if beta is None else beta[:, c], step)
    return torch.cat(outputs, dim=1), w
