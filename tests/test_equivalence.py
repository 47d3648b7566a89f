"""Proofs 2 and 3: the recurrent LaCT layer, its parallel chunk scan and its unrolled linear-attention rewrite agree.

All in float64 on fresh random inputs. The forms compute the same function with sums in a different
order, so they agree to ~1e-15; the stated tolerance 1e-10 leaves five orders of margin for the
Newton-Schulz iterations (whose polynomial amplifies rounding) while still catching any real
difference (a missing term or a wrong sign shows up as an O(1) error).
"""

from __future__ import annotations

import pytest
import torch

from kernels.fast_weights import FastWeights
from kernels.lact import RecurrentTrace, ScanOptions, lact_recurrent, newton_schulz5, newton_schulz5_many, swiglu_features
from kernels.reference import ttt_la_parallel_reference
from verification.proof import make_layer_inputs, relative_error
from verification.unrolled import newton_schulz5_factor, unrolled_lact_output

TOLERANCE = 1e-10

# (batch, seq_len, heads, d, dh, chunk): T a multiple of C, T not a multiple of C, one chunk only, d > dh.
SIZES = [(2, 32, 2, 6, 8, 8), (2, 37, 2, 6, 8, 8), (1, 5, 1, 4, 4, 8), (2, 29, 3, 10, 6, 7)]


def recurrent_w1_only(x, chunk, beta, muon, sign):
    """The recurrent form with W0/W2 frozen and no weight norm: the case the parallel form claims."""
    out, final = lact_recurrent(
        x.q, x.k, x.v, x.eta0, x.eta1, x.eta2, FastWeights(x.weights.w0, x.weights.w1, x.weights.w2), chunk,
        beta=beta, muon=muon, fast_weights="w1", update_sign=sign,
    )  # fmt: skip
    return out, final.w1


def parallel_form(x, chunk, beta, muon, sign):
    hq = swiglu_features(x.q, x.weights.w0, x.weights.w2)
    hk = swiglu_features(x.k, x.weights.w0, x.weights.w2)
    out, final, _ = ttt_la_parallel_reference(
        hq, hk, x.v, x.eta1, x.weights.w1, ScanOptions(chunk, muon, update_sign=sign), beta=beta
    )
    return out, final


@pytest.mark.parametrize("batch,seq_len,heads,d,dh,chunk", SIZES)
@pytest.mark.parametrize("momentum", [False, True])
@pytest.mark.parametrize("muon", [False, True])
def test_recurrent_w1_only_equals_parallel_outputs_and_gradients(batch, seq_len, heads, d, dh, chunk, momentum, muon):
    x = make_layer_inputs(batch, seq_len, heads, d, dh, chunk)
    inputs = [t.requires_grad_(True) for t in x.tensors()]
    beta = x.beta if momentum else None
    out_r, final_r = recurrent_w1_only(x, chunk, beta, muon, 1.0)
    out_p, final_p = parallel_form(x, chunk, beta, muon, 1.0)
    assert relative_error(out_p, out_r) < TOLERANCE
    assert relative_error(final_p, final_r) < TOLERANCE
    probe = torch.randn_like(out_r)  # a random cotangent exercises every gradient path
    grads_r = torch.autograd.grad((out_r * probe).sum() + final_r.sum(), inputs, allow_unused=True)
    grads_p = torch.autograd.grad((out_p * probe).sum() + final_p.sum(), inputs, allow_unused=True)
    names = ["q", "k", "v", "eta0", "eta1", "eta2", "beta", "w0", "w1", "w2"]
    for name, g_r, g_p in zip(names, grads_r, grads_p):
        if g_r is None:  # eta0/eta2 never matter when W0/W2 are frozen; beta only with momentum
            assert g_p is None or g_p.abs().max() == 0, name
            continue
        assert relative_error(g_p, g_r) < TOLERANCE, name


@pytest.mark.parametrize("batch,seq_len,heads,d,dh,chunk", SIZES)
@pytest.mark.parametrize("fast_weights", ["all", "w1"])
@pytest.mark.parametrize("momentum,muon,weight_norm", [(False, False, False), (True, False, True), (True, True, True), (False, True, False)])
def test_general_recurrent_equals_unrolled_linear_attention(batch, seq_len, heads, d, dh, chunk, fast_weights, momentum, muon, weight_norm):
    x = make_layer_inputs(batch, seq_len, heads, d, dh, chunk)
    beta = x.beta if momentum else None
    trace = RecurrentTrace([], [], [])
    out, _ = lact_recurrent(
        x.q, x.k, x.v, x.eta0, x.eta1, x.eta2, x.weights, chunk, beta=beta, muon=muon,
        weight_norm=weight_norm, fast_weights=fast_weights, trace=trace,
    )  # fmt: skip
    unrolled = unrolled_lact_output(
        x.q, x.k, x.v, x.eta1, x.weights.w1, trace, chunk, beta=beta, muon=muon, weight_norm=weight_norm
    )
    assert relative_error(unrolled, out) < TOLERANCE


