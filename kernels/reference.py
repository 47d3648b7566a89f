"""The naive parallel form of the TTT layer: the obvious computation the Triton chunk kernels
(`kernels.chunk`, through `kernels.ttt_la.chunk_ttt_la`) are checked against, as fla keeps `naive.py`
beside `chunk.py`.

* `ttt_la_parallel_reference`: the layer when only W1 is fast and weight norm is off, written as
  linear attention: all chunk updates at once (`chunk_updates`), momentum as one matrix over chunks
  (`decay_matrix`), an exclusive prefix sum of states, one apply. The public op runs it where the
  kernels do not (CPU, float64, Muon).

All tensors are in the layout `[B, T, H, *]`; eta1 is per token `[B, T, H]`, beta per chunk
`[B, N, H]`. States are computed in the dtype of the inputs. The recurrent form it equals (with
W0, W2 frozen) is `kernels.lact.lact_recurrent`.
"""

from __future__ import annotations

from typing import Optional

import torch

from kernels.lact import ScanOptions, chunk_bounds, newton_schulz5, resolve_muon, scan_documents


def chunk_updates(hk: torch.Tensor, v: torch.Tensor, eta1: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """A(c) = sum_{t in c} eta1_t v_t h(k_t)^T for every chunk: [B, T, H, *] -> [B, N, H, d, dh]."""
    return torch.stack(
        [
            torch.einsum("bnhd,bnhe->bhde", v[:, s:e] * eta1[:, s:e, :, None], hk[:, s:e])
            for s, e in chunk_bounds(hk.shape[1], chunk_size)
        ],
        dim=1,
    )


def decay_matrix(beta: torch.Tensor) -> torch.Tensor:
    """L[b, h, c, c'] = prod_{j=c'+1..c} beta[b, j, h] for c' <= c, else 0: M = L @ A solves M(c) = beta_c M(c-1) + A(c)."""
    log_beta = torch.log(beta).transpose(1, 2)  # [B, H, N]
    cumulative = torch.cumsum(log_beta, dim=-1)
    diff = cumulative[..., :, None] - cumulative[..., None, :]
    causal = torch.ones(diff.shape[-2:], dtype=torch.bool, device=beta.device).tril()
    return torch.where(causal, torch.exp(diff.masked_fill(~causal, 0.0)), torch.zeros_like(diff))


def ttt_la_parallel_reference(
    hq: torch.Tensor,
    hk: torch.Tensor,
    v: torch.Tensor,
    eta1: torch.Tensor,
    initial_state: torch.Tensor,
    options: ScanOptions,
    *,
    beta: Optional[torch.Tensor] = None,
    initial_momentum: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The W1-only layer as block-causal linear attention, computed as a chunk scan.

    hq, hk: [B, T, H, dh] features h(q), h(k); v: [B, T, H, d]; eta1: [B, T, H];
    initial_state: [B, H, d, dh] = W1 entering the sequence (learned W1(0) plus any carried state);
    beta: [B, N, H] per-chunk momentum (None: off); initial_momentum: [B, H, d, dh]; `options` the chunk
    size, Muon, the intra-chunk term and the update sign.

      U(c)  = update_sign * NS5?(M(c)),  M(c) = beta_c M(c-1) + A(c),  A(c) = sum_t eta1_t v_t h(k_t)^T
      S(c)  = initial_state + sum_{c' < c} U(c')            (exclusive prefix sum: the state chunk c reads)
      o_t   = S(c) h(q_t)  [+ sum_{s <= t, s in c} eta1_s (h(q_t) . h(k_s)) v_s  if token_causal]

    Returns o [B, T, H, d], the final state [B, H, d, dh] and the final momentum (None when off).
    With `cu_seqlens` ([D + 1] offsets), D documents packed on one row (B = 1) are scanned each on its
    own (`scan_documents`): initial_state and initial_momentum are then [D, H, d, dh], beta [1, NC, H]
    with every document's chunks counted from its start, and the final state and momentum [D, H, d, dh].
    """
    if cu_seqlens is not None:
        return _parallel_reference_per_document(hq, hk, v, eta1, initial_state, options, cu_seqlens, beta,
                                                initial_momentum)  # fmt: skip
    batch, seq_len, heads, _ = hq.shape
    updates = chunk_updates(hk, v, eta1, options.chunk_size)  # [B, N, H, d, dh]
    momentum = None
    if beta is not None:
        mixing = decay_matrix(beta)  # [B, H, N, N]
        updates = torch.einsum("bhcj,bjhde->bchde", mixing, updates)
        if initial_momentum is not None:
            carried = torch.exp(torch.cumsum(torch.log(beta), dim=1))  # prod_{j<=c} beta_j, [B, N, H]
            updates = updates + carried[..., None, None] * initial_momentum[:, None]
        momentum = updates[:, -1]
    muon = resolve_muon(options.muon)
    if muon is not None:
        updates = newton_schulz5(updates, muon)
    update_sign = options.update_sign
    updates = update_sign * updates
    inclusive = initial_state[:, None] + torch.cumsum(updates, dim=1)  # S after chunk c
    read_states = torch.cat([initial_state[:, None], inclusive[:, :-1]], dim=1)  # [B, N, H, d, dh]
    outputs = []
    for c, (s, e) in enumerate(chunk_bounds(seq_len, options.chunk_size)):
        o_c = torch.einsum("bhde,bnhe->bnhd", read_states[:, c], hq[:, s:e])
        if options.token_causal:
            scores = torch.einsum("bnhe,bmhe->bhnm", hq[:, s:e], hk[:, s:e]).tril()
            o_c = o_c + update_sign * torch.einsum("bhnm,bmhd->bnhd", scores, v[:, s:e] * eta1[:, s:e, :, None])
        outputs.append(o_c)
    return torch.cat(outputs, dim=1), inclusive[:, -1], momentum


def _parallel_reference_per_document(hq, hk, v, eta1, initial_state, options: ScanOptions, cu_seqlens, beta,
                                     initial_momentum) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """`ttt_la_parallel_reference` over packed documents (shapes there); the state resets at each document."""
    if hq.shape[0] != 1:
        raise ValueError(f"cu_seqlens needs batch size 1 (documents packed on one row), got B={hq.shape[0]}")

    def scan_document(i: int, tokens: slice, doc_beta: Optional[torch.Tensor]):
        return ttt_la_parallel_reference(
            hq[:, tokens], hk[:, tokens], v[:, tokens], eta1[:, tokens], initial_state[i : i + 1], options,
            beta=doc_beta, initial_momentum=None if initial_momentum is None else initial_momentum[i : i + 1],
        )  # fmt: skip

    outputs, finals, momenta = zip(*scan_documents(scan_document, cu_seqlens, options.chunk_size, beta))
    final_momenta = torch.cat(momenta) if beta is not None else None
    return torch.cat(outputs, dim=1), torch.cat(finals), final_momenta
