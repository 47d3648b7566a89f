"""Sliding-window attention: the memory-bounded blockwise path equals the dense band-masked reference."""

from __future__ import annotations

import pytest
import torch

from model.swa import band_attention_reference, band_mask, blockwise_band_attention, sliding_window_attention
from tests.test_compile import interpreted
from verification.proof import relative_error

TOLERANCE = 1e-12  # float64; both paths are softmax over the same keys, summed in another order


def explicit_window_attention(q, k, v, window):
    """The definition, one query at a time: softmax over keys s with t - window < s <= t."""
    scale = q.shape[-1] ** -0.5
    out = torch.empty_like(q)
    for t in range(q.shape[1]):
        lo = max(0, t - window + 1)
        scores = torch.einsum("bad,bsad->bas", q[:, t], k[:, lo : t + 1]) * scale
        out[:, t] = torch.einsum("bas,bsad->bad", scores.softmax(-1), v[:, lo : t + 1])
    return out


@pytest.mark.parametrize("seq_len,window", [(17, 4), (16, 16), (9, 32), (33, 1), (40, 7)])
def test_blockwise_equals_reference_and_definition(seq_len, window):
    q, k, v = (torch.randn(2, seq_len, 3, 8, dtype=torch.float64) for _ in range(3))
    expected = explicit_window_attention(q, k, v, window)
    assert relative_error(band_attention_reference(q, k, v, window), expected) < TOLERANCE
    assert relative_error(blockwise_band_attention(q, k, v, window), expected) < TOLERANCE
    assert relative_error(sliding_window_attention(q, k, v, window), expected) < TOLERANCE


def test_band_mask_boundary():
    """Exactly `window` keys are visible, ending at the query itself."""
    mask = band_mask(torch.arange(6), torch.arange(6), 3)
    assert mask[5].tolist() == [False, False, False, True, True, True]
    assert mask[0].tolist() == [True, False, False, False, False, False]


def test_key_just_outside_window_has_no_influence():
    q, k, v = (torch.randn(1, 12, 1, 4, dtype=torch.float64) for _ in range(3))
    base = blockwise_band_attention(q, k, v, 5)
    v2 = v.clone()
    v2[:, 6] += 100.0  # visible to queries 6..10, invisible to 11 (11 - 6 = 5 >= window)
    changed = blockwise_band_attention(q, k, v2, 5)
    assert torch.equal(changed[:, 11], base[:, 11]) and torch.equal(changed[:, :6], base[:, :6])
    assert not torch.allclose(changed[:, 10], base[:, 10])


def explicit_document_window_attention(q, k, v, window, doc_ids):
    """The definition with packed documents: keys in the window and in the query's own document."""
    scale = q.shape[-1] ** -0.5
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        for t in range(q.shape[1]):
            keys = [s for s in range(max(0, t - window + 1), t + 1) if doc_ids[b, s] == doc_ids[b, t]]
            scores = torch.einsum("ad,sad->as", q[b, t], k[b, keys]) * scale
            out[b, t] = torch.einsum("as,sad->ad", scores.softmax(-1), v[b, keys])
    return out


@pytest.mark.parametrize("seq_len,window", [(17, 4), (130, 37), (9, 32)])
def test_flex_window_attention_equals_definition(seq_len, window):
    """The FlexAttention path (its block mask and mask function; eager FlexAttention on CPU runs the
    same masked softmax densely) against the definition, with and without packed documents."""
    from model.swa import flex_window_attention

    q, k, v = (torch.randn(2, seq_len, 2, 8, dtype=torch.float64) for _ in range(3))
    assert relative_error(flex_window_attention(q, k, v, window), explicit_window_attention(q, k, v, window)) < TOLERANCE
    doc_ids = torch.cumsum(torch.rand(2, seq_len) < 0.1, dim=1)
    expected = explicit_document_window_attention(q, k, v, window, doc_ids)
    assert relative_error(flex_window_attention(q, k, v, window, doc_ids), expected) < TOLERANCE


def test_window_block_mask_is_built_once_per_length_and_window():
    from model.swa import window_block_mask

    first = window_block_mask(256, 64, torch.device("cpu"))
    assert window_block_mask(256, 64, torch.device("cpu")) is first
    assert window_block_mask(256, 32, torch.device("cpu")) is not first


@interpreted
@pytest.mark.parametrize("packed", [False, True])
def test_model_with_the_triton_window_equals_the_blockwise_one(packed, monkeypatch):
    """`model.window_kernel=triton`: the same LM, its window through the Triton kernels (fp32, interpreter),
    gives the blockwise path's loss and parameter gradients, packed documents included."""
    from model.config import LMConfig, TTTConfig
    from model.lm import TTTLM

    def loss_and_grads(window_kernel: str) -> list[torch.Tensor]:
        torch.manual_seed(0)
        cfg = LMConfig(vocab_size=64, hidden_size=64, num_layers=2, num_attn_heads=4, window_size=24,
                       window_kernel=window_kernel, ttt=TTTConfig(num_heads=2, chunk_size=16))  # fmt: skip
        model = TTTLM(cfg)
        ids = torch.randint(0, 64, (2, 51), generator=torch.Generator().manual_seed(1))
        doc_ids = (torch.arange(50)[None, :] >= torch.tensor([[20], [33]])).long() if packed else None
        loss = model(ids[:, :-1], ids[:, 1:], doc_ids=doc_ids).loss
        loss.backward()
        return [loss.detach(), *(p.grad for p in model.parameters())]

    import model.swa as swa

    monkeypatch.setenv("TTTLA_KERNELS", "triton")  # both runs: the TTT kernels alike, only the window differs
    expected = loss_and_grads("flex")  # on the CPU: the blockwise SDPA band
    calls = []
    kernel = swa.window_kernels.window_attention
    monkeypatch.setattr(swa.window_kernels, "window_attention", lambda *args, **kw: calls.append(1) or kernel(*args, **kw))
    got = loss_and_grads("triton")
    assert len(calls) == 2  # one per layer
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)
