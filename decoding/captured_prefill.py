"""A prefill replayed from a CUDA graph, one graph per prompt shape: no Python between its kernels.

A short prompt's prefill is bound by the host, not the GPU: at 4K tokens the 125M model's prefill
launches about a thousand kernels (a dozen compiled blocks, each with its scan and window kernels,
guards and Python around them) whose device time is a quarter of the wall time. Replaying the whole
prefill as one recorded graph leaves only the kernels. A serving loop that buckets its prompts by
length keeps one `CapturedPrefill` per bucket; the transformer's prefill captures the same way, so a
benchmark can compare the two without the host in either.

The graph records the kernels on fixed buffers: a call copies the prompt into the graph's input, replays,
and returns a copy of what the prefill returned (the logits and the decoding state), since the next
replay overwrites the graph's own outputs. Nothing the prefill computes may depend on a value read
back from the device (a capture fails loudly where it would).
"""

from __future__ import annotations

import copy
from typing import Callable, Generic, TypeVar

import torch

from decoding.graphs import warm_up

Result = TypeVar("Result")


class CapturedPrefill(Generic[Result]):
    """`prefill(input_ids [B, P]) -> Result` captured for prompts of `example`'s shape (a CUDA tensor of
    token ids). The warm-up runs (`decoding.graphs.warm_up`) compile and autotune what the prefill
    runs; calls after the capture replay it. Gradients are never recorded."""

    @torch.no_grad()
    def __init__(self, prefill: Callable[[torch.Tensor], Result], example: torch.Tensor) -> None:
        if not example.is_cuda:
            raise ValueError(f"a captured prefill needs the prompt on a CUDA device, not {example.device}")
        self.input_ids = example.clone()
        warm_up(lambda: prefill(self.input_ids))
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = prefill(self.input_ids)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> Result:
        """The prefill of `input_ids` (the captured shape), in tensors of the caller's own (a deep copy
        of the graph's outputs: tensors that were views of one storage stay views of one copy)."""
        if input_ids.shape != self.input_ids.shape:
            raise ValueError(f"this prefill was captured for prompts of shape {tuple(self.input_ids.shape)}, "
                             f"not {tuple(input_ids.shape)}: capture one per prompt shape")
        self.input_ids.copy_(input_ids)
        self.graph.replay()
        return copy.deepcopy(self.outputs)
