"""Decode steps fused by a compiler: each layer's token step, and its chunk update, one compiled graph.

At batch 1 a decode step is launch-bound: a layer runs its norms, projections, RoPE, gates, learning-
rate heads, the running sums and the window's ring write as separate small kernels, each a few
microseconds whatever its size. Compiling a layer's step (`torch.compile`, one graph, static shapes)
fuses that elementwise glue around the matmuls, so a replayed CUDA graph (`decoding.graphs`) holds
several times fewer kernels.

The compiled functions are the plain ones, `Block.forward` under the decoder's strategies and
`chunk_updates`, so eager and compiled steps compute the same thing and the tests compare them.
One token-step graph serves every layer: the layers share their code and shapes, and each layer's
module and cache are inputs of the graph, not constants of it. Compiling therefore costs one layer's
graph per batch size (not one per layer), and a new decoder of a batch size already seen compiles
nothing. The chunk update is one graph for all layers at once, so their Muon products batch together.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

from decoding.decode import LayerCache, chunk_update_inputs, fold_pending, restart_chunk_sums
from kernels.lact import apply_chunk_gradients_many
from model.lm import Block, BlockCall
from model.ttt_layer import TTTMixer


# How many graphs one compiled decode function may hold: one per batch size (and model) a process
# decodes with. They all specialise the one shared code object (`Block.forward`, `chunk_updates`), and
# past Dynamo's default of 8 per code object `fullgraph=True` turns the next batch size into a hard
# failure: an evaluation that generates in batches of whatever size its tasks leave would stop there.
RECOMPILE_LIMIT = 64


@functools.cache
def compiled(function: Callable, backend: str) -> Callable:
    """`function` through torch.compile: one graph (a break would split the fusion), static shapes (a
    decoder's shapes never change; each batch size gets its own specialised graph), up to
    `RECOMPILE_LIMIT` graphs (the limit applies to these calls only)."""
    step = torch.compile(function, fullgraph=True, dynamic=False, backend=backend)

    @functools.wraps(function)
    def run(*args, **kwargs):
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return step(*args, **kwargs)

    return run


def block_step(backend: Optional[str]) -> BlockCall:
    """How a decoder runs each block: its plain forward (None), or that forward compiled by `backend`.

    Never the module call itself: a trainer's compiled block (`Module.compile`) was traced with the
    training strategies, and its guards would recompile it for every decoder."""
    return Block.forward if backend is None else compiled(Block.forward, backend)


def chunk_updates(mixers: list[TTTMixer], caches: list[LayerCache], completes: torch.Tensor, folds: torch.Tensor) -> None:
    """Fold every layer's pending tokens into the running sums of the rows whose last token filled its
    slots (`folds` [B] bool, `decoding.pending`; caches without pending tokens have none), then apply
    every layer's chunk update to the rows whose last token completed a chunk (`completes` [B] bool),
    and restart their running sums; other rows keep their weights and sums bit for bit.

    Each layer's update (`decoding.decode.chunk_update`: its gradient, momentum, Muon, the signed step,
    weight norm) is computed for every row and kept only where the flag is set, so its shapes never
    depend on which rows complete. The layers' updates run together (`apply_chunk_gradients_many`), so
    their Muon iterations are one: run per weight and layer they would be 15 small products each,
    launches of a few microseconds for a few MFLOP. A weight the update carries over (a frozen one)
    is the same tensor and is not copied."""
    for mixer, cache in zip(mixers, caches):
        if cache.pending is not None:
            fold_pending(mixer.scan_weights(), cache, folds)
    chunks = [chunk_update_inputs(mixer.scan_weights(), cache) for mixer, cache in zip(mixers, caches)]
    rows = completes[:, None, None, None]
    for cache, new in zip(caches, apply_chunk_gradients_many(chunks)):
        for name, current in cache.fast_weights.named_tensors():
            if getattr(new, name) is not current:
                current.copy_(torch.where(rows, getattr(new, name), current))
        restart_chunk_sums(cache, completes)


def chunk_update_step(
    backend: Optional[str],
) -> Callable[[list[TTTMixer], list[LayerCache], torch.Tensor, torch.Tensor], None]:
    return chunk_updates if backend is None else compiled(chunk_updates, backend)
