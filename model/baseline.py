"""The yardstick: a plain causal softmax-attention transformer of the same size as a TTTLM.

Same embeddings, RMSNorm, SwiGLU MLP and rotary tables as model/lm.py (imported, not copied); the
mixer is full causal SDPA over `num_attn_heads` heads instead of TTT + sliding window. It answers the
questions the TTT model is built for: how much quality does the constant-size state give up (train
/quality.py), and how does a KV cache that grows with the context compare at decode time
(benchmarks/decode.py, with decoding/kv_cache.py)?
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from model.config import LMConfig
from model.layers import RMSNorm, RotaryTables, SwiGLUMLP, apply_rotary, rotary_tables, shared_rotary_tables
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

    def heads_at(
        self, x: torch.Tensor, positions: "int | torch.Tensor", rope: Optional[RotaryTables] = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, D] at positions offset + t (an int offset) or `positions` [B, T] -> q, k (rotated), v as
        [B, A, T, Dh]; `rope`: those positions' tables where the LM built them for every layer."""
        batch, seq_len, _ = x.shape
        q, k, v = (t.reshape(batch, seq_len, self.heads, self.head_dim) for t in self.qkv(x).chunk(3, dim=-1))
        if rope is not None:
            cos, sin = rope.to(q.dtype)
        else:
            if isinstance(positions, int):
                positions = torch.arange(positions, positions + seq_len, device=x.device)
            cos, sin = rotary_tables(positions, self.head_dim, self.rope_theta, q.dtype)
        rotated = (apply_rotary(t, cos, sin, self.rope_layout).transpose(1, 2) for t in (q, k))
        return *rotated, v.transpose(1, 2)

    def forward(self, x: torch.Tensor, rope: Optional[RotaryTables] = None) -> torch.Tensor:
        q, k, v = self.heads_at(x, 0, rope)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, A, T, Dh]
        return self.o_proj(out.transpose(1, 2).flatten(2))


class BaselineBlock(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.mixer_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attention = CausalAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = SwiGLUMLP(cfg.hidden_size, cfg.resolved_mlp_hidden_size())

    def forward(self, x: torch.Tensor, rope: Optional[RotaryTables] = None) -> torch.Tensor:
        x = x + self.attention(self.mixer_norm(x), rope)
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
        self.loss_backend: Optional[str] = None  # compiles the loss's elementwise work (train.compile sets it)
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
        rope = self.rotary_tables(input_ids.shape[1])
        for block in self.blocks:
            x = block(x, rope)
        logits, loss_sum, num_targets = head_and_loss(self.final_norm(x), self.output_weight(), targets, return_logits, self.loss_backend)
        loss = None if loss_sum is None else loss_sum / num_targets.clamp(min=1)
        return LMOutput(logits, loss, loss_sum, num_targets, [])

    def rotary_tables(self, seq_len: int) -> Optional[RotaryTables]:
        """The RoPE tables of positions 0 .. seq_len - 1 in the embeddings' dtype, built once per forward
        for every layer, as `TTTLM.rotary_tables` builds its own."""
        weight = self.embed.weight
        positions = torch.arange(seq_len, device=weight.device)
        return shared_rotary_tables(positions, self.cfg.hidden_size // self.cfg.num_attn_heads, self.cfg.rope_theta, weight.dtype)

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
    def prefill(self, input_ids: torch.Tensor, capacity: int) -> tuple[torch.Tensor, KVCache]:
        """Equal-length prompts [B, P] -> (logits [B, P, V], their KV cache of `capacity` tokens, P filled);
        `decoding.kv_cache.StaticKVDecoder.around` decodes on from it."""
        batch, prompt_len = input_ids.shape
        if capacity < prompt_len:
            raise ValueError(f"capacity={capacity} must hold the prompt's {prompt_len} tokens")
        cache = self.empty_cache(batch, capacity)
        rope = self.rotary_tables(prompt_len)

        def attend(index: int, attention: CausalAttention, h: torch.Tensor) -> torch.Tensor:
            q, k, v = attention.heads_at(h, 0, rope)
            cache.keys[index, :, :, :prompt_len] = k
            cache.values[index, :, :, :prompt_len] = v
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        logits = self.decode_blocks(input_ids, attend)
        cache.length = prompt_len
        return logits, cache


Attend = Callable[[int, CausalAttention, torch.Tensor], torch.Tensor]
