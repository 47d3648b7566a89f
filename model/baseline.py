"""The yardstick: a plain causal softmax-attention transformer of the same size as a TTTLM.

Same embeddings, RMSNorm, SwiGLU MLP and rotary tables as model/lm.py (imported, not copied); the
mixer is full causal SDPA over `num_attn_heads` heads instead of TTT + sliding window. It answers the
questions the TTT model is built for: how much quality does the constant-size state give up (train
/quality.py), and how does a KV cache that grows with the context compare at decode time
(benchmarks/decode.py)?
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from model.config import LMConfig
from model.layers import RMSNorm, SwiGLUMLP, apply_rotary, rotary_tables
from model.lm import LMOutput
from model.loss import head_and_loss


@dataclass
class KVCache:
    """Rotated keys and values of every layer: [L, B, A, capacity, Dh] each; `length` slots are filled."""

    keys: torch.Tensor
    values: torch.Tensor
    length: int

    def memory_bytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()


class CausalAttention(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.heads = cfg.num_attn_heads
        self.head_dim = cfg.hidden_size // cfg.num_attn_heads
        self.rope_theta = cfg.rope_theta
        self.rope_layout = cfg.rope_layout
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def heads_at(self, x: torch.Tensor, positions: "int | torch.Tensor") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, D] at positions offset + t (an int offset) or `positions` [B, T] -> q, k (rotated), v as [B, A, T, Dh]."""
        batch, seq_len, _ = x.shape
        q, k, v = (t.reshape(batch, seq_len, self.heads, self.head_dim) for t in self.qkv(x).chunk(3, dim=-1))
        if isinstance(positions, int):
            positions = torch.arange(positions, positions + seq_len, device=x.device)
        cos, sin = rotary_tables(positions, self.head_dim, self.rope_theta, q.dtype)
        rotated = (apply_rotary(t, cos, sin, self.rope_layout).transpose(1, 2) for t in (q, k))
        return *rotated, v.transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.heads_at(x, 0)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, A, T, Dh]
        return self.o_proj(out.transpose(1, 2).flatten(2))


