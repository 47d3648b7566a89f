"""Sliding-window causal softmax attention (the local branch LaCT pairs with its large chunks).

Token t attends to keys s with t - window < s <= t (and, with packed documents, only to keys of its own
document). The large-chunk TTT branch only sees earlier chunks, so this branch is what makes the layer
causal token by token inside a chunk.

Four paths compute the same function:
* `band_attention_reference`: one SDPA call with a [T, T] band mask (tests, short sequences);
* `blockwise_band_attention`: queries in blocks of `window`, each against at most 2 * window keys, so
  memory is O(T * window) rather than O(T^2) (CPU, and the reference the GPU path is tested against);
* `kernels.window_attention`: the project's Triton kernels, the band as their loop bounds (no mask
  built), chosen by `model.window_kernel=triton`;
* `flex_window_attention`: FlexAttention with a block-sparse mask, the default on CUDA in 16-bit: only
  the 128 x 128 tiles that touch the band are computed, so its cost is T * window, not the dense
  masked kernel's T * 2 * window with a boolean mask read per element.

The block mask depends only on (T, window) without documents, and on the batch's `doc_ids` with them:
`window_block_mask` caches the first kind and the LM builds the second once per forward, outside the
blocks, so every layer (and a compiled block) reuses it.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch._inductor import config as inductor_config

from kernels import window_attention as window_kernels
from kernels.triton_utils import use_triton

try:  # FlexAttention: torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - depends on the torch build
    BlockMask = create_block_mask = flex_attention = None

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


def window_mask_mod(window: int, doc_ids: Optional[torch.Tensor] = None) -> Callable:
    """FlexAttention's mask function: query i sees key j when 0 <= i - j < window (same document)."""

    def in_window(b: Any, h: Any, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        distance = q_idx - kv_idx
        return (distance >= 0) & (distance < window)

    if doc_ids is None:
        return in_window

    def in_window_and_document(b: Any, h: Any, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return in_window(b, h, q_idx, kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

    return in_window_and_document


_WINDOW_MASKS: dict[tuple, Any] = {}


def window_block_mask(seq_len: int, window: int, device: torch.device, doc_ids: Optional[torch.Tensor] = None) -> Any:
    """The BlockMask of the band (per row of `doc_ids` [B, T] when documents are packed).

    Without documents the mask is cached per (T, window, device): one build serves every layer and
    step. With documents it depends on the batch; the LM builds it once per forward.
    """
    key = (seq_len, window, str(device))
    if doc_ids is None and key in _WINDOW_MASKS:
        return _WINDOW_MASKS[key]
    batch = None if doc_ids is None else doc_ids.shape[0]
    # Built compiled on CUDA (eagerly it would materialise the [T, T] mask), never under Inductor's CUDA graphs
    # (`train.compile_options.triton.cudagraphs`): their outputs live in the graphs' pool and the next replay
    # overwrites them, while this mask is kept for every later step.
    with inductor_config.patch({"triton.cudagraphs": False}):
        mask = create_block_mask(window_mask_mod(window, doc_ids), batch, None, seq_len, seq_len, device=device,
                                 _compile=device.type == "cuda")
    if doc_ids is None:
        _WINDOW_MASKS[key] = mask
    return mask


_COMPILED_FLEX: Optional[Callable] = None


def _flex(device: torch.device) -> Callable:
    """FlexAttention compiled on CUDA (its fused kernel exists only compiled); the eager op elsewhere,
    which runs FlexAttention's own dense reference (CPU tests)."""
    global _COMPILED_FLEX
    if device.type != "cuda":
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


def flex_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, doc_ids: Optional[torch.Tensor] = None,
    block_mask: Optional[Any] = None,
) -> torch.Tensor:
    """q, k, v: [B, T, A, Dh] -> [B, T, A, Dh] through FlexAttention; `block_mask` from
    `window_block_mask` (built here when not given)."""
    if block_mask is None:
        block_mask = window_block_mask(q.shape[1], window, q.device, doc_ids)
    out = _flex(q.device)(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask)
    return out.transpose(1, 2)


def use_flex_attention(x: torch.Tensor) -> bool:
    """FlexAttention on CUDA for 16-bit activations; the blockwise SDPA path elsewhere."""
    return flex_attention is not None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)


def use_window_kernel(x: torch.Tensor, kernel: str) -> bool:
    """The project's Triton window kernels (`kernels.window_attention`) when the config asks for them and
    `kernels.triton_utils.use_triton` allows them on x (CUDA; the CPU tests force them through the
    interpreter) in a dtype they serve."""
    return kernel == "triton" and window_kernels.supports(x) and use_triton(x)


def sliding_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, doc_ids: Optional[torch.Tensor] = None,
    block_mask: Optional[Any] = None, kernel: str = "flex",
) -> torch.Tensor:
    """Dispatch: the Triton window kernels where `kernel` is "triton" and they run, else FlexAttention
    on CUDA in 16-bit (with the caller's `block_mask` when it built one), else the blockwise SDPA path.
    All mask across documents when doc_ids [B, T] is given."""
    if use_window_kernel(q, kernel):
        return window_kernels.window_attention(q, k, v, window, doc_ids)
    if use_flex_attention(q):
        return flex_window_attention(q, k, v, window, doc_ids, block_mask)
    return blockwise_band_attention(q, k, v, window, doc_ids)
