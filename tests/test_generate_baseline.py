"""The SDPA baseline (model/baseline.py) decodes from its KV cache exactly as its forward pass computes."""

from __future__ import annotations

import torch

from model.baseline import BaselineLM
from model.config import LMConfig
from model.proof import relative_error


def test_kv_cache_decoding_matches_the_forward_pass() -> None:
    torch.manual_seed(0)
    model = BaselineLM(LMConfig(vocab_size=40, hidden_size=32, num_layers=2, num_attn_heads=4)).double().eval()
    tokens = torch.randint(0, 40, (2, 19))
    cache = model.empty_cache(batch=2, capacity=19)
    steps = torch.stack([model.decode_step(tokens[:, t], cache) for t in range(19)], dim=1)
    # float64: both paths sum the same terms in another order (~1e-15 relative)
    assert relative_error(steps, model(tokens).logits) < 1e-9
