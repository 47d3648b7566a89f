"""The Triton chunk kernels on a GPU, bf16 operands, against the float64 reference on the same GPU.

Tolerance 1e-2 relative (Frobenius): bf16 operands carry 2^-9 relative rounding each; the kernels
round eta*v and the stored chunk states to bf16 before the tensor-core products and accumulate in
fp32, which lands near 3e-3 at these sizes; an indexing or formula error is O(1).
"""

import pytest
import torch

from kernels import chunk, features
from kernels.lact import ScanOptions, num_chunks, swiglu_features
from kernels.reference import ttt_la_parallel_reference
from kernels.ttt_la import chunk_ttt_la

pytestmark = pytest.mark.gpu
BF16_TOL = 1e-2

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def rel_err(ref, got):
    assert torch.isfinite(got).all()
    return ((ref.double() - got.double()).norm() / ref.double().norm()).item()


def random_layer_inputs(B, T, H, d, dh, C, momentum, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    randn = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    inputs = dict(
        hq=(randn(B, T, H, dh) * dh**-0.5).bfloat16(),
        hk=(randn(B, T, H, dh) * dh**-0.5).bfloat16(),
        v=randn(B, T, H, d).bfloat16(),
        eta1=(torch.rand(B, T, H, device="cuda", generator=g) * 0.1 + 0.01).bfloat16(),
        initial_state=randn(B, H, d, dh) * 0.1,
    )
    if momentum:
        inputs["beta"] = torch.rand(B, num_chunks(T, C), H, device="cuda", generator=g) * 0.5 + 0.4
        inputs["initial_momentum"] = randn(B, H, d, dh) * 0.1
    return inputs


def check_bf16_against_float64(inputs, C, token_causal, update_sign=1.0):
    names = ("hq", "hk", "v", "eta1", "initial_state")
    extra = ("beta", "initial_momentum")
    kernel_in = {k: x.clone().requires_grad_() for k, x in inputs.items()}
    ref_in = {k: x.double().requires_grad_() for k, x in inputs.items()}
    options = ScanOptions(C, token_causal=token_causal, update_sign=update_sign)
    got = chunk_ttt_la(*[kernel_in[k] for k in names], options, **{k: kernel_in[k] for k in extra if k in inputs})
    ref = ttt_la_parallel_reference(*[ref_in[k] for k in names], options, **{k: ref_in[k] for k in extra if k in inputs})
    cot = [torch.randn_like(r) if r is not None else None for r in ref]
    for label, r, o in zip(("o", "final_state", "final_momentum"), ref, got):
        if r is not None:
            assert rel_err(r, o) < BF16_TOL, label
    sum((r * c).sum() for r, c in zip(ref, cot) if r is not None).backward()
    sum((o.float() * c.float()).sum() for o, c in zip(got, cot) if o is not None).backward()
    for k in inputs:
        assert rel_err(ref_in[k].grad, kernel_in[k].grad) < BF16_TOL, f"grad of {k}"


@requires_cuda
@pytest.mark.parametrize("H, d, dh", [(4, 384, 768), (4, 512, 512), (8, 128, 128)])
@pytest.mark.parametrize("token_causal, momentum", [(False, False), (True, True)])
def test_bf16_layer_shapes(H, d, dh, token_causal, momentum):
    C = 2048 if d > 128 else 64
    inputs = random_layer_inputs(2, 4096 + 100, H, d, dh, C, momentum, seed=d + token_causal)
    check_bf16_against_float64(inputs, C, token_causal, update_sign=-1.0 if momentum else 1.0)


@requires_cuda
@pytest.mark.parametrize("C, fused_scan", [(128, True), (64, False), (2048, True)])
def test_bf16_scan_paths(C, fused_scan, monkeypatch):
    """The update formed inside the scan (several sub-blocks per chunk at C = 128, 32 at C = 2048) and
    the stored chunk updates at the core shape, with momentum."""
    monkeypatch.setattr(chunk, "FUSED_SCAN_MAX_CHUNK", 1 << 30 if fused_scan else 0)
    inputs = random_layer_inputs(2, 4096 + 100, 8, 128, 128, C, momentum=True, seed=C)
    check_bf16_against_float64(inputs, C, token_causal=True, update_sign=-1.0)


@requires_cuda
@pytest.mark.parametrize("save_projections", [False, True])
@pytest.mark.parametrize("H, d, dh", [(4, 384, 768), (4, 512, 512), (3, 80, 48)])
def test_bf16_fused_features(H, d, dh, save_projections, monkeypatch):
    monkeypatch.setattr(features, "SAVE_PROJECTIONS", save_projections)
    g = torch.Generator(device="cuda").manual_seed(d)
    x = torch.randn(2, 4096 + 100, H, d, device="cuda", generator=g).bfloat16()
    w0, w2 = ((torch.randn(H, dh, d, device="cuda", generator=g) * d**-0.5).bfloat16() for _ in range(2))
    kernel_in = [t.clone().requires_grad_() for t in (x, w0, w2)]
    ref_in = [t.double().requires_grad_() for t in (x, w0, w2)]
    got = features.swiglu_features(*kernel_in)
    ref = swiglu_features(*ref_in)
    assert got.dtype == torch.bfloat16 and rel_err(ref, got) < BF16_TOL
    cot = torch.randn_like(ref)
    (ref * cot).sum().backward()
    (got.float() * cot.float()).sum().backward()
    for name, r, k in zip(("x", "w0", "w2"), ref_in, kernel_in):
        assert rel_err(r.grad, k.grad) < BF16_TOL, f"grad of {name}"


@requires_cuda
def test_bf16_long_sequence_65536():
    inputs = random_layer_inputs(1, 65536, 4, 384, 768, 2048, momentum=True, seed=1)
    check_bf16_against_float64(inputs, 2048, token_causal=True)



@requires_cuda
@pytest.mark.parametrize("H, d, dh, token_causal", [(4, 192, 192, True), (3, 80, 48, False)])
def test_bf16_feature_scan_equals_the_two_ops(H, d, dh, token_causal):
    """`kernels.feature_scan` (features recomputed in the backward) runs the same kernels as the two
    public ops, so on the device too its outputs and gradients equal theirs bit for bit."""
    from kernels.feature_scan import feature_chunk_scan

    g = torch.Generator(device="cuda").manual_seed(d)
    B, T, C = 2, 4096 + 77, 512
    leaves = dict(
        q=torch.randn(B, T, H, d, device="cuda", generator=g).bfloat16(),
        k=torch.randn(B, T, H, d, device="cuda", generator=g).bfloat16(),
        w0=(torch.randn(H, dh, d, device="cuda", generator=g) * d**-0.5).bfloat16(),
        w2=(torch.randn(H, dh, d, device="cuda", generator=g) * d**-0.5).bfloat16(),
        v=torch.randn(B, T, H, d, device="cuda", generator=g).bfloat16(),
        eta1=(torch.rand(B, T, H, device="cuda", generator=g) * 0.1).bfloat16(),
        initial_state=torch.randn(B, H, d, dh, device="cuda", generator=g) * 0.1,
        beta=torch.rand(B, num_chunks(T, C), H, device="cuda", generator=g) * 0.5 + 0.4,
    )
    options = ScanOptions(C, token_causal=token_causal)
    results = []
    for fused in (False, True):
        x = {name: t.clone().requires_grad_() for name, t in leaves.items()}
        if fused:
            out = feature_chunk_scan(x["q"], x["k"], x["w0"], x["w2"], x["v"], x["eta1"], x["initial_state"], options,
                                     beta=x["beta"])  # fmt: skip
        else:
            hq, hk = (features.swiglu_features(x[n], x["w0"], x["w2"]) for n in ("q", "k"))
            out = chunk_ttt_la(hq, hk, x["v"], x["eta1"], x["initial_state"], options, beta=x["beta"])
        cot = torch.randn(out[0].shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(5))
        ((out[0].float() * cot).sum() + out[1].square().sum()).backward()
        results.append([out[0], out[1], *(x[name].grad for name in leaves)])
    for name, a, b in zip(("o", "final", *leaves), *results):
        assert torch.equal(a, b), name
