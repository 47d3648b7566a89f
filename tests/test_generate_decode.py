"""Specification of token-by-token decoding (decoding/decode.py).

Decoding with the constant-size state must reproduce the chunk form exactly: the logits of
prefill + decode_step over a sequence equal one `TTTLM.forward` over the whole sequence. Runs in
float64 so that any semantic slip (a chunk updated one token early, a momentum decay over the wrong
tokens, a window off by one) shows up far above rounding; the two paths sum the same terms in a
different order, which costs ~1e-14 relative, hence the 1e-9 bound.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from decoding.decode import decode_step, prefill
from model.config import LMConfig, TTTConfig
from model.lm import TTTLM
from verification.proof import relative_error

CHUNK, WINDOW = 8, 12  # sequences below cross several chunk boundaries and the window
SEQ_LEN = 37
TOLERANCE = 1e-9

MODES = {
    "parallel": TTTConfig(mode="linear_attention", fast_weights="w1"),
    "parallel-token-causal-momentum-muon": TTTConfig(
        mode="linear_attention", fast_weights="w1", token_causal=True, momentum=True, muon=True
    ),
    "recurrent-all-momentum-weightnorm": TTTConfig(
        mode="recurrent", fast_weights="all", momentum=True, weight_norm=True
    ),
    "recurrent-all-muon": TTTConfig(mode="recurrent", fast_weights="all", muon=True),
    "recurrent-released": TTTConfig(
        mode="recurrent", fast_weights="all", momentum=True, muon=True, weight_norm=True, w02_rank=2
    ),
    "parallel-identity-per-head-lr": TTTConfig(mode="linear_attention", feature_map="identity", per_token_lr=False, momentum=True),
}


def make_model(ttt: TTTConfig, seed: int = 0, chunk: int = CHUNK) -> TTTLM:
    """A small float64 model whose fast-weight updates are large enough to matter in the logits."""
    ttt.chunk_size, ttt.num_heads, ttt.base_lr = chunk, 2, 0.3
    cfg = LMConfig(vocab_size=50, hidden_size=32, num_layers=2, num_attn_heads=2, window_size=WINDOW, ttt=ttt)
    torch.manual_seed(seed)
    model = TTTLM(cfg).double().eval()
    with torch.no_grad():
        for block in model.blocks:  # random learning-rate and momentum heads: per-token values differ
            for proj in (block.mixer.lr_proj, block.mixer.momentum_proj):
                if proj is not None:
                    proj.weight.normal_(std=0.5)
    return model


def decoded_logits(model: TTTLM, tokens: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Prefill tokens[:, :prompt_len], then feed the rest one by one: logits [B, T, V] position by position."""
    logits, state = prefill(model, tokens[:, :prompt_len])
    steps = [decode_step(model, state, tokens[:, t]) for t in range(prompt_len, tokens.shape[1])]
    return torch.cat([logits, torch.stack(steps, dim=1)], dim=1) if steps else logits


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("prompt_len", [1, 13, 16])  # 13: mid-chunk and past the window; 16: on a boundary
def test_decoding_matches_one_forward_pass(mode: str, prompt_len: int) -> None:
    model = make_model(MODES[mode])
    tokens = torch.randint(0, model.cfg.vocab_size, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    expected = model(tokens).logits
    assert relative_error(decoded_logits(model, tokens, prompt_len), expected) < TOLERANCE


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("prompt_len", [CHUNK - 1, 2 * CHUNK - 1])
def test_decoding_from_a_prompt_one_token_short_of_a_boundary(mode: str, prompt_len: int) -> None:
    """The first decoded token completes a chunk whose other tokens all came from the prompt: its
    update is made from the prefill's sums (C - 1 tokens at once) plus the token's own term."""
    model = make_model(MODES[mode])
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 3 * CHUNK), generator=torch.Generator().manual_seed(4))
    assert relative_error(decoded_logits(model, tokens, prompt_len), model(tokens).logits) < TOLERANCE


@pytest.mark.parametrize("mode", ["parallel-token-causal-momentum-muon", "recurrent-released"])
def test_the_step_that_completes_a_chunk_costs_the_same_at_any_chunk_size(mode: str) -> None:
    """The update is made from sums kept token by token, so the boundary step's work (matmul FLOPs,
    Muon included) does not grow with the chunk; re-running the chunk's C tokens would. Position 31
    completes a chunk of 8 and one of 32, with the window ring full in both."""
    tokens = torch.randint(0, 50, (1, 32), generator=torch.Generator().manual_seed(5))
    flops = []
    for chunk in (CHUNK, 4 * CHUNK):
        model = make_model(replace(MODES[mode]), chunk=chunk)
        _, state = prefill(model, tokens[:, :31])
        with FlopCounterMode(display=False) as counter:
            decode_step(model, state, tokens[:, 31])
        flops.append(counter.get_total_flops())
    assert flops[0] == flops[1] > 0


def test_updates_reach_the_logits() -> None:
    """Guards the test above: without the chunk updates the logits differ by far more than the tolerance."""
    model = make_model(MODES["recurrent-all-momentum-weightnorm"])
    tokens = torch.randint(0, model.cfg.vocab_size, (1, SEQ_LEN), generator=torch.Generator().manual_seed(2))
    with_updates = model(tokens).logits
    for block in model.blocks:
        block.mixer.lr_proj.bias.data.fill_(-60.0)  # softplus(-60) ~ 1e-26: no update
    assert relative_error(model(tokens).logits, with_updates) > 1e-4


@pytest.mark.parametrize("mode", ["parallel-token-causal-momentum-muon", "recurrent-all-momentum-weightnorm"])
def test_state_memory_is_independent_of_context(mode: str) -> None:
    """Once a first chunk has been absorbed (momenta exist from then on) the state never grows, and a
    long prefill leaves no per-chunk buffers behind."""
    model = make_model(MODES[mode])
    tokens = torch.randint(0, model.cfg.vocab_size, (1, 6 * CHUNK), generator=torch.Generator().manual_seed(3))
    _, short = prefill(model, tokens[:, : CHUNK + 3])
    _, long = prefill(model, tokens[:, : 5 * CHUNK + 3])
    sizes = {short.memory_bytes(), long.memory_bytes()}
    for t in range(2 * CHUNK):
        decode_step(model, long, tokens[:, t])
        sizes.add(long.memory_bytes())
    assert len(sizes) == 1
