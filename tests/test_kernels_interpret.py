"""The Triton chunk kernels, run by Triton's CPU interpreter on tiny shapes, against the float64 reference.

Tolerance: the kernels compute in fp32 (exact fp32 dots under the interpreter) from the same inputs
rounded to fp32, over at most a few hundred accumulated terms, so their relative error to float64 is
a few 1e-7; 1e-5 leaves room for the longer scans and still fails any indexing or formula error.
"""

import os

import pytest
import torch

import kernels.chunk
import kernels.features
import kernels.triton_utils
from kernels.lact import ScanOptions, num_chunks, swiglu_features
from kernels.reference import ttt_la_parallel_reference
from kernels.ttt_la import chunk_ttt_la

# The kernels must have been imported in interpreter mode: tests/conftest.py sets TRITON_INTERPRET on a
# host without CUDA before any kernel module is imported. Reloading the kernel modules here instead
# would re-register their torch.library ops and free the old registrations, which other test modules
# still hold (a use-after-free that crashes the process at random).
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the Triton kernels run on CPU only under TRITON_INTERPRET=1")  # fmt: skip

REL_TOL = 1e-5


@pytest.fixture(autouse=True)
def force_triton(monkeypatch):
    """Dispatch to the Triton kernels on CPU for this module's tests only (other modules test the reference path)."""
    monkeypatch.setenv("TTTLA_KERNELS", "triton")


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer a kernel writes starts as NaN: an element the kernel misses fails the comparison."""
    monkeypatch.setattr(kernels.triton_utils, "poison_outputs", True)


@pytest.fixture(params=["fused", "stored"])
def scan_path(request, monkeypatch):
    """Both ways to the chunk states: the update formed inside the scan (small chunks) and the
    chunk updates stored by chunk_outer first (large chunks)."""
    if request.param == "stored":
        monkeypatch.setattr(kernels.chunk, "FUSED_SCAN_MAX_CHUNK", 0)
    return request.param


def rel_err(ref: torch.Tensor, got: torch.Tensor) -> float:
    assert torch.isfinite(got).all(), "non-finite values: an output element was never written"
    return ((ref - got.double()).norm() / ref.norm()).item()


def make_inputs(generator, batch, seq_len, heads, d, dh, chunk_size, momentum, cu_seqlens=None):
    """Random float64 inputs (never zero) for the layer; with cu_seqlens, one state per document."""
    randn = lambda *s: torch.randn(*s, dtype=torch.float64, generator=generator)  # noqa: E731
    if cu_seqlens is None:
        states, chunks = batch, num_chunks(seq_len, chunk_size)
    else:
        bounds = cu_seqlens.tolist()
        states = len(bounds) - 1
        chunks = sum(num_chunks(e - s, chunk_size) for s, e in zip(bounds[:-1], bounds[1:]))
    inputs = dict(
        hq=randn(batch, seq_len, heads, dh) * 0.5,
        hk=randn(batch, seq_len, heads, dh) * 0.5,
        v=randn(batch, seq_len, heads, d),
        eta1=torch.rand(batch, seq_len, heads, dtype=torch.float64, generator=generator) + 0.1,
        initial_state=randn(states, heads, d, dh),
    )
    if momentum:
        inputs["beta"] = torch.rand(batch, chunks, heads, dtype=torch.float64, generator=generator) * 0.5 + 0.4
        inputs["initial_momentum"] = randn(states, heads, d, dh)
    return inputs


def check_against_reference(inputs, chunk_size, token_causal=False, update_sign=1.0, cu_seqlens=None, seed=0):
    """Forward outputs and every input gradient, for a random cotangent on every output."""
    generator = torch.Generator().manual_seed(seed + 1)
    ref_inputs = {k: x.clone().requires_grad_() for k, x in inputs.items()}
    kernel_inputs = {k: x.float().requires_grad_() for k, x in inputs.items()}
    options = ScanOptions(chunk_size, token_causal=token_causal, update_sign=update_sign)
    names = ("hq", "hk", "v", "eta1", "initial_state")
    extra = lambda xs: {k: xs[k] for k in ("beta", "initial_momentum") if k in xs}  # noqa: E731
    ref = ttt_la_parallel_reference(*[ref_inputs[k] for k in names], options, **extra(ref_inputs), cu_seqlens=cu_seqlens)
    got = chunk_ttt_la(*[kernel_inputs[k] for k in names], options, **extra(kernel_inputs), cu_seqlens=cu_seqlens)
    cotangents = [torch.randn(r.shape, dtype=torch.float64, generator=generator) if r is not None else None
                  for r in ref]
    for label, r, g in zip(("o", "final_state", "final_momentum"), ref, got):
        assert (r is None) == (g is None), label
        if r is not None:
            assert rel_err(r, g) < REL_TOL, label
    sum(((r * c).sum() for r, c in zip(ref, cotangents) if r is not None)).backward()
    sum(((g * c.float()).sum() for g, c in zip(got, cotangents) if g is not None)).backward()
    for name in inputs:
        assert rel_err(ref_inputs[name].grad, kernel_inputs[name].grad) < REL_TOL, f"grad of {name}"


@pytest.mark.parametrize("d, dh", [(16, 32), (32, 16)])
@pytest.mark.parametrize("token_causal", [False, True])
def test_block_causal_matches_reference(d, dh, token_causal):
    seed = 10 * d + dh + token_causal
    generator = torch.Generator().manual_seed(seed)
    inputs = make_inputs(generator, batch=2, seq_len=72, heads=2, d=d, dh=dh, chunk_size=32, momentum=False)
    check_against_reference(inputs, chunk_size=32, token_causal=token_causal, seed=seed)


@pytest.mark.parametrize("token_causal", [False, True])
def test_momentum_matches_reference(token_causal, scan_path):
    generator = torch.Generator().manual_seed(3 + token_causal)
    inputs = make_inputs(generator, batch=2, seq_len=56, heads=2, d=16, dh=32, chunk_size=16, momentum=True)
    check_against_reference(inputs, chunk_size=16, token_causal=token_causal, seed=3)


def test_update_sign_minus_one_with_momentum(scan_path):
    generator = torch.Generator().manual_seed(5)
    inputs = make_inputs(generator, batch=1, seq_len=80, heads=2, d=32, dh=32, chunk_size=32, momentum=True)
    check_against_reference(inputs, chunk_size=32, token_causal=True, update_sign=-1.0, seed=5)


def test_chunk_larger_than_sub_block_and_sequence(scan_path):
    """C = 80 > the kernels' 64-token sub-block; T = 50 < C: one short chunk split in sub-blocks."""
    generator = torch.Generator().manual_seed(6)
    inputs = make_inputs(generator, batch=1, seq_len=50, heads=1, d=16, dh=16, chunk_size=80, momentum=False)
    check_against_reference(inputs, chunk_size=80, token_causal=True, seed=6)
    generator = torch.Generator().manual_seed(7)
    inputs = make_inputs(generator, batch=1, seq_len=80, heads=1, d=16, dh=16, chunk_size=80, momentum=False)
    check_against_reference(inputs, chunk_size=80, token_causal=True, seed=7)


