"""The recurrent LaCT form across ranks: a serial ring that hands the fast weights on, layer by layer.

Weight norm renormalises the running weights and W0/W2 updates make the features depend on them,
so the state entering a slice is not a linear function of anything the slice can compute alone.
Rank r therefore waits for rank r-1's final FastWeights of a layer, runs the layer on its slice,
and sends its own final FastWeights to rank r+1; the backward runs the other way (the gradient of
the received state goes back to its sender). Across a stack of layers this is a wavefront: rank r
works on layer i while rank r-1 works on layer i+1, so a model of L layers takes (L + sp - 1)
layer-times instead of L, but one layer is fully serial. Both messages are all fast weights and
momenta: up to 6 x [B, H, d, dh] values per layer, each way.
"""

from __future__ import annotations

import torch

from kernels.fast_weights import FastWeights
from parallel.groups import ParallelDims
from parallel.p2p import shift_rows


def _template(initial: FastWeights, momentum: bool) -> FastWeights:
    """The shapes a layer's state has after a slice: the weights, and the three momenta when momentum is on."""
    if not momentum:
        return initial
    return FastWeights(initial.w0, initial.w1, initial.w2, initial.w0, initial.w1, initial.w2)


def receive_state(anchor: torch.Tensor, initial: FastWeights, momentum: bool, dims: ParallelDims) -> FastWeights:
    """The FastWeights rank r-1 leaves a layer with (call on ranks r > 0).

    `anchor` is any tensor of the graph that needs gradients (the layer input): an empty slice of it
    carries the receive into the autograd graph, so its backward sends the state's gradient home.
    Zero times this rank's own initial weights is added, so that its W0/W1/W2 parameters still get a
    (zero) gradient: data-parallel reducers expect the same set of gradients on every rank.
    """
    template = _template(initial, momentum)
    own = template.flatten()
    nothing = anchor.reshape(-1)[:0].to(own.dtype).reshape(1, 0, own.numel())
    flat = shift_rows(nothing, 1, +1, dims).reshape(-1)
    return template.unflatten(flat + 0.0 * own)


def send_state(output: torch.Tensor, final: FastWeights, dims: ParallelDims) -> torch.Tensor:
    """Send this rank's final FastWeights of a layer to rank r+1 (call on ranks r < sp - 1).

    Returns `output` unchanged in value; adding the (empty) result of the send ties the send into
    the graph, so its backward receives the state's gradient from rank r+1.
    """
    flat = final.flatten()
    nothing = shift_rows(flat.reshape(1, 1, -1), 0, +1, dims)
    return output + nothing.sum().to(output.dtype)


def state_bytes(initial: FastWeights, momentum: bool) -> int:
    """Bytes one ring message carries per layer (all fast weights and momenta of the batch)."""
    return sum(t.numel() * t.element_size() for t in _template(initial, momentum).tensors())


