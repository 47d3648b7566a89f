"""`kernels.window_attention`: causal sliding-window attention over whole sequences, forward and backward.

The kernels run through the Triton interpreter (fp32). Random cases draw what the op accepts: lengths
that are not multiples of the tiles (down to one token), windows from one token to longer than the
sequence, head dims below and above the 16-wide minimum tile, packed documents, heads that are views
of one projection (shared strides) or separate tensors; each is compared, output and the three input
gradients, with the dense float64 SDPA form.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from kernels import window_attention as swa

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the Triton kernels run on CPU only under TRITON_INTERPRET=1")  # fmt: skip

FP32_TOLERANCE = 2e-5  # relative, fp32 kernels against float64 over at most a few hundred keys


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, the norm floored at 0.1 per element: with a one-token window
    (or a one-token sequence) dq and dk are exactly 0 in float64 and fp32 rounding noise in the kernels.
    NaN counts as a failure."""
    if not torch.isfinite(actual).all():
        return float("inf")
    return ((actual - expected).norm() / max(expected.norm().item(), 0.1 * expected.numel() ** 0.5)).item()


def random_documents(batch: int, seq_len: int, rng: random.Random) -> torch.Tensor:
    """[B, T] ids of packed documents: each row cut at a few random places (a document may be one token)."""
    rows = []
    for _ in range(batch):
        cuts = sorted(rng.sample(range(1, seq_len), min(seq_len - 1, rng.randrange(0, 4)))) if seq_len > 1 else []
        ids = torch.zeros(seq_len, dtype=torch.long)
        for cut in cuts:
            ids[cut:] += 1
        rows.append(ids)
    return torch.stack(rows)


def random_case(seed: int) -> dict:
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    batch, heads = rng.choice([1, 2]), rng.choice([1, 3])
    seq_len, head_dim = rng.choice([1, 37, 64, 130, 203]), rng.choice([8, 24, 64])
    window = rng.choice([1, 2, 5, 64, 66, 100, 300])  # 2 and 66: a key tile's last reader starts a query tile
    qkv = torch.randn(batch, seq_len, 3, heads, head_dim, generator=g)
    doc_ids = random_documents(batch, seq_len, rng) if rng.random() < 0.4 else None
    # views of one projection (one set of strides, as the model's heads), separate tensors, or both
    # kinds mixed (the op copies them to one set of strides)
    layout = rng.choice(["views", "separate", "mixed"])
    return dict(qkv=qkv, layout=layout, window=window, doc_ids=doc_ids)


def heads_of(qkv: torch.Tensor, layout: str) -> tuple[torch.Tensor, ...]:
    q, k, v = qkv.unbind(dim=2)
    if layout == "separate":
        return q.contiguous(), k.contiguous(), v.contiguous()
    if layout == "mixed":
        return q, k.contiguous(), v
    return q, k, v


def forward_backward(case: dict, dtype: torch.dtype, cotangent: torch.Tensor, function) -> list[torch.Tensor]:
    """Output and dq, dk, dv of `function` on the case's heads in `dtype` for the given cotangent."""
    qkv = case["qkv"].to(dtype).clone().requires_grad_()
    out = function(*heads_of(qkv, case["layout"]), case["window"], case["doc_ids"])
    out.backward(cotangent.to(dtype))
    return [out.detach(), *qkv.grad.unbind(dim=2)]


def cotangent_for(case: dict, seed: int) -> torch.Tensor:
    batch, seq_len, _, heads, head_dim = case["qkv"].shape
    return torch.randn(batch, seq_len, heads, head_dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("seed", range(24))
@pytest.mark.parametrize("tiles", ["default", "small"])  # small: windows of several tiles, unmasked interior tiles
def test_kernels_equal_float64_sdpa_forward_and_backward(seed: int, tiles: str, monkeypatch) -> None:
    monkeypatch.setenv("TTTLA_KERNELS", "triton")
    if tiles == "small":
        monkeypatch.setattr(swa, "FORWARD_TILES", (16, 16))
        monkeypatch.setattr(swa, "BACKWARD_TILES", (16, 32))
    case = random_case(seed)
    cotangent = cotangent_for(case, seed + 1000)
    got = forward_backward(case, torch.float32, cotangent, swa.window_attention)
    expected = forward_backward(case, torch.float64, cotangent, swa.window_attention_reference)
    for name, a, e in zip(("output", "dq", "dk", "dv"), got, expected):
        assert a.dtype == torch.float32 and a.shape == e.shape, name
        assert relative_error(a.double(), e) < FP32_TOLERANCE, (name, case["window"], case["layout"], e.shape)


def test_tiles_smaller_than_the_window_and_the_sequence(monkeypatch) -> None:
    """Tiles of 16 rows: every loop bound (a window of several tiles, a key tile straddling the window's
    far edge, the last partial tile) runs many times."""
    monkeypatch.setenv("TTTLA_KERNELS", "triton")
    monkeypatch.setattr(swa, "FORWARD_TILES", (16, 32))
    monkeypatch.setattr(swa, "BACKWARD_TILES", (32, 16))
    case = dict(qkv=torch.randn(1, 150, 3, 2, 16, generator=torch.Generator().manual_seed(3)), layout="views",
                window=50, doc_ids=None)  # fmt: skip
    cotangent = cotangent_for(case, 4)
    got = forward_backward(case, torch.float32, cotangent, swa.window_attention)
    expected = forward_backward(case, torch.float64, cotangent, swa.window_attention_reference)
    for a, e in zip(got, expected):
        assert relative_error(a.double(), e) < FP32_TOLERANCE


def test_a_key_outside_the_window_gets_no_weight(monkeypatch) -> None:
    """Only the key exactly `window` positions back differs (a huge score): the output must not move."""
    monkeypatch.setenv("TTTLA_KERNELS", "triton")
    window, seq_len = 8, 40
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, seq_len, 1, 16, generator=g) for _ in range(3))
    base = swa.window_attention(q, k, v, window)
    k_far, v_far = k.clone(), v.clone()
    k_far[0, seq_len - 1 - window] = 50 * q[0, seq_len - 1]
    v_far[0, seq_len - 1 - window] = 1e3
    moved = swa.window_attention(q, k_far, v_far, window)
    torch.testing.assert_close(moved[0, -1], base[0, -1], rtol=0, atol=0)


def test_op_registration(monkeypatch) -> None:
    """Fake tensors, autograd registration and schema of the torch.library op, as torch.compile uses them."""
    monkeypatch.setenv("TTTLA_KERNELS", "triton")
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 19, 2, 16, generator=g, requires_grad=True) for _ in range(3))
    doc_ids = torch.tensor([[0] * 7 + [1] * 12, [0] * 19])
    torch.library.opcheck(swa.window_attention_op, (q, k, v, None, 6))
    torch.library.opcheck(swa.window_attention_op, (q, k, v, doc_ids, 6))


def test_compiled_call_equals_eager(monkeypatch) -> None:
    monkeypatch.setenv("TTTLA_KERNELS", "triton")
    case = random_case(5) | {"doc_ids": None}
    cotangent = cotangent_for(case, 9)
    compiled = torch.compile(swa.window_attention, backend="aot_eager", fullgraph=True)
    eager = forward_backward(case, torch.float32, cotangent, swa.window_attention)
    for a, e in zip(forward_backward(case, torch.float32, cotangent, compiled), eager):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_a_window_below_one_token_is_refused() -> None:
    x = torch.randn(1, 4, 1, 16)
    with pytest.raises(ValueError, match="at least 1 token"):
        swa.window_attention(x, x, x, 0)