@pytest.mark.parametrize("momentum", [False, True])
def test_varlen_resets_state_at_document_starts(momentum, scan_path):
    generator = torch.Generator().manual_seed(8 + momentum)
    cu_seqlens = torch.tensor([0, 21, 24, 60, 77])
    inputs = make_inputs(generator, batch=1, seq_len=77, heads=2, d=16, dh=32, chunk_size=16, momentum=momentum,
                         cu_seqlens=cu_seqlens)
    check_against_reference(inputs, chunk_size=16, token_causal=True, cu_seqlens=cu_seqlens, seed=8)


def test_without_initial_state():
    generator = torch.Generator().manual_seed(9)
    inputs = make_inputs(generator, batch=1, seq_len=40, heads=1, d=16, dh=16, chunk_size=16, momentum=False)
    initial = inputs.pop("initial_state")
    hq = inputs["hq"].float()
    o, final, _ = chunk_ttt_la(hq, inputs["hk"].float(), inputs["v"].float(), inputs["eta1"].float(), None, ScanOptions(16))
    ref, ref_final, _ = ttt_la_parallel_reference(*inputs.values(), torch.zeros_like(initial), ScanOptions(16))
    assert rel_err(ref, o) < REL_TOL and rel_err(ref_final, final) < REL_TOL


