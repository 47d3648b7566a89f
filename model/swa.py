"""Sliding-window causal softmax attention (the local branch LaCT pairs with its large chunks).

Token t attends to keys s with t - window < s <= t. The large-chunk TTT branch only sees earlier
chunks, so this branch is what makes the layer causal token by token inside a chunk.

Three paths compute the same function:
* `band_attention_reference`: one SDPA call with a [T, T] band mask (tests, short sequences);
* `blockwise_band_attention`: queries in blocks of `window`, each against at most 2 * window keys,
  so memory is O(T * window) rather than O(T^2) (CPU, and GPUs without flash-attn);
* flash-attn's native window (`window_size=(window - 1, 0)`) on CUDA when the package is installed.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

try:  # optional fast path; the image may not ship it
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the environment
    flash_attn_func = None


def band_mask(query_positions: torch.Tensor, key_positions: torch.Tensor, window: int) -> torch.Tensor:
    """True where query i may attend key j: 0 <= pos_i - pos_j < window. Shapes [Tq], [Tk] -> [Tq, Tk]."""
    distance = query_positions[:, None] - key_positions[None, :]
    return (distance >= 0) & (distance < window)


def same_document(doc_ids: Optional[torch.Tensor], mask: torch.Tensor, queries: slice, keys: slice) -> torch.Tensor:
    """The band mask [Tq, Tk], further restricted to pairs in one document when doc_ids [B, T] is given: [B, 1, Tq, Tk]."""
    if doc_ids is None:
        return mask
    return mask & (doc_ids[:, queries, None] == doc_ids[:, None, keys])[:, None]


def band_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, doc_ids: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """q, k, v: [B, T, A, Dh] -> [B, T, A, Dh], one dense masked SDPA call."""
    positions = torch.arange(q.shape[1], device=q.device)
    mask = same_document(doc_ids, band_mask(positions, positions, window), slice(None), slice(None))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def blockwise_band_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, doc_ids: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """q, k, v: [B, T, A, Dh] -> [B, T, A, Dh]; each block of `window` queries reads keys [start - window + 1, end).

    doc_ids [B, T] (optional) keeps attention inside each packed document."""
    seq_len = q.shape[1]
    block = max(1, min(window, seq_len))
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # [B, A, T, Dh]
    outputs = []
    for start in range(0, seq_len, block):
        end = min(start + block, seq_len)
        key_start = max(0, start - window + 1)
        mask = band_mask(
            torch.arange(start, end, device=q.device), torch.arange(key_start, end, device=q.device), window
        )
        mask = same_document(doc_ids, mask, slice(start, end), slice(key_start, end))
        outputs.append(
            F.scaled_dot_product_attention(
                qt[:, :, start:end], kt[:, :, key_start:end], vt[:, :, key_start:end], attn_mask=mask
            )
        )
    return torch.cat(outputs, dim=2).transpose(1, 2)


def sliding_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, doc_ids: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Dispatch: flash-attn's window on CUDA (fp16/bf16) when installed and no documents are packed,
    else the blockwise SDPA path (which also masks across documents)."""
    if doc_ids is None and flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return flash_attn_func(q, k, v, causal=True, window_size=(window - 1, 0))
    return blockwise_band_attention(q, k, v, window, doc_ids)
