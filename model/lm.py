"""The language model: embeddings, N blocks of [RMSNorm -> TTT mixer -> RMSNorm -> SwiGLU MLP], final norm, head.

Read top to bottom: `Block` is one residual block, `TTTLM` stacks them. The model never knows how it is
parallelised: it takes per-layer fast-weight states in and gives them out, and callers (decoding,
sequence parallelism) decide what to carry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from kernels.fast_weights import FastWeights
from model.config import LMConfig
from model.layers import RMSNorm, SwiGLUMLP
from model.loss import head_and_loss
from model.segments import DocumentSegments
from model.swa import flex_attention, window_block_mask
from model.ttt_layer import TTTMixer


@dataclass
class LMOutput:
    logits: Optional[torch.Tensor]  # [B, T, V]; None when only the loss was asked for
    loss: Optional[torch.Tensor]  # mean cross-entropy over targets != model.loss.IGNORE_INDEX
    loss_sum: Optional[torch.Tensor]  # summed cross-entropy (exact averaging across sequence shards)
    num_targets: Optional[torch.Tensor]  # how many targets entered loss_sum
    states: list[FastWeights]  # fast weights after the sequence, one per layer


class Block(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.mixer_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mixer = TTTMixer(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = SwiGLUMLP(cfg.hidden_size, cfg.resolved_mlp_hidden_size())

    def forward(
        self, x: torch.Tensor, state: Optional[FastWeights], position_offset: int,
        segments: Optional[DocumentSegments] = None, window_mask: Optional[Any] = None,
    ) -> tuple[torch.Tensor, FastWeights]:
        mixed, new_state = self.mixer(self.mixer_norm(x), state, position_offset, segments, window_mask)
        x = x + mixed
        return x + self.mlp(self.mlp_norm(x)), new_state


class TTTLM(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.reset_parameters()

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
        position_offset: int = 0,
        return_logits: bool = True,
        doc_ids: Optional[torch.Tensor] = None,
    ) -> LMOutput:
        """input_ids, targets: [B, T] (targets[t] is the token after input_ids[t]; IGNORE_INDEX masks).

        doc_ids [B, T] (optional): the document of every token when documents are packed into rows;
        each document then starts from the learned initial fast weights and attends only to itself.
        """
        segments = None if doc_ids is None else DocumentSegments.from_doc_ids(doc_ids)
        x = self.embed(input_ids)
        window_mask = self.window_mask(input_ids, doc_ids)
        new_states = []
        for i, block in enumerate(self.blocks):
            x, state = block(x, None if states is None else states[i], position_offset, segments, window_mask)
            new_states.append(state)
        logits, loss_sum, num_targets = head_and_loss(self.final_norm(x), self.output_weight(), targets, return_logits)
        loss = None if loss_sum is None else loss_sum / num_targets.clamp(min=1)
        return LMOutput(logits, loss, loss_sum, num_targets, new_states)

    def window_mask(self, input_ids: torch.Tensor, doc_ids: Optional[torch.Tensor]) -> Optional[Any]:
        """The sliding-window block mask every layer shares, built once per forward where FlexAttention
        runs (CUDA); None elsewhere (the blockwise path needs none)."""
        if self.cfg.window_size <= 0 or not input_ids.is_cuda or flex_attention is None:
            return None
        return window_block_mask(input_ids.shape[1], self.cfg.window_size, input_ids.device, doc_ids)


def count_parameters(model: nn.Module, include_embeddings: bool = True) -> int:
    """Trainable parameters; tied weights are counted once (nn.Module.parameters() deduplicates them)."""
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if not include_embeddings and isinstance(model, TTTLM):
        total -= model.embed.weight.numel()
    return total
