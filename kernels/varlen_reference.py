"""Variable-length batches for the parallel reference: one call of the reference per document."""

from __future__ import annotations

from typing import Optional

import torch

from kernels.reference import num_chunks, ttt_la_parallel_reference


def ttt_la_parallel_varlen_reference(
    hq: torch.Tensor,
    hk: torch.Tensor,
    v: torch.Tensor,
    eta1: torch.Tensor,
    initial_state: torch.Tensor,
    chunk_size: int,
    cu_seqlens: torch.Tensor,
    *,
    beta: Optional[torch.Tensor] = None,
    initial_momentum: Optional[torch.Tensor] = None,
    muon: bool = False,
    token_causal: bool = False,
    update_sign: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Documents packed on one row, as fla lays them out; the state resets at every document start.

    hq, hk: [1, T, H, dh]; v: [1, T, H, d]; eta1: [1, T, H]; cu_seqlens: [D + 1] token offsets
    (0 first, T last); initial_state, initial_momentum: [D, H, d, dh]; beta: [1, NC, H] with the
    chunks of every document counted from its own start, documents in order.
    Returns o [1, T, H, d], final states [D, H, d, dh] and final momenta [D, H, d, dh] (or None).
    """
    if hq.shape[0] != 1:
        raise ValueError(f"cu_seqlens needs batch size 1 (documents packed on one row), got B={hq.shape[0]}")
    bounds = [int(x) for x in cu_seqlens.tolist()]
    outputs, finals, momenta = [], [], []
    chunk = 0
    for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        n = num_chunks(e - s, chunk_size)
        o, final, momentum = ttt_la_parallel_reference(
            hq[:, s:e], hk[:, s:e], v[:, s:e], eta1[:, s:e], initial_state[i : i + 1], chunk_size,
            beta=None if beta is None else beta[:, chunk : chunk + n],
            initial_momentum=None if initial_momentum is None else initial_momentum[i : i + 1],
            muon=muon, token_causal=token_causal, update_sign=update_sign,
        )
        chunk += n
        outputs.append(o)
        finals.append(final)
        momenta.append(momentum)
    final_momenta = torch.cat(momenta) if beta is not None else None
    return torch.cat(outputs, dim=1), torch.cat(finals), final_momenta
