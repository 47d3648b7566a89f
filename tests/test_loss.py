"""The chunked linear cross-entropy equals cross-entropy of the full logits, in value and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.loss import IGNORE_INDEX, head_and_loss, linear_cross_entropy
from verification.proof import relative_error

TOLERANCE = 1e-12  # float64: the same sums over the vocabulary, taken chunk by chunk


@pytest.mark.parametrize("backend", [None, "aot_eager"])
@pytest.mark.parametrize("tokens, chunk", [(37, 8), (16, 16), (5, 64)])
def test_chunked_loss_and_gradients_equal_full_logits(tokens, chunk, backend):
    """Eager, and with each chunk's elementwise work traced by the compiler ("aot_eager": the traced
    ops run eagerly, so in-place writes that functionalisation lost would show)."""
    g = torch.Generator().manual_seed(tokens)
    hidden = torch.randn(tokens, 12, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(50, 12, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (tokens,), generator=g)
    targets[::3] = IGNORE_INDEX  # masked positions contribute neither loss nor gradient
    expected = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    expected_grads = torch.autograd.grad(expected * 1.7, (hidden, weight))
    got = linear_cross_entropy(hidden, weight, targets, chunk_tokens=chunk, backend=backend)
    got_grads = torch.autograd.grad(got * 1.7, (hidden, weight))
    assert relative_error(got, expected) < TOLERANCE
    for g_got, g_expected in zip(got_grads, expected_grads):
        assert relative_error(g_got, g_expected) < TOLERANCE


def test_head_and_loss_without_logits_matches_with_logits():
    """The training path (no logits returned) and the evaluation path agree."""
    hidden = torch.randn(2, 9, 6, dtype=torch.float64)
    weight = torch.randn(11, 6, dtype=torch.float64)
    targets = torch.randint(0, 11, (2, 9))
    logits, with_logits, count = head_and_loss(hidden, weight, targets, return_logits=True)
    none, without_logits, count2 = head_and_loss(hidden, weight, targets, return_logits=False)
    assert none is None and logits.shape == (2, 9, 11) and count == count2 == 18
    assert relative_error(without_logits, with_logits) < TOLERANCE


def test_no_gradient_work_under_no_grad():
    hidden, weight = torch.randn(10, 4), torch.randn(7, 4)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, torch.randint(0, 7, (10,)), chunk_tokens=4)
    assert not loss.requires_grad and torch.isfinite(loss)


def test_compiled_blocks_compile_the_loss_too():
    """The trainer's and the benchmark's compile setting reaches the chunked loss of both models."""
    from model.baseline import BaselineLM
    from model.config import LMConfig
    from model.lm import TTTLM
    from train.compile import compile_blocks

    cfg = LMConfig(vocab_size=32, hidden_size=32, num_layers=1, num_attn_heads=2)
    for model in (TTTLM(cfg), BaselineLM(cfg)):
        assert model.loss_backend is None
        compile_blocks(model, backend="aot_eager")
        assert model.loss_backend == "aot_eager"
