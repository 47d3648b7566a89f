"""The decode token-step kernels (kernels/token_step.py) compiled for the GPU against the float64 torch forms.

125M head shapes (4 heads, d = dh = 192) and one odd shape, bf16 q, k, v as the model gives them and
fp32 state, at batch 1 (the latency step: several programs per head) and 64 (one program per row and
head). Tolerance: fp32 sums of a few hundred bf16-exact products, against float64.
"""

from __future__ import annotations

import pytest
import torch

from kernels.fast_weights import ChunkGradients, FastWeights
from kernels.lact import swiglu_features
from kernels.token_step import (lact_token_step, lact_token_step_reference, w1_token_read, w1_token_read_with_key_features,
                                w1_token_step, w1_token_step_reference)
from verification.proof import relative_error

pytestmark = pytest.mark.gpu
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
FP32_TOLERANCE = 1e-5


@requires_cuda
@pytest.mark.parametrize("batch,heads,d,dh,swiglu", [(1, 4, 192, 192, True), (64, 4, 192, 192, True),
                                                       (3, 2, 72, 136, True), (5, 4, 192, 192, False)])
def test_token_step_kernel_on_the_gpu(batch: int, heads: int, d: int, dh: int, swiglu: bool) -> None:
    g = torch.Generator(device="cuda").manual_seed(batch * 1000 + d)
    dh = dh if swiglu else d
    draw = lambda *shape, scale=1.0: torch.randn(*shape, generator=g, device="cuda") * scale  # noqa: E731
    qkv = draw(batch, 3, heads, d).bfloat16()
    case = dict(q=qkv[:, 0], k=qkv[:, 1], v=qkv[:, 2], eta1=torch.rand(batch, heads, generator=g, device="cuda"),
                w0=draw(heads, dh, d, scale=d**-0.5) if swiglu else None,
                w2=draw(heads, dh, d, scale=d**-0.5) if swiglu else None,
                w1=draw(batch, heads, d, dh, scale=dh**-0.5), update_sign=1.0, token_causal=True)
    g1 = draw(batch, heads, d, dh, scale=0.1)
    expected_g1 = g1.double()
    out = w1_token_step(**case, g1=g1)
    as64 = {name: value.double() if isinstance(value, torch.Tensor) else value for name, value in case.items()}
    expected = w1_token_step_reference(**as64, g1=expected_g1)
    assert relative_error(out.double(), expected) < FP32_TOLERANCE
    assert relative_error(g1.double(), expected_g1) < FP32_TOLERANCE


@requires_cuda
@pytest.mark.parametrize("batch,heads,d,dh,swiglu,bf16_weights", [
    (1, 4, 192, 192, True, False), (64, 4, 192, 192, True, False), (64, 4, 192, 192, True, True),
    (37, 4, 192, 192, True, True), (3, 2, 72, 136, True, False), (19, 2, 72, 136, True, True),
    (5, 4, 192, 192, False, False)])
def test_token_read_kernel_on_the_gpu(batch: int, heads: int, d: int, dh: int, swiglu: bool, bf16_weights: bool) -> None:
    """The read alone (pending tokens, `decoding.pending`) against the float64 step's output, not token-causal;
    `bf16_weights`: W0, W2 in q's dtype, as a bf16 model decodes (its products on the tensor cores; bf16
    products are exact in fp32, so the tolerance is fp32's)."""
    g = torch.Generator(device="cuda").manual_seed(batch * 1000 + d + 2)
    dh = dh if swiglu else d
    draw = lambda *shape, scale=1.0: torch.randn(*shape, generator=g, device="cuda") * scale  # noqa: E731
    q = draw(batch, heads, d).bfloat16()
    weight_dtype = torch.bfloat16 if bf16_weights else torch.float32
    w0, w2 = (draw(heads, dh, d, scale=d**-0.5).to(weight_dtype) if swiglu else None for _ in range(2))
    w1 = draw(batch, heads, d, dh, scale=dh**-0.5)
    out = w1_token_read(q, w0, w2, w1)
    as64 = [None if t is None else t.double() for t in (q, q, q, q[..., 0], w0, w2, w1)]
    expected = w1_token_step_reference(*as64, torch.zeros_like(w1, dtype=torch.float64), 1.0, False)
    assert out.dtype == torch.float32 and relative_error(out.double(), expected) < FP32_TOLERANCE


