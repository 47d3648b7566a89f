"""Next-token choice on the device: greedy, temperature and top-p, with no host read of the logits.

Sampling draws by the exponential race, argmax_i p_i / E_i with E_i ~ Exp(1) i.i.d., which picks i
with probability p_i / sum_j p_j. It needs only elementwise ops and an argmax, so a decode step that
samples stays one fixed-shape, capturable computation (torch.multinomial would not: it checks its
input on the host).
"""

from __future__ import annotations

from typing import Optional

import torch


def sample_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Next tokens [B] (int64) from logits [B, V]: argmax when temperature == 0, else nucleus sampling.

    Top-p keeps the smallest set of most likely tokens whose probability reaches `top_p` (the most
    likely token is always kept); the race over the kept tokens renormalises implicitly.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [B, V] fp32
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely tokens
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(before >= top_p, 0.0))
    race = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(torch.finfo(probs.dtype).tiny)
    return (probs / race).argmax(dim=-1)
