"""Decode steps fused by a compiler: each layer's token step, and its chunk update, one compiled graph.

At batch 1 a decode step is launch-bound: a layer runs its norms, projections, RoPE, gates, learning-
rate heads, the running sums and the window's ring write as separate small kernels, each a few
microseconds whatever its size. Compiling a layer's step (`torch.compile`, one graph, static shapes)
fuses that elementwise glue around the matmuls, so a replayed CUDA graph (`decoding.graphs`) holds
several times fewer kernels.

The compiled functions are the plain ones, `Block.forward` under the decoder's strategies and
`layer_chunk_update`, so eager and compiled steps compute the same thing and the tests compare them.
One graph serves every layer: the layers share their code and shapes, and each layer's module and
cache are inputs of the graph, not constants of it. Compiling therefore costs one layer's graph per
batch size (not one per layer), and a new decoder of a batch size already seen compiles nothing.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

from decoding.decode import LayerCache, chunk_update, restart_chunk_sums
from model.lm import Block, BlockCall
from model.ttt_layer import TTTMixer


@functools.cache
def compiled(function: Callable, backend: str) -> Callable:
    """`function` through torch.compile: one graph (a break would split the fusion), static shapes (a
    decoder's shapes never change; each batch size gets its own specialised graph)."""
    return torch.compile(function, fullgraph=True, dynamic=False, backend=backend)


def block_step(backend: Optional[str]) -> BlockCall:
    """How a decoder runs each block: its plain forward (None), or that forward compiled by `backend`.

    Never the module call itself: a trainer's compiled block (`Module.compile`) was traced with the
    training strategies, and its guards would recompile it for every decoder."""
    return Block.forward if backend is None else compiled(Block.forward, backend)


def layer_chunk_update(mixer: TTTMixer, cache: LayerCache, completes: torch.Tensor) -> None:
    """Apply the layer's chunk update to the rows whose last token completed a chunk (`completes` [B]
    bool), and restart their running sums; other rows keep their weights and sums bit for bit.

    The update (`decoding.decode.chunk_update`, from the running sums alone) is computed for every row
    and kept only where the flag is set, so its shapes never depend on which rows complete. A weight
    the update carries over (a frozen one) is the same tensor and is not copied."""
    updated = chunk_update(mixer.scan_weights(), cache)
    rows = completes[:, None, None, None]
    for name, current in cache.fast_weights.named_tensors():
        if getattr(updated, name) is not current:
            current.copy_(torch.where(rows, getattr(updated, name), current))
    restart_chunk_sums(cache, completes)


def chunk_update_step(backend: Optional[str]) -> Callable[[TTTMixer, LayerCache, torch.Tensor], None]:
    return layer_chunk_update if backend is None else compiled(layer_chunk_update, backend)
