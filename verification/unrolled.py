"""The general recurrent LaCT layer unrolled into linear attention over effective keys and values.

Whatever the options (all three fast weights, momentum, Muon, weight norm), the output of chunk c is
read out by W1(c-1), and W1(c-1) is W1(0) plus a sum of rank-one token terms, each transformed by
a few matrices that depend only on the chunk it entered and the chunk reading it:

    o_t = P(c-1, 0) W1(0) phi_t + sum_{s before chunk c} sum_{j = c_s .. c-1} (phi_t . key(s, j)) value(s, j, c)

    phi_t        = h_{W0(c-1), W2(c-1)}(q_t)                       query feature, weights of its chunk
    psi_s        = h_{W0(c_s-1), W2(c_s-1)}(k_s)                    key feature, weights of its chunk
    key(s, j)    = psi_s, or R_j^T psi_s when Muon acts from the right (d > dh)
    value(s,j,c) = sign * eta1_s * beta(c_s -> j) * P(c-1, j) [L_j] v_s

beta(c_s -> j) is the momentum decay from the chunk that holds s to update j; L_j / R_j is the
Muon (Newton-Schulz) map of update j written as a matrix product, NS5(M) = L M or M R; P(c-1, j)
is the product of the weight-norm row scalings applied after updates j .. c-1.

The feature weights W0(c), W2(c) are taken from the recurrent run's trace: when they are fast
their trajectory *is* the non-linear part. Everything in the W1 read-out (momenta, Muon factors,
weight-norm scalings, the output) is rebuilt here from keys, values and learning rates alone, so
agreement with `lact_recurrent` to float64 precision proves the read-out is exactly
linear attention with these effective keys and values.
"""

from __future__ import annotations

from typing import Optional

import torch

from kernels.lact import NS_EPS, NewtonSchulz, RecurrentTrace, chunk_bounds, resolve_muon, swiglu_features


def newton_schulz5_factor(update: torch.Tensor, muon: NewtonSchulz = NewtonSchulz()) -> tuple[str, torch.Tensor]:
    """Write Muon's NS5(update) as a matrix product: ("left", L) with NS5 = L @ update, or ("right", R).

    update: [..., m, n]. The iteration x <- (a I + b G + c G^2) x with G = x x^T only ever multiplies
    x from the left in its wide orientation, so the accumulated left factor is the whole map.
    """
    transposed = update.shape[-2] > update.shape[-1]
    x = update.transpose(-1, -2) if transposed else update
    rows = x.shape[-2]
    eye = torch.eye(rows, dtype=x.dtype, device=x.device)
    factor = eye / (torch.linalg.matrix_norm(x, keepdim=True) + NS_EPS)
    for a, b, c in muon.coefficients:
        current = factor @ x
        gram = current @ current.transpose(-1, -2)
        factor = (a * eye + b * gram + c * gram @ gram) @ factor
    return ("right", factor.transpose(-1, -2)) if transposed else ("left", factor)


def momentum_decay(beta: Optional[torch.Tensor], src: int, dst: int, like: torch.Tensor) -> torch.Tensor:
    """beta(src -> dst) = prod_{i=src+1..dst} beta_i, [B, H]; beta: [B, N, H].

    Without momentum (beta None) an update reaches only its own chunk: 1 when src == dst, else 0,
    shaped like `like` ([B, H])."""
    if beta is None:
        return torch.ones_like(like) if src == dst else torch.zeros_like(like)
    out = torch.ones_like(beta[:, 0])
    for i in range(src + 1, dst + 1):
        out = out * beta[:, i]
    return out


def muon_update(momentum: torch.Tensor, factor: Optional[tuple[str, torch.Tensor]], update_sign: float) -> torch.Tensor:
    """U_j = sign * NS5(M_j) rebuilt from its Muon factor (L M_j or M_j R; M_j itself without Muon): [B, H, d, dh]."""
    side, matrix = factor if factor is not None else (None, None)
    if side == "left":
        momentum = matrix @ momentum
    elif side == "right":
        momentum = momentum @ matrix
    return update_sign * momentum