class BaselineBlock(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.mixer_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attention = CausalAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = SwiGLUMLP(cfg.hidden_size, cfg.resolved_mlp_hidden_size())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.mixer_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class BaselineLM(nn.Module):
    """Embeddings, `num_layers` blocks of [RMSNorm -> causal SDPA -> RMSNorm -> SwiGLU], final norm, head.

    Reads the LMConfig of the TTT model it is compared with; the `ttt` section and `window_size` are unused.
    """

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(BaselineBlock(cfg) for _ in range(cfg.num_layers))
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=cfg.init_std)

    def output_weight(self) -> torch.Tensor:
        return self.embed.weight if self.head is None else self.head.weight

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.final_norm(x), self.output_weight())

    def forward(self, input_ids: torch.Tensor, targets: Optional[torch.Tensor] = None, return_logits: bool = True) -> LMOutput:
        """input_ids, targets: [B, T]; the same LMOutput as TTTLM (no states), with the same head and loss."""
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        logits, loss_sum, num_targets = head_and_loss(self.final_norm(x), self.output_weight(), targets, return_logits)
        loss = None if loss_sum is None else loss_sum / num_targets.clamp(min=1)
        return LMOutput(logits, loss, loss_sum, num_targets, [])

    def empty_cache(self, batch: int, capacity: int) -> KVCache:
        """A zeroed KV cache for `capacity` tokens: its memory is linear in the context, unlike TTT's state."""
        param = self.embed.weight
        shape = (self.cfg.num_layers, batch, self.cfg.num_attn_heads, capacity, self.cfg.hidden_size // self.cfg.num_attn_heads)
        return KVCache(torch.zeros(shape, dtype=param.dtype, device=param.device), torch.zeros(shape, dtype=param.dtype, device=param.device), 0)

    def decode_blocks(self, input_ids: torch.Tensor, attend: Attend) -> torch.Tensor:
        """The residual stack for decoding, the attention replaced by `attend(layer, attention, normed x)`
        -> [B, A, n, Dh] (which reads and writes a cache): ids [B, n] -> logits [B, n, V]."""
        x = self.embed(input_ids)
        for index, block in enumerate(self.blocks):
            out = attend(index, block.attention, block.mixer_norm(x))
            x = x + block.attention.o_proj(out.transpose(1, 2).flatten(2))
            x = x + block.mlp(block.mlp_norm(x))
        return self.logits(x)

    @torch.no_grad()
    def decode_step(self, token_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One token per sequence (token_ids [B]) at position cache.length, attending to the whole cache -> logits [B, V]."""
        position = cache.length

        def attend(index: int, attention: CausalAttention, h: torch.Tensor) -> torch.Tensor:
            q, k, v = attention.heads_at(h, position)
            cache.keys[index, :, :, position] = k[:, :, 0]
            cache.values[index, :, :, position] = v[:, :, 0]
            keys, values = cache.keys[index, :, :, : position + 1], cache.values[index, :, :, : position + 1]
            return F.scaled_dot_product_attention(q, keys, values)

        logits = self.decode_blocks(token_ids[:, None], attend)
        cache.length += 1
        return logits[:, 0]

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, capacity: int) -> tuple[torch.Tensor, "StaticKVDecoder"]:
        """Equal-length prompts [B, P] -> (logits [B, P, V], a static decoder whose cache holds `capacity` tokens)."""
        batch, prompt_len = input_ids.shape
        if capacity < prompt_len:
            raise ValueError(f"capacity={capacity} must hold the prompt's {prompt_len} tokens")
        cache = self.empty_cache(batch, capacity)

        def attend(index: int, attention: CausalAttention, h: torch.Tensor) -> torch.Tensor:
            q, k, v = attention.heads_at(h, 0)
            cache.keys[index, :, :, :prompt_len] = k
            cache.values[index, :, :, :prompt_len] = v
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        logits = self.decode_blocks(input_ids, attend)
        cache.length = prompt_len
        return logits, StaticKVDecoder.around(self, cache)


Attend = Callable[[int, CausalAttention, torch.Tensor], torch.Tensor]


@dataclass
class StaticKVDecoder:
    """The transformer's decode step over a fixed-capacity cache, in the shape a CUDA graph replays
    (the protocol of decoding/graphs.py): rows at their own positions [B] on the device, keys and
    values written in place, attention over the whole capacity with a length mask (SDPA's
    memory-efficient kernel on CUDA takes the mask; the cost is that of the capacity, which the
    benchmark sets to the context it measures)."""

    model: BaselineLM
    cache: KVCache
    positions: torch.Tensor  # [B] int64
    host_positions: list[int]
    tokens: torch.Tensor  # [B] int64
    logits: torch.Tensor  # [B, V]

    @classmethod
    def around(cls, model: BaselineLM, cache: KVCache) -> "StaticKVDecoder":
        """A decoder continuing every row of `cache` at position cache.length."""
        batch, device = cache.keys.shape[1], cache.keys.device
        positions = torch.full((batch,), cache.length, dtype=torch.long, device=device)
        logits = torch.zeros(batch, model.cfg.vocab_size, dtype=cache.keys.dtype, device=device)
        return cls(model, cache, positions, [cache.length] * batch, torch.zeros_like(positions), logits)

    def buffers(self) -> list[torch.Tensor]:
        return [self.cache.keys, self.cache.values, self.positions, self.tokens, self.logits]

    @torch.no_grad()
    def forward_token(self) -> None:
        """Consume `tokens` at `positions` -> `logits`; writes each row's key/value slot; advances `positions`."""
        capacity = self.cache.keys.shape[3]
        positions = self.positions[:, None]  # [B, 1]
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None]
        visible = (torch.arange(capacity, device=positions.device) <= positions)[:, None, None]  # [B, 1, 1, capacity]

        def attend(index: int, attention: CausalAttention, h: torch.Tensor) -> torch.Tensor:
            q, k, v = attention.heads_at(h, positions)  # [B, A, 1, Dh]
            self.cache.keys[index][rows, :, positions] = k.transpose(1, 2)  # target [B, 1, A, Dh]
            self.cache.values[index][rows, :, positions] = v.transpose(1, 2)
            return F.scaled_dot_product_attention(q, self.cache.keys[index], self.cache.values[index], attn_mask=visible)

        self.logits.copy_(self.model.decode_blocks(self.tokens[:, None], attend)[:, 0])
        self.positions += 1

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