def test_unsupported_head_dim_is_a_clear_error():
    x = torch.randn(1, 8, 1, 24)
    with pytest.raises(ValueError, match="dh .*=24 is not supported"):
        chunk_ttt_la(x, x, torch.randn(1, 8, 1, 16), torch.rand(1, 8, 1), torch.zeros(1, 1, 16, 24), ScanOptions(4))


def test_unsupported_dtype_is_a_clear_error():
    x = torch.randn(1, 8, 1, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="Triton kernel takes"):
        chunk_ttt_la(x, x, x, torch.rand(1, 8, 1), torch.zeros(1, 1, 16, 16), ScanOptions(4))


def test_block_causal_with_stored_updates(monkeypatch):
    monkeypatch.setattr(kernels.chunk, "FUSED_SCAN_MAX_CHUNK", 0)
    generator = torch.Generator().manual_seed(12)
    inputs = make_inputs(generator, batch=2, seq_len=72, heads=2, d=32, dh=16, chunk_size=32, momentum=False)
    check_against_reference(inputs, chunk_size=32, seed=12)


# ----------------------------------------------------------------------------------------------
# the fused SwiGLU feature kernels (kernels.features) against the float64 reference


@pytest.mark.parametrize("save_projections", [False, True])
@pytest.mark.parametrize("batch, seq_len, heads, d, dh", [(2, 37, 2, 16, 48), (1, 150, 3, 48, 16)])
def test_fused_features_match_reference(batch, seq_len, heads, d, dh, save_projections, monkeypatch):
    """Odd token counts (37, 150: partial token tiles), dh not a power of two (48: a partial feature
    tile), and enough tokens (150 > the 128-token tile) that the weight gradient sums several tiles."""
    monkeypatch.setattr(kernels.features, "SAVE_PROJECTIONS", save_projections)
    generator = torch.Generator().manual_seed(seq_len + save_projections)
    randn = lambda *s: torch.randn(*s, dtype=torch.float64, generator=generator)  # noqa: E731
    x, w0, w2 = randn(batch, seq_len, heads, d), randn(heads, dh, d) * d**-0.5, randn(heads, dh, d) * d**-0.5
    cotangent = randn(batch, seq_len, heads, dh)
    ref_inputs = [t.clone().requires_grad_() for t in (x, w0, w2)]
    kernel_inputs = [t.float().requires_grad_() for t in (x, w0, w2)]
    ref = swiglu_features(*ref_inputs)
    got = kernels.features.swiglu_features(*kernel_inputs)
    assert got.shape == ref.shape and got.is_contiguous()
    assert rel_err(ref, got) < REL_TOL
    (ref * cotangent).sum().backward()
    (got * cotangent.float()).sum().backward()
    for name, r, g in zip(("x", "w0", "w2"), ref_inputs, kernel_inputs):
        assert rel_err(r.grad, g.grad) < REL_TOL, f"grad of {name}"


def test_fused_features_weight_gradient_split_over_tokens(monkeypatch):
    """Few programs per split: the token axis is cut into several fp32 partial sums."""
    monkeypatch.setattr(kernels.features, "WEIGHT_GRAD_PROGRAMS", 64)
    generator = torch.Generator().manual_seed(13)
    x = torch.randn(1, 2100, 1, 16, dtype=torch.float64, generator=generator)
    w0, w2 = (torch.randn(1, 16, 16, dtype=torch.float64, generator=generator) * 0.25 for _ in range(2))
    ref_inputs = [t.clone().requires_grad_() for t in (x, w0, w2)]
    kernel_inputs = [t.float().requires_grad_() for t in (x, w0, w2)]
    swiglu_features(*ref_inputs).sum().backward()
    kernels.features.swiglu_features(*kernel_inputs).sum().backward()
    for name, r, g in zip(("x", "w0", "w2"), ref_inputs, kernel_inputs):
        assert rel_err(r.grad, g.grad) < REL_TOL, f"grad of {name}"