def weight_norm_scalings(w1_initial: torch.Tensor, updates: list[torch.Tensor], eps: float) -> list[torch.Tensor]:
    """D_j of the weight norm W1(j) = D_j (W1(j-1) + U_j), as per-row scalars [B, H, d], one per update.

    w1_initial: [B, H, d, dh]; updates: U_1.., each [B, H, d, dh]. D_j scales each row back to its norm in W1(0).
    """
    row_norm0 = w1_initial.norm(dim=-1)
    scalings: list[torch.Tensor] = []
    w1 = w1_initial
    for update in updates:
        pre = w1 + update
        scalings.append(row_norm0 / (pre.norm(dim=-1) + eps))
        w1 = scalings[-1][..., None] * pre
    return scalings


def row_scale(scalings: list[torch.Tensor], reader: int, j: int, like: torch.Tensor) -> torch.Tensor:
    """P(reader-1, j): the product of D_j .. D_{reader-1}, [B, H, d]; ones (shaped like `like`) without weight norm."""
    out = torch.ones_like(like)
    for scaling in scalings[j:reader]:
        out = out * scaling
    return out


def unrolled_lact_output(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eta1: torch.Tensor,
    w1_initial: torch.Tensor,
    trace: RecurrentTrace,
    chunk_size: int,
    *,
    beta: Optional[torch.Tensor] = None,
    muon: "bool | NewtonSchulz" = False,
    weight_norm: bool = False,
    weight_norm_eps: float = 0.0,
    update_sign: float = 1.0,
) -> torch.Tensor:
    """Output of the recurrent layer recomputed as linear attention (see the module docstring).

    q, k, v: [B, T, H, d]; eta1: [B, T, H]; w1_initial: [B, H, d, dh]; beta: [B, N, H] or None.
    Deliberately O(N^3) in the number of chunks: it is a proof, not an optimised path.
    """
    bounds = chunk_bounds(q.shape[1], chunk_size)
    n_chunks = len(bounds)
    phi = [swiglu_features(q[:, s:e], trace.w0[c], trace.w2[c]) for c, (s, e) in enumerate(bounds)]
    psi = [swiglu_features(k[:, s:e], trace.w0[c], trace.w2[c]) for c, (s, e) in enumerate(bounds)]
    scaled_v = [v[:, s:e] * eta1[:, s:e, :, None] for s, e in bounds]  # eta1_s v_s, [B, n, H, d]
    raw = [torch.einsum("bnhd,bnhe->bhde", scaled_v[c], psi[c]) for c in range(n_chunks)]  # A(c)

    def decay(src: int, dst: int) -> torch.Tensor:
        return momentum_decay(beta, src, dst, eta1[:, 0])

    momenta = [sum(decay(src, j)[..., None, None] * raw[src] for src in range(j + 1)) for j in range(n_chunks)]
    muon = resolve_muon(muon)
    factors = [newton_schulz5_factor(m, muon) if muon is not None else None for m in momenta]
    # Weight norm: W1(j) = D_j (W1(j-1) + U_j); the last update is never read, so it needs no D.
    updates = [muon_update(momenta[j], factors[j], update_sign) for j in range(n_chunks - 1)] if weight_norm else []
    scalings = weight_norm_scalings(w1_initial, updates, weight_norm_eps)
    rows = w1_initial[..., 0]  # [B, H, d]: the shape of a row scaling

    outputs = []
    for c in range(n_chunks):
        o_c = torch.einsum("bhd,bhde,bnhe->bnhd", row_scale(scalings, c, 0, rows), w1_initial, phi[c])
        for j in range(c):
            side, factor = factors[j] if muon else (None, None)
            for src in range(j + 1):
                keys = psi[src] if side != "right" else torch.einsum("bhef,bnhe->bnhf", factor, psi[src])
                values = scaled_v[src] if side != "left" else torch.einsum("bhde,bnhe->bnhd", factor, scaled_v[src])
                weight = update_sign * decay(src, j)[:, None, :, None] * row_scale(scalings, c, j, rows)[:, None]
                scores = torch.einsum("bnhe,bmhe->bhnm", phi[c], keys)
                o_c = o_c + torch.einsum("bhnm,bmhd->bnhd", scores, values * weight)
        outputs.append(o_c)
    return torch.cat(outputs, dim=1)
