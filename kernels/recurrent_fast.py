"""Fast path of the recurrent LaCT form: one compiled chunk step, looped over chunks.

Same function as `kernels.reference.lact_recurrent_reference`; the fast weights and momenta are
kept in their own dtype (fp32 in training) while the chunk's matrix products run in the dtype of
q, k, v (bf16 in training). In float64 both are float64 and the result is the reference's.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch

from kernels.reference import (
    FastWeights,
    chunk_bounds,
    lact_chunk_gradients,
    newton_schulz5,
    swiglu_features,
)


def _step_direction(grad: torch.Tensor, momentum: Optional[torch.Tensor], beta_c: Optional[torch.Tensor]):
    if beta_c is None:
        return grad, None
    new_momentum = beta_c[:, :, None, None].to(momentum.dtype) * momentum + grad
    return new_momentum, new_momentum


def lact_chunk_step(q, k, v, eta0, eta1, eta2, weights: tuple, row_norms: tuple, beta_c,
                    muon: bool, weight_norm: bool, fast_weights: str, update_sign: float):
    """One chunk of the LaCT loop: answer q with the current weights, then one gradient step.

    q, k, v: [B, n, H, d]; eta*: [B, n, H]; weights: (w0, w1, w2, m0, m1, m2) with W0, W2
    [B, H, dh, d], W1 [B, H, d, dh] and momenta of the same shapes (None when off); row_norms:
    the rows' norms at the start ([B, H, rows, 1]); beta_c: [B, H] or None.
    Returns (o [B, n, H, d], the new weights tuple).
    """
    w0, w1, w2, m0, m1, m2 = weights
    dtype = q.dtype
    current = FastWeights(w0.to(dtype), w1.to(dtype), w2.to(dtype))
    hq = swiglu_features(q, current.w0, current.w2)
    o = torch.einsum("bhde,bnhe->bnhd", current.w1, hq)
    grads = lact_chunk_gradients(k, v, eta0, eta1, eta2, current)
    new = [w0, w1, w2]
    momenta = [m0, m1, m2]
    indices = (0, 1, 2) if fast_weights == "all" else (1,)
    for i in indices:
        grad = getattr(grads, f"g{i}").to(new[i].dtype)
        direction, momenta[i] = _step_direction(grad, momenta[i], beta_c)
        step = newton_schulz5(direction) if muon else direction
        updated = new[i] - update_sign * step
        if weight_norm:
            updated = updated / updated.norm(dim=-1, keepdim=True) * row_norms[i]
        new[i] = updated
    return o, (*new, *momenta)


@lru_cache(maxsize=None)
def _compiled_step():
    return torch.compile(lact_chunk_step, dynamic=False)


def lact_recurrent_fast(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eta0: torch.Tensor,
    eta1: torch.Tensor,
    eta2: torch.Tensor,
    initial: FastWeights,
    chunk_size: int,
    *,
    beta: Optional[torch.Tensor] = None,
    muon: bool = False,
    weight_norm: bool = False,
    fast_weights: str = "all",
    update_sign: float = 1.0,
    compile: bool = True,
) -> tuple[torch.Tensor, FastWeights]:
    """`lact_recurrent_reference` with the chunk step compiled (`compile=False`: run it eagerly).

    q, k, v: [B, T, H, d]; eta0/1/2: [B, T, H]; initial: FastWeights with W0, W2 [B, H, dh, d],
    W1 [B, H, d, dh] (and momenta m0/m1/m2, optional); beta: [B, N, H] or None.
    Returns o [B, T, H, d] in q's dtype and the final FastWeights (in the initial weights' dtype).
    """
    if initial.w0.dim() != 4:
        raise ValueError("initial fast weights must be per sequence: [B, H, rows, cols]")
    if fast_weights not in ("all", "w1"):
        raise ValueError(f"fast_weights={fast_weights!r} must be 'all' or 'w1'")
    weights = [initial.w0, initial.w1, initial.w2, None, None, None]
    if beta is not None:
        for i, (w, m) in enumerate(zip(weights[:3], (initial.m0, initial.m1, initial.m2))):
            weights[3 + i] = m if m is not None else torch.zeros_like(w)
    row_norms = tuple(w.norm(dim=-1, keepdim=True) for w in weights[:3])
    step = _compiled_step() if compile else lact_chunk_step
    outputs = []
    state = tuple(weights)
    for c, (s, e) in enumerate(chunk_bounds(q.shape[1], chunk_size)):
        o, state = step(q[:, s:e], k[:, s:e], v[:, s:e], eta0[:, s:e], eta1[:, s:e], eta2[:, s:e], state,
                        row_norms, None if beta is None else beta[:, c], muon, weight_norm, fast_weights,
                        update_sign)
        outputs.append(o)
    w0, w1, w2, m0, m1, m2 = state
    return torch.cat(outputs, dim=1), FastWeights(w0, w1, w2, m0, m1, m2)