def test_fused_features_feed_the_chunk_kernels():
    """Features and chunk kernels end to end (the layer op), gradients to x and the weights."""
    generator = torch.Generator().manual_seed(14)
    randn = lambda *s: torch.randn(*s, dtype=torch.float64, generator=generator)  # noqa: E731
    B, T, H, d, dh, C = 1, 40, 2, 16, 32, 16
    xq, xk, v = randn(B, T, H, d), randn(B, T, H, d), randn(B, T, H, d)
    w0, w2 = randn(H, dh, d) * 0.25, randn(H, dh, d) * 0.25
    eta = torch.rand(B, T, H, dtype=torch.float64, generator=generator)
    state = randn(B, H, d, dh)

    def layer(features, scan, inputs):
        xq_, xk_, v_, w0_, w2_, eta_, state_ = inputs
        return scan(features(xq_, w0_, w2_), features(xk_, w0_, w2_), v_, eta_, state_, ScanOptions(C, token_causal=True))[0]

    ref_inputs = [t.clone().requires_grad_() for t in (xq, xk, v, w0, w2, eta, state)]
    kernel_inputs = [t.float().requires_grad_() for t in (xq, xk, v, w0, w2, eta, state)]
    ref = layer(swiglu_features, ttt_la_parallel_reference, ref_inputs)
    got = layer(kernels.features.swiglu_features, chunk_ttt_la, kernel_inputs)
    assert rel_err(ref, got) < REL_TOL
    ref.sum().backward()
    got.sum().backward()
    for i, (r, g) in enumerate(zip(ref_inputs, kernel_inputs)):
        assert rel_err(r.grad, g.grad) < REL_TOL, f"grad of input {i}"


def test_features_wrong_weight_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="w0, w2 \\[H, dh, d\\]"):
        kernels.features.swiglu_features(torch.randn(1, 4, 2, 16), torch.randn(3, 8, 16), torch.randn(3, 8, 16))



@pytest.mark.parametrize("batch, seq_len, heads, dx, dy, chunk_size", [(3, 40, 2, 24, 40, 16), (2, 33, 1, 16, 16, 33),
                                                                       (1, 70, 3, 40, 24, 32)])
def test_chunk_updates_alone_equal_the_float64_sums(batch, seq_len, heads, dx, dy, chunk_size, monkeypatch):
    """`chunk_updates` (a pending decoder's chunk gradient): every chunk of every row, the last one
    partial where C does not divide T, against float64 sums, through the kernel and the torch form."""
    from kernels.ttt_la import chunk_updates

    generator = torch.Generator().manual_seed(seq_len + dx)
    x, y = (torch.randn(batch, seq_len, heads, n, dtype=torch.float64, generator=generator) for n in (dx, dy))
    eta = torch.rand(batch, seq_len, heads, dtype=torch.float64, generator=generator)
    starts = range(0, seq_len, chunk_size)
    expected = torch.stack([torch.einsum("bth,bthx,bthy->bhxy", eta[:, s:s + chunk_size], x[:, s:s + chunk_size],
                                         y[:, s:s + chunk_size]) for s in starts], dim=1)  # fmt: skip
    got = chunk_updates(x.float(), y.float(), eta.float(), chunk_size)
    assert got.dtype == torch.float32 and got.shape == (batch, len(starts), heads, dx, dy)
    assert rel_err(expected, got) < REL_TOL
    monkeypatch.setenv("TTTLA_KERNELS", "reference")
    assert rel_err(expected, chunk_updates(x.float(), y.float(), eta.float(), chunk_size)) < REL_TOL
    assert rel_err(expected, chunk_updates(x, y, eta, chunk_size)) < 1e-12
