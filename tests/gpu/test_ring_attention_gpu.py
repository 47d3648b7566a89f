"""The ring attention kernels (kernels/ring_attention.py) compiled for the GPU against float64 SDPA.

125M window shapes (12 heads of 64, a ring of 2048 slots), bf16 as the decoder keeps the ring, rows
before, at and past the ring's end, at batch 1 (many splits per head) and 64 (few). Tolerance: the
output is rounded to bf16 (2^-8 relative) after an fp32 softmax.
"""

from __future__ import annotations

import pytest
import torch

from kernels.ring_attention import ring_attention, ring_attention_reference
from verification.proof import relative_error

pytestmark = pytest.mark.gpu
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
BF16_TOLERANCE = 1e-2


@requires_cuda
@pytest.mark.parametrize("batch", [1, 3, 64])
def test_ring_attention_kernel_on_the_gpu(batch: int) -> None:
    g = torch.Generator(device="cuda").manual_seed(batch)
    heads, window, head_dim = 12, 2048, 64
    q = torch.randn(batch, heads, head_dim, generator=g, device="cuda").bfloat16()
    keys, values = (torch.randn(batch, heads, window, head_dim, generator=g, device="cuda").bfloat16() for _ in range(2))
    positions = torch.tensor([0, 1000, 2047, 5000][:batch] * (batch // 4 + 1), device="cuda")[:batch]
    out = ring_attention(q, keys, values, positions)
    expected = ring_attention_reference(q.double(), keys.double(), values.double(), positions)
    assert out.dtype == torch.bfloat16
    assert relative_error(out.double(), expected) < BF16_TOLERANCE
