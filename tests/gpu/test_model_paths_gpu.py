"""The GPU training paths of the model against their references, bf16 on the device:

* FlexAttention's sliding window against the blockwise band (SDPA with explicit masks), with and without
  packed documents, forward and backward;
* the chunked linear cross-entropy against cross-entropy of the full fp32 logits.

Tolerance 2e-2 relative (Frobenius): both sides round q, k, v and the probabilities to bf16 and
accumulate in fp32 in different orders (measured 3e-3..8e-3); a mask or indexing error is O(1).
"""

import pytest
import torch
import torch.nn.functional as F

from model.loss import IGNORE_INDEX, linear_cross_entropy
from model.swa import blockwise_band_attention, flex_window_attention, window_block_mask

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
BF16_TOL = 2e-2


def rel_err(ref, got):
    assert torch.isfinite(got).all()
    return ((ref.double() - got.double()).norm() / ref.double().norm()).item()


# The 4099-token cases compile FlexAttention for their shapes cold (about 60-80 s each on an H100), so
# they run with the slow cases; the quick suite keeps an odd length with and without packed documents.
@pytest.mark.parametrize("seq_len, window, packed", [
    pytest.param(4099, 512, False, marks=pytest.mark.gpu_slow), pytest.param(4099, 512, True, marks=pytest.mark.gpu_slow),
    (1000, 2048, False), (1000, 384, True)])
def test_flex_window_attention_matches_band(seq_len, window, packed):
    g = torch.Generator(device="cuda").manual_seed(seq_len + window)
    q, k, v = (torch.randn(2, seq_len, 4, 64, device="cuda", generator=g).bfloat16().requires_grad_() for _ in range(3))
    doc_ids = torch.cumsum(torch.rand(2, seq_len, device="cuda", generator=g) < 2e-3, dim=1) if packed else None
    ours = flex_window_attention(q, k, v, window, doc_ids, window_block_mask(seq_len, window, q.device, doc_ids))
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    reference = blockwise_band_attention(*leaves, window, doc_ids)
    assert rel_err(reference, ours) < BF16_TOL
    cotangent = torch.randn_like(reference)
    grads = torch.autograd.grad(ours, (q, k, v), cotangent.bfloat16())
    expected = torch.autograd.grad(reference, leaves, cotangent)
    for name, e, o in zip("qkv", expected, grads):
        assert rel_err(e, o) < BF16_TOL, f"grad of {name}"


def test_chunked_cross_entropy_matches_full_logits():
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(5000, 768, device="cuda", generator=g).bfloat16().requires_grad_()
    weight = (torch.randn(32000, 768, device="cuda", generator=g) * 0.02).requires_grad_()
    targets = torch.randint(0, 32000, (5000,), device="cuda", generator=g)
    targets[::7] = IGNORE_INDEX
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ours = linear_cross_entropy(hidden, weight, targets)
    grads = torch.autograd.grad(ours, (hidden, weight))
    h, w = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    expected = F.cross_entropy(h @ w.t(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    assert rel_err(expected, ours) < 1e-3  # fp32 reductions of bf16 logits
    for name, e, o in zip(("hidden", "weight"), torch.autograd.grad(expected, (h, w)), grads):
        assert rel_err(e, o) < BF16_TOL, f"grad of {name}"
