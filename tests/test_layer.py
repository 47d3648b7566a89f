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


@pytest.mark.parametrize("first,count", [(0, 40), (7, 33), (0, 3)])
def test_range_tables_equal_the_tables_of_the_positions(first, count):
    """The range's tables (built once, copied per call) are the position op's tables of arange(first,
    first + count), bit for bit, and each call's are the caller's own (writing one leaves the next intact)."""
    from model.layers import rotary_range_tables, rotary_tables

    for dtype in (torch.float32, torch.float64):
        expected = rotary_tables(torch.arange(first, first + count), 32, 10000.0, dtype)
        first_call = rotary_range_tables(first, count, 32, 10000.0, dtype, torch.device("cpu"))
        for table, reference in zip(first_call, expected):
            assert torch.equal(table, reference)
            table.zero_()
        for table, reference in zip(rotary_range_tables(first, count, 32, 10000.0, dtype, torch.device("cpu")), expected):
            assert torch.equal(table, reference)
