"""The SDPA baseline (model/baseline.py) decodes from its KV cache exactly as its forward pass computes."""

from __future__ import annotations

from functools import partial

import torch

from decoding.graphs import DecodeRunner
from decoding.kv_cache import StaticKVDecoder
from decoding.sampling import sample_tokens
from model.baseline import BaselineLM
from model.config import LMConfig
from verification.proof import relative_error


def small_model_and_cached_decode() -> tuple[BaselineLM, torch.Tensor, torch.Tensor]:
    """A float64 two-layer baseline, 2 x 19 random tokens, and the logits of decoding them one by one
    from the KV cache."""
    torch.manual_seed(0)
    model = BaselineLM(LMConfig(vocab_size=40, hidden_size=32, num_layers=2, num_attn_heads=4)).double().eval()
    tokens = torch.randint(0, 40, (2, 19))
    cache = model.empty_cache(batch=2, capacity=19)
    return model, tokens, torch.stack([model.decode_step(tokens[:, t], cache) for t in range(19)], dim=1)


def test_kv_cache_decoding_matches_the_forward_pass() -> None:
    model, tokens, steps = small_model_and_cached_decode()
    # float64: both paths sum the same terms in another order (~1e-15 relative)
    assert relative_error(steps, model(tokens).logits) < 1e-9


def test_static_cache_step_equals_the_kv_cache_decoder() -> None:
    """Prefill 7 tokens, then 12 static steps (fixed capacity, length mask) against decode_step (sliced cache)."""
    model, tokens, expected = small_model_and_cached_decode()
    logits, cache = model.prefill(tokens[:, :7], capacity=19)
    decoder = StaticKVDecoder.around(model, cache)
    runner = DecodeRunner(decoder, partial(sample_tokens, temperature=0.0, top_p=1.0), graphs=False)
    steps = []
    for t in range(7, 19):
        decoder.tokens.copy_(tokens[:, t])
        runner.step()
        steps.append(decoder.logits.clone())
    # float64: masked SDPA over the capacity sums the same terms as the sliced cache (~1e-15 relative)
    assert relative_error(torch.cat([logits, torch.stack(steps, dim=1)], dim=1), expected) < 1e-12