@requires_cuda
@pytest.mark.parametrize("batch,heads,d,dh", [(64, 4, 192, 192), (37, 4, 192, 192), (19, 2, 72, 136), (1, 4, 192, 192)])
def test_token_read_kernel_forms_the_key_features_on_the_gpu(batch: int, heads: int, d: int, dh: int) -> None:
    """The pending-token step's read with h(k) (`decoding.pending.keys_as_features`): bf16 q, k and W0, W2 as
    a bf16 model decodes; the read to fp32's tolerance, h(k) (stored in bf16) to bf16's rounding."""
    g = torch.Generator(device="cuda").manual_seed(batch * 1000 + d + 3)
    draw = lambda *shape, scale=1.0: torch.randn(*shape, generator=g, device="cuda") * scale  # noqa: E731
    qk = draw(batch, 3, heads, d).bfloat16()
    q, k = qk[:, 0], qk[:, 1]
    w0, w2 = (draw(heads, dh, d, scale=d**-0.5).bfloat16() for _ in range(2))
    w1 = draw(batch, heads, d, dh, scale=dh**-0.5)
    out, hk = w1_token_read_with_key_features(q, k, w0, w2, w1)
    as64 = [t.double() for t in (q, q, q, q[..., 0], w0, w2, w1)]
    expected = w1_token_step_reference(*as64, torch.zeros_like(w1, dtype=torch.float64), 1.0, False)
    expected_hk = swiglu_features(k.double()[:, None], w0.double(), w2.double())[:, 0]
    assert out.dtype == torch.float32 and relative_error(out.double(), expected) < FP32_TOLERANCE
    assert hk.dtype == torch.bfloat16 and hk.shape == (batch, heads, dh)
    assert relative_error(hk.double(), expected_hk) < 2**-7


@requires_cuda
@pytest.mark.parametrize("batch,heads,d,dh", [(1, 4, 192, 192), (64, 4, 192, 192), (3, 2, 72, 136)])
def test_lact_token_step_kernel_on_the_gpu(batch: int, heads: int, d: int, dh: int) -> None:
    g = torch.Generator(device="cuda").manual_seed(batch * 1000 + d + 1)
    draw = lambda *shape, scale=1.0: torch.randn(*shape, generator=g, device="cuda") * scale  # noqa: E731
    qkv = draw(batch, 3, heads, d).bfloat16()
    fast = FastWeights(w0=draw(batch, heads, dh, d, scale=d**-0.5), w1=draw(batch, heads, d, dh, scale=dh**-0.5),
                       w2=draw(batch, heads, dh, d, scale=d**-0.5))  # fmt: skip
    grads = ChunkGradients(g0=draw(batch, heads, dh, d, scale=0.1), g1=draw(batch, heads, d, dh, scale=0.1),
                           g2=draw(batch, heads, dh, d, scale=0.1))  # fmt: skip
    expected_grads = grads.map(lambda t: t.double())
    etas = torch.rand(batch, 3, heads, generator=g, device="cuda")
    out = lact_token_step(qkv[:, 0], qkv[:, 1], qkv[:, 2], etas, fast, grads, 1.0, True)
    expected = lact_token_step_reference(qkv[:, 0].double(), qkv[:, 1].double(), qkv[:, 2].double(), etas.double(),
                                         fast.map(lambda t: t.double()), expected_grads, 1.0, True)  # fmt: skip
    assert relative_error(out.double(), expected) < FP32_TOLERANCE
    for name in ("g0", "g1", "g2"):
        assert relative_error(getattr(grads, name).double(), getattr(expected_grads, name)) < FP32_TOLERANCE, name
