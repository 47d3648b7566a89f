"""Proof 1: LaCT's hand-derived chunk update is gradient descent on the inner loss -<f(k), v>."""

from __future__ import annotations

import pytest
import torch

from kernels.fast_weights import ChunkGradients, FastWeights
from kernels.lact import chunk_gradients, lact_chunk_gradients
from verification.proof import inner_loss, make_layer_inputs, relative_error

# float64 throughout: the manual and the autograd gradient are the same formula evaluated in a
# different order, so they agree to a few ulps (~1e-16); 1e-12 leaves room for long sums.
TOLERANCE = 1e-12


@pytest.mark.parametrize("batch,seq_len,heads,d,dh", [(1, 8, 1, 4, 4), (2, 13, 2, 6, 10), (2, 32, 3, 8, 5)])
def test_manual_update_equals_autograd_gradient(batch, seq_len, heads, d, dh):
    x = make_layer_inputs(batch, seq_len, heads, d, dh, chunk=seq_len)
    weights = [w.clone().requires_grad_(True) for w in (x.weights.w0, x.weights.w1, x.weights.w2)]
    manual = lact_chunk_gradients(x.k, x.v, x.eta0, x.eta1, x.eta2, FastWeights(*weights))
    for which, expected_name in enumerate(("g0", "g1", "g2")):
        loss = inner_loss(x.k, x.v, (x.eta0, x.eta1, x.eta2)[which], *weights)
        autograd = torch.autograd.grad(loss, weights[which])[0]
        assert relative_error(getattr(manual, expected_name), autograd) < TOLERANCE, expected_name


def test_descent_step_lowers_the_inner_loss():
    """A small step along -gradient must lower sum_t eta_t l_t: the sign convention is descent."""
    x = make_layer_inputs(2, 16, 2, 6, 6, chunk=16)
    w = x.weights
    grads = lact_chunk_gradients(x.k, x.v, x.eta0, x.eta1, x.eta2, w)
    before = inner_loss(x.k, x.v, x.eta1, w.w0, w.w1, w.w2)
    after = inner_loss(x.k, x.v, x.eta1, w.w0, w.w1 - 1e-3 * grads.g1, w.w2)
    assert after < before


@pytest.mark.parametrize("fast_weights", ["all", "w1"])
def test_a_chunk_gradient_is_the_sum_of_its_tokens_gradients(fast_weights: str):
    """At the weights entering the chunk, the gradient splits into per-token terms: decoding sums them
    as the tokens arrive and applies the chunk's step from that sum. Float64, same terms summed in a
    different order, hence the same 1e-12."""
    x = make_layer_inputs(2, 13, 2, 6, 10, chunk=13)
    per_token = (x.k, x.v, x.eta0, x.eta1, x.eta2)
    whole = chunk_gradients(*per_token, x.weights, fast_weights)
    running = ChunkGradients(**{name: torch.zeros_like(g) for name, g in whole.named_tensors()})
    for t in range(13):
        running.add_(chunk_gradients(*(u[:, t : t + 1] for u in per_token), x.weights, fast_weights))
    assert [name for name, _ in running.named_tensors()] == (["g0", "g1", "g2"] if fast_weights == "all" else ["g1"])
    for (name, total), (_, expected) in zip(running.named_tensors(), whole.named_tensors()):
        assert relative_error(total, expected) < TOLERANCE, name
