"""The language model: embeddings, N blocks of [RMSNorm -> TTT mixer -> RMSNorm -> SwiGLU MLP], final norm, head.

Read top to bottom: `Block` is one residual block, `TTTLM` stacks them. The model never knows how it is
parallelised: it takes per-layer fast-weight states in and gives them out, and callers (decoding,
sequence parallelism) decide what to carry. What they change goes through named seams, not copies:
each mixer's scan and window strategies (`TTTMixer.set_strategies`), and the LM's `rows` (`WholeRows`:
which token rows run through the blocks, which the head reads). Training, sequence parallelism and
decoding run the same `Block.forward` and the same layer loop (`TTTLM.hidden_states`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from kernels.fast_weights import FastWeights
from model.config import LMConfig
from model.layers import FUSED_TABLE_POSITIONS, RMSNorm, RotaryTables, SwiGLUMLP, shared_rotary_tables
from model.loss import head_and_loss
from model.segments import DocumentSegments
from model.swa import flex_attention, window_block_mask
from model.ttt_layer import TTTMixer, token_positions


@dataclass
class LMOutput:
    logits: Optional[torch.Tensor]  # [B, T, V]; None when only the loss was asked for
    loss: Optional[torch.Tensor]  # mean cross-entropy over targets != model.loss.IGNORE_INDEX
    loss_sum: Optional[torch.Tensor]  # summed cross-entropy (exact averaging across sequence shards)
    num_targets: Optional[torch.Tensor]  # how many targets entered loss_sum
    states: list[FastWeights]  # fast weights after the sequence, one per layer


class WholeRows:
    """The LM's row layout (`TTTLM.rows`): which token rows run through the blocks, and which of the
    hidden rows the head and the loss read.

    This one, the default, computes exactly the rows it is given and the head reads them all. With
    a sequence split across sp ranks (parallel/sequence_parallel.py) a rank computes the chunks that
    start in its slice, borrowing ids from the next rank, and hands those rows back before the head.
    """

    def computed_ids(
        self, input_ids: torch.Tensor, position_offset: Union[int, torch.Tensor], doc_ids: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Union[int, torch.Tensor]]:
        """The ids [B, T] a caller passed -> the ids [B, T'] this process runs, and their first position."""
        return input_ids, position_offset

    def head_rows(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden rows [B, T', D] after the last block -> the rows [B, T, D] of the caller's ids."""
        return hidden


class Block(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.mixer_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mixer = TTTMixer(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = SwiGLUMLP(cfg.hidden_size, cfg.resolved_mlp_hidden_size())

    def forward(
        self, x: torch.Tensor, state: Optional[FastWeights], position_offset: Union[int, torch.Tensor],
        segments: Optional[DocumentSegments] = None, window_mask: Optional[Any] = None,
        rope: Optional[RotaryTables] = None,
    ) -> tuple[torch.Tensor, FastWeights]:
        """x [B, T, D] -> (x [B, T, D], the mixer's state after the rows): the one residual block of
        training, sequence parallelism and decoding (they differ in the mixer's strategies only)."""
        mixed, new_state = self.mixer(self.mixer_norm(x), state, position_offset, segments, window_mask, rope)
        x = x + mixed
        return x + self.mlp(self.mlp_norm(x)), new_state


BlockCall = Callable[..., tuple[torch.Tensor, FastWeights]]  # (block, x, state, position_offset, segments, window_mask, rope)


class TTTLM(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rows = WholeRows()
        self.loss_backend: Optional[str] = None  # compiles the loss's elementwise work (train.compile sets it)
        self.reset_parameters()

    def set_rows(self, rows: WholeRows) -> None:
        """The row layout from the next call on (`WholeRows`); sequence parallelism sets it once when it
        wraps the model. A plain attribute: the state dict is the same whichever is set."""
        self.rows = rows

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=self.cfg.init_std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for block in self.blocks:
            block.mixer.reset_ttt_parameters()

    def output_weight(self) -> torch.Tensor:
        return self.embed.weight if self.head is None else self.head.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: Optional[torch.Tensor] = None,
        states: Optional[list[FastWeights]] = None,
        position_offset: Union[int, torch.Tensor] = 0,
        return_logits: bool = True,
        doc_ids: Optional[torch.Tensor] = None,
    ) -> LMOutput:
        """input_ids, targets: [B, T] (targets[t] is the token after input_ids[t]; IGNORE_INDEX masks).

        position_offset: the absolute position of input_ids[:, 0], an int or [B] per row.
        doc_ids [B, T] (optional): the document of every token when documents are packed into rows;
        each document then starts from the learned initial fast weights and attends only to itself.
        The blocks run the rows `self.rows` picks, and the head reads the rows it hands back.
        """
        input_ids, position_offset = self.rows.computed_ids(input_ids, position_offset, doc_ids)
        hidden, new_states = self.hidden_states(input_ids, states, position_offset, doc_ids)
        hidden = self.final_norm(self.rows.head_rows(hidden))
        logits, loss_sum, num_targets = head_and_loss(hidden, self.output_weight(), targets, return_logits, self.loss_backend)
        loss = None if loss_sum is None else loss_sum / num_targets.clamp(min=1)
        return LMOutput(logits, loss, loss_sum, num_targets, new_states)

    def hidden_states(
        self, input_ids: torch.Tensor, states: Optional[list[FastWeights]] = None,
        position_offset: Union[int, torch.Tensor] = 0, doc_ids: Optional[torch.Tensor] = None,
        call_block: Optional[BlockCall] = None,
    ) -> tuple[torch.Tensor, list[FastWeights]]:
        """The embedding and the layer loop: ids [B, T] -> (hidden [B, T, D] before the final norm, each
        layer's state after the rows). `states` are what each layer's scan strategy starts from.

        `call_block(block, x, state, position_offset, segments, window_mask, rope)` runs each block; None calls
        the module (its `Module.compile` form where the trainer compiled it). Decoding passes `Block.forward`
        or its own compiled step (`decoding.compiled`): its strategies hold per-token state that the
        training graph was not traced with.
        """
        segments = None if doc_ids is None else DocumentSegments.from_doc_ids(doc_ids)
        x = self.embed(input_ids)
        window_mask = self.window_mask(input_ids, doc_ids)
        rope = self.rotary_tables(x, position_offset, segments)
        new_states = []
        for i, block in enumerate(self.blocks):
            state = None if states is None else states[i]
            if call_block is None:
                x, state = block(x, state, position_offset, segments, window_mask, rope)
            else:
                x, state = call_block(block, x, state, position_offset, segments, window_mask, rope)
            new_states.append(state)
        return x, new_states

    def rotary_tables(
        self, x: torch.Tensor, position_offset: Union[int, torch.Tensor], segments: Optional[DocumentSegments]
    ) -> Optional[RotaryTables]:
        """The RoPE tables every layer rotates its heads with (`model.layers.RotaryTables`), built once
        per forward for the embedded rows x [B, T, D]; None where no layer rotates (no window, no RoPE
        on the fast-weight branch) or each block builds its own (a few positions a row)."""
        cfg = self.cfg
        seq_len = x.shape[1]
        if (cfg.window_size <= 0 and not cfg.ttt.rope) or seq_len <= FUSED_TABLE_POSITIONS:
            return None
        positions = token_positions(position_offset, seq_len, segments)
        if positions is None:
            positions = torch.arange(position_offset, position_offset + seq_len, device=x.device)
        return shared_rotary_tables(positions, cfg.hidden_size // cfg.num_attn_heads, cfg.rope_theta, x.dtype)

    def window_mask(self, input_ids: torch.Tensor, doc_ids: Optional[torch.Tensor]) -> Optional[Any]:
        """The sliding-window block mask every layer shares, built once per forward where FlexAttention
        runs (CUDA) and the mixers' window strategies read it; None elsewhere (the blockwise path needs
        none; a halo exchange or a decoder attends over keys of its own)."""
        if self.cfg.window_size <= 0 or self.cfg.window_kernel != "flex" or not input_ids.is_cuda or flex_attention is None:
            return None
        if not any(block.mixer.window.reads_window_mask for block in self.blocks):
            return None
        return window_block_mask(input_ids.shape[1], self.cfg.window_size, input_ids.device, doc_ids)


def count_parameters(model: nn.Module, include_embeddings: bool = True) -> int:
    """Trainable parameters; tied weights are counted once (nn.Module.parameters() deduplicates them)."""
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if not include_embeddings and isinstance(model, TTTLM):
        total -= model.embed.weight.numel()
    return total