@pytest.mark.parametrize("rows,cols", [(4, 9), (9, 4), (6, 6)])
def test_newton_schulz_is_a_matrix_product(rows, cols):
    """NS5(M) = L M (wide) or M R (tall): the fact that lets Muon's update be read as effective keys/values."""
    update = torch.randn(3, rows, cols, dtype=torch.float64)
    side, factor = newton_schulz5_factor(update)
    product = factor @ update if side == "left" else update @ factor
    assert side == ("right" if rows > cols else "left")
    assert relative_error(product, newton_schulz5(update)) < TOLERANCE


@pytest.mark.parametrize("seed", range(4))
def test_newton_schulz_of_many_tensors_at_once_is_each_ones(seed):
    """`newton_schulz5_many` stacks matrices of one wide shape (tall ones transposed) into one batch:
    every tensor still gets its own NS5, checked against the product form L M / M R of each alone.
    Random tensors of wide, tall and square matrices, some of a shared wide shape, leading dims varied."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, 3, 5, 8), (2, 3, 8, 5), (4, 5, 8), (3, 6, 6), (1, 7, 3), (5, 3, 7)]
    order = torch.randperm(len(shapes), generator=g).tolist()
    updates = [torch.randn(*shapes[i], generator=g, dtype=torch.float64) for i in order]
    for update, result in zip(updates, newton_schulz5_many(updates), strict=True):
        side, factor = newton_schulz5_factor(update)
        expected = factor @ update if side == "left" else update @ factor
        assert result.shape == update.shape and relative_error(result, expected) < TOLERANCE


def test_token_causal_parallel_equals_masked_linear_attention():
    """The intra-chunk term makes the scan token-causal: o_t = W1(0) h(q_t) + sum_{s <= t} eta_s (h(q_t).h(k_s)) v_s."""
    x = make_layer_inputs(2, 23, 2, 5, 7, chunk=6)
    hq = swiglu_features(x.q, x.weights.w0, x.weights.w2)
    hk = swiglu_features(x.k, x.weights.w0, x.weights.w2)
    out, _, _ = ttt_la_parallel_reference(hq, hk, x.v, x.eta1, x.weights.w1, ScanOptions(6, token_causal=True))
    scores = torch.einsum("bthe,bshe->bhts", hq, hk).tril()
    expected = torch.einsum("bhde,bthe->bthd", x.weights.w1, hq) + torch.einsum(
        "bhts,bshd->bthd", scores, x.v * x.eta1[..., None]
    )
    assert relative_error(out, expected) < TOLERANCE


class TestGradientAscent:
    """Proof 4: flipping the update's sign (ascent on the inner loss) is a valid layer in every form."""

    def test_ascent_recurrent_equals_parallel(self):
        x = make_layer_inputs(2, 21, 2, 6, 8, chunk=8)
        out_r, final_r = recurrent_w1_only(x, 8, x.beta, False, -1.0)
        out_p, final_p = parallel_form(x, 8, x.beta, False, -1.0)
        assert relative_error(out_p, out_r) < TOLERANCE
        assert relative_error(final_p, final_r) < TOLERANCE

    def test_ascent_is_descent_with_negated_learning_rates(self):
        x = make_layer_inputs(2, 21, 2, 6, 8, chunk=8)
        ascent, _ = parallel_form(x, 8, None, False, -1.0)
        x.eta1 = -x.eta1
        descent_negated, _ = parallel_form(x, 8, None, False, 1.0)
        assert relative_error(ascent, descent_negated) < TOLERANCE

    def test_ascent_changes_the_output(self):
        x = make_layer_inputs(2, 21, 2, 6, 8, chunk=8)
        ascent, _ = parallel_form(x, 8, None, False, -1.0)
        descent, _ = parallel_form(x, 8, None, False, 1.0)
        assert relative_error(ascent, descent) > 1e-3
