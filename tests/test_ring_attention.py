"""`kernels.ring_attention`: one decoded query per row over its window's ring, split over the ring.

The kernels run through the Triton interpreter (fp32). Random cases draw what the op accepts (rows
at positions before, at and past the ring's end, so from one filled slot to all; windows and head
dims that are not multiples of the tiles; strided queries) and compare with the float64 SDPA form.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from kernels import ring_attention as ring
from tests.test_decode_static import assert_kernel_decoding_equals_float64
from verification.proof import relative_error

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the Triton kernels run on CPU only under TRITON_INTERPRET=1")  # fmt: skip

FP32_TOLERANCE = 1e-5  # relative: an fp32 softmax over at most a few hundred slots against float64


def random_case(seed: int) -> dict:
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    batch, heads = rng.choice([1, 2, 5]), rng.choice([1, 3])
    window, head_dim = rng.choice([1, 7, 64, 100, 300]), rng.choice([8, 24, 64])
    positions = torch.tensor([rng.choice([0, rng.randrange(window), window - 1, window + rng.randrange(50)])
                              for _ in range(batch)])  # fmt: skip
    q = torch.randn(batch, 2 * heads, head_dim, generator=g)[:, ::2]  # strided over heads
    keys, values = (torch.randn(batch, heads, window, head_dim, generator=g) for _ in range(2))
    return dict(q=q, keys=keys, values=values, positions=positions)


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("programs", [1, ring.TARGET_PROGRAMS])  # few splits, each walking several tiles; many splits
def test_kernel_equals_float64_sdpa(seed: int, programs: int, monkeypatch) -> None:
    monkeypatch.setenv("TTTLA_KERNELS", "triton")
    monkeypatch.setattr(ring, "TARGET_PROGRAMS", programs)
    case = random_case(seed)
    out = ring.ring_attention(**case)
    expected = ring.ring_attention_reference(**{k: v.double() if v.is_floating_point() else v for k, v in case.items()})
    assert out.dtype == case["q"].dtype and out.shape == case["q"].shape
    assert relative_error(out.double(), expected) < FP32_TOLERANCE


@pytest.mark.parametrize("batch", [1, 64])
def test_splits_cover_the_ring(batch: int, monkeypatch) -> None:
    """At batch 1 the ring is split over many programs, at batch 64 over few; either way a value in
    the ring's last slot alone (every other value 0, equal scores) comes through with weight 1/W."""
    monkeypatch.setenv("TTTLA_KERNELS", "triton")
    window = 2048
    values = torch.zeros(batch, 1, window, 8)
    values[:, :, -1] = 1.0
    out = ring.ring_attention(torch.zeros(batch, 1, 8), torch.zeros(batch, 1, window, 8), values,
                              torch.full((batch,), window + 5))  # fmt: skip
    assert ring.split_count(batch, window) == (32 if batch == 1 else 8)
    torch.testing.assert_close(out, torch.full_like(out, 1.0 / window))


def test_static_decoding_through_the_kernel_equals_the_float64_decoder(monkeypatch) -> None:
    """An fp32 model decoding rows before, at and past the window's end through the kernels (every
    layer's window attention of every step launches them) gives the float64 decoder's logits."""
    assert_kernel_decoding_equals_float64("parallel", ring, "_launch", prompt_lengths=[1, 11, 13], steps=6, seed=9,
                                          monkeypatch=monkeypatch)  # the window is 12 slots
