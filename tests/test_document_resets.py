"""Packed documents: with doc_ids, each document is computed exactly as if it were its own sequence.

The proof compares a batch of packed rows with every document run alone from the start (float64),
for both TTT modes, with momentum, documents shorter and longer than a chunk, and a window that
would otherwise reach across the boundary.
"""

from __future__ import annotations

import pytest
import torch

from model.config import LMConfig, TTTConfig
from model.lm import TTTLM
from model.segments import DocumentSegments
from verification.proof import relative_error

TOLERANCE = 1e-10  # float64; the packed and the separate runs sum in the same order up to rounding

MODES = {
    "parallel": TTTConfig(mode="linear_attention", chunk_size=8, momentum=True),
    "parallel-token-causal": TTTConfig(mode="linear_attention", chunk_size=8, momentum=True, token_causal=True),
    "recurrent": TTTConfig(mode="recurrent", chunk_size=8, fast_weights="all", momentum=True, weight_norm=True),
}
# Two rows of 30 tokens: documents of 11 + 19 tokens, and 5 + 3 + 22 (shorter than a chunk, odd lengths).
DOCUMENT_LENGTHS = [[11, 19], [5, 3, 22]]


def packed_doc_ids() -> torch.Tensor:
    return torch.tensor([[doc for doc, n in enumerate(row) for _ in range(n)] for row in DOCUMENT_LENGTHS])


@pytest.mark.parametrize("mode", MODES)
def test_packed_documents_equal_separate_sequences(mode):
    torch.manual_seed(0)
    model = TTTLM(LMConfig(vocab_size=50, hidden_size=32, num_layers=2, num_attn_heads=2, window_size=12, ttt=MODES[mode])).double()
    for p in model.parameters():  # non-trivial learning rates and momenta
        p.data.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(0, 50, (2, 30))
    packed = model(ids, doc_ids=packed_doc_ids())
    for row, lengths in enumerate(DOCUMENT_LENGTHS):
        start = 0
        for n in lengths:
            alone = model(ids[row : row + 1, start : start + n])
            assert relative_error(packed.logits[row, start : start + n], alone.logits[0]) < TOLERANCE
            start += n
        last = model(ids[row : row + 1, start - lengths[-1] : start])
        for layer, state in enumerate(packed.states):  # each row leaves with its last document's state
            assert relative_error(state.w1[row], last.states[layer].w1[0]) < TOLERANCE


def test_packed_gradients_equal_separate_sequences():
    """Backward too: parameter gradients of a loss over packed rows equal those of the documents run alone."""
    torch.manual_seed(1)
    model = TTTLM(LMConfig(vocab_size=50, hidden_size=32, num_layers=2, num_attn_heads=2, window_size=12, ttt=MODES["parallel"])).double()
    ids = torch.randint(0, 50, (2, 30))
    probe = torch.randn(2, 30, 50, dtype=torch.float64)
    packed = torch.autograd.grad((model(ids, doc_ids=packed_doc_ids()).logits * probe).sum(), list(model.parameters()))
    separate_loss = 0.0
    for row, lengths in enumerate(DOCUMENT_LENGTHS):
        start = 0
        for n in lengths:
            separate_loss = separate_loss + (model(ids[row : row + 1, start : start + n]).logits[0] * probe[row, start : start + n]).sum()
            start += n
    separate = torch.autograd.grad(separate_loss, list(model.parameters()))
    for (name, _), a, b in zip(model.named_parameters(), packed, separate):
        assert relative_error(a, b) < TOLERANCE, name


def test_without_resets_the_next_document_sees_the_previous():
    """The control: the same packed row without doc_ids lets document 1 depend on document 0."""
    model = TTTLM(LMConfig(vocab_size=50, hidden_size=32, num_layers=1, num_attn_heads=2, window_size=12, ttt=MODES["parallel"])).double()
    ids = torch.randint(0, 50, (1, 30))
    alone = model(ids[:, 11:]).logits
    assert relative_error(model(ids).logits[:, 11:], alone) > 1e-3
    assert relative_error(model(ids, doc_ids=packed_doc_ids()[:1]).logits[:, 11:], alone) < TOLERANCE


def test_segments_from_doc_ids():
    segments = DocumentSegments.from_doc_ids(packed_doc_ids())
    assert segments.cu_seqlens.tolist() == [0, 11, 30, 35, 38, 60]
    assert segments.last_document.tolist() == [1, 4]
