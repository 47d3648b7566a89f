"""The TTT mixer: both modes compute the same layer where the maths says they must."""

from __future__ import annotations

import pytest
import torch

from model.config import LMConfig, TTTConfig
from model.lm import TTTLM
from verification.proof import relative_error

TOLERANCE = 1e-10  # float64 model; see tests/test_equivalence.py for why this margin
# With Muon the parameter gradients pass back through five Newton-Schulz iterations, which multiply the
# two forms' rounding differences by up to ~1e5: over 10 draws per case the worst gradient error was
# 1.8e-10 (3e-15 without Muon), and it moves with the machine's BLAS. A slip in either form is O(1e-3) or more.
MUON_TOLERANCE = 1e-8


def twin_models(momentum: bool, muon: bool, window: int = 8):
    """A recurrent (W1-only, no weight norm) and a parallel model sharing every parameter."""
    base = dict(num_heads=2, chunk_size=8, fast_weights="w1", momentum=momentum, muon=muon)
    cfg = dict(vocab_size=50, hidden_size=24, num_layers=2, num_attn_heads=2, window_size=window)
    recurrent = TTTLM(LMConfig(**cfg, ttt=TTTConfig(mode="recurrent", **base))).double()
    parallel = TTTLM(LMConfig(**cfg, ttt=TTTConfig(mode="linear_attention", **base))).double()
    parallel.load_state_dict(recurrent.state_dict())
    for p in recurrent.parameters():  # make the learning rates and momenta non-trivial
        p.data.add_(0.05 * torch.randn_like(p))
    parallel.load_state_dict(recurrent.state_dict())
    return recurrent, parallel


@pytest.mark.parametrize("seq_len", [24, 29])
@pytest.mark.parametrize("momentum,muon", [(False, False), (True, False), (True, True)])
def test_lm_recurrent_equals_parallel_loss_and_parameter_gradients(seq_len, momentum, muon):
    torch.manual_seed(seq_len)  # the same draw whichever tests ran before
    recurrent, parallel = twin_models(momentum, muon)
    ids = torch.randint(0, 50, (2, seq_len + 1))
    out_r = recurrent(ids[:, :-1], ids[:, 1:])
    out_p = parallel(ids[:, :-1], ids[:, 1:])
    assert relative_error(out_p.logits, out_r.logits) < TOLERANCE
    out_r.loss.backward()
    out_p.loss.backward()
    grads_p = dict(parallel.named_parameters())
    for name, p in recurrent.named_parameters():
        assert p.grad is not None, name
        assert relative_error(grads_p[name].grad, p.grad) < (MUON_TOLERANCE if muon else TOLERANCE), name


def test_state_carries_across_segments():
    """Running a sequence in two calls, passing the fast-weight state, equals one call (chunk-aligned split)."""
    _, model = twin_models(momentum=True, muon=False, window=1)
    ids = torch.randint(0, 50, (2, 32))
    whole = model(ids).logits
    first = model(ids[:, :16])
    second = model(ids[:, 16:], states=first.states, position_offset=16)
    assert relative_error(torch.cat([first.logits, second.logits], 1), whole) < TOLERANCE


def test_ttt_branch_sees_earlier_chunks():
    """Changing a token in chunk 0 must change outputs of chunk 2 even with the window far too short to reach."""
    _, model = twin_models(momentum=False, muon=False, window=1)
    ids = torch.randint(0, 50, (1, 24))
    changed = ids.clone()
    changed[0, 2] = (ids[0, 2] + 1) % 50
    a, b = model(ids).logits, model(changed).logits
    assert not torch.allclose(a[0, 16:], b[0, 16:])
    assert torch.allclose(a[0, :2], b[0, :2])  # causality: nothing before the change moves


@pytest.mark.parametrize("rows", ["offset 0", "offset 7", "offset per row", "packed documents"])
def test_shared_rope_tables_equal_each_blocks_own(rows):
    """The RoPE tables the LM builds once per forward for all layers give every block, bit for bit,
    the outputs and gradients of the tables each block builds for itself, wherever its rows start:
    the same offset for all rows, an offset per row, positions restarting per packed document."""
    from model.lm import Block

    torch.manual_seed(3)
    _, model = twin_models(momentum=True, muon=False)
    ids = torch.randint(0, 50, (2, 29))
    offset = {"offset 0": 0, "offset 7": 7, "offset per row": torch.tensor([3, 11])}.get(rows, 0)
    doc_ids = torch.tensor([[0] * 12 + [1] * 17, [0] * 20 + [1] * 9]) if rows == "packed documents" else None
    own_tables = lambda block, *args: Block.forward(block, *args[:-1], None)  # noqa: E731  (rope dropped)
    results = []
    for call_block in (None, own_tables):
        model.zero_grad()
        hidden, _ = model.hidden_states(ids, position_offset=offset, doc_ids=doc_ids, call_block=call_block)
        (hidden * torch.linspace(-1, 1, hidden.shape[-1], dtype=hidden.dtype)).sum().backward()
        results.append([hidden.detach(), *(p.grad.clone() for p in model.parameters() if p.grad is not None)])
    assert model.rotary_tables(model.embed(ids), offset, None) is not None  # the shared tables are in use
    for shared, own in zip(*results, strict=True):
        assert torch.equal(shared, own)
