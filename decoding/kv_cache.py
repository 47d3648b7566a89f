"""The transformer's decode step over a static KV cache: the yardstick `benchmarks.decode` sets beside
the TTT decoder, in the same protocol (`decoding.graphs`) and with the same compile setting.

Rows sit at their own positions [B] on the device, keys and values are written in place, and every
step attends over the cache's whole capacity with a length mask (SDPA's memory-efficient kernel on
CUDA takes the mask), so its shapes never change and a CUDA graph replays it; the cost is that of
the capacity, which the benchmark sets to the context it measures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from decoding.compiled import compiled
from model.baseline import BaselineLM, CausalAttention, KVCache


@dataclass
class StaticKVDecoder:
    """The transformer's decoding state (a fixed-capacity cache) and its in-place step."""

    model: BaselineLM
    cache: KVCache
    positions: torch.Tensor  # [B] int64
    host_positions: list[int]
    tokens: torch.Tensor  # [B] int64
    logits: torch.Tensor  # [B, V]
    step_backend: Optional[str] = None  # None: eager steps; else the whole step compiled by it

    @classmethod
    def around(cls, model: BaselineLM, cache: KVCache) -> "StaticKVDecoder":
        """A decoder continuing every row of `cache` at position cache.length."""
        batch, device = cache.keys.shape[1], cache.keys.device
        positions = torch.full((batch,), cache.length, dtype=torch.long, device=device)
        logits = torch.zeros(batch, model.cfg.vocab_size, dtype=cache.keys.dtype, device=device)
        return cls(model, cache, positions, [cache.length] * batch, torch.zeros_like(positions), logits)

    def compile_steps(self, backend: Optional[str] = "inductor") -> None:
        """Run the token step compiled by `backend` from now on (None: eagerly), as the TTT decoder does."""
        self.step_backend = backend

    def buffers(self) -> list[torch.Tensor]:
        return [self.cache.keys, self.cache.values, self.positions, self.tokens, self.logits]

    @torch.no_grad()
    def forward_token(self) -> None:
        """Consume `tokens` at `positions` -> `logits`; writes each row's key/value slot; advances `positions`."""
        step = token_step if self.step_backend is None else compiled(token_step, self.step_backend)
        step(self)

    def apply_chunk_updates(self) -> None:
        """Nothing: the transformer's state changes only by the key/value writes of `forward_token`."""

    def chunk_due(self) -> bool:
        return False

    def advance_host(self) -> None:
        self.host_positions = [p + 1 for p in self.host_positions]
        if max(self.host_positions) > self.cache.keys.shape[3]:
            raise ValueError(f"the KV cache holds {self.cache.keys.shape[3]} tokens: prefill with a larger capacity")

    def memory_bytes(self) -> int:
        return self.cache.memory_bytes()


def token_step(decoder: StaticKVDecoder) -> None:
    """One token per row through the transformer's blocks, each attending over the whole cache."""
    cache, capacity = decoder.cache, decoder.cache.keys.shape[3]
    positions = decoder.positions[:, None]  # [B, 1]
    rows = torch.arange(positions.shape[0], device=positions.device)[:, None]
    visible = (torch.arange(capacity, device=positions.device) <= positions)[:, None, None]  # [B, 1, 1, capacity]

    def attend(index: int, attention: CausalAttention, h: torch.Tensor) -> torch.Tensor:
        q, k, v = attention.heads_at(h, positions)  # [B, A, 1, Dh]
        cache.keys[index][rows, :, positions] = k.transpose(1, 2)  # target [B, 1, A, Dh]
        cache.values[index][rows, :, positions] = v.transpose(1, 2)
        return F.scaled_dot_product_attention(q, cache.keys[index], cache.values[index], attn_mask=visible)

    decoder.logits.copy_(decoder.model.decode_blocks(decoder.tokens[:, None], attend)[:, 0])
    decoder.positions += 1
