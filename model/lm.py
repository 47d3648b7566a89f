"""The language model: embeddings, N blocks of [RMSNorm -> TTT mixer -> RMSNorm -> SwiGLU MLP], final norm, head.

Read top to bottom: `Block` is one residual block, `TTTLM` stacks them. The model never knows how it is
parallelised: it takes per-layer fast-weight states in and gives them out, and callers (decoding,
sequence parallelism) decide what to carry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from kernels.reference import FastWeights
from model.config import LMConfig
from model.layers import RMSNorm, SwiGLUMLP
from model.segments import DocumentSegments
from model.ttt_layer import TTTMixer

IGNORE_INDEX = -100


@dataclass
class LMOutput:
    logits: Optional[torch.Tensor]  # [B, T, V]; None when only the loss was asked for
    loss: Optional[torch.Tensor]  # mean cross-entropy over targets != IGNORE_INDEX
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
        self, x: torch.Tensor, state: Optional[FastWeights], position_offset: int, segments: Optional[DocumentSegments] = None
    ) -> tuple[torch.Tensor, FastWeights]:
        mixed, new_state = self.mixer(self.mixer_norm(x), state, position_offset, segments)
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
        new_states = []
        for i, block in enumerate(self.blocks):
            x, state = block(x, None if states is None else states[i], position_offset, segments)
            new_states.append(state)
        logits = F.linear(self.final_norm(x), self.output_weight())
        loss = loss_sum = num_targets = None
        if targets is not None:
            loss_sum = F.cross_entropy(
                logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            )
            num_targets = (targets != IGNORE_INDEX).sum()
            loss = loss_sum / num_targets.clamp(min=1)
        return LMOutput(logits if return_logits else None, loss, loss_sum, num_targets, new_states)


def count_parameters(model: nn.Module, include_embeddings: bool = True) -> int:
    """Trainable parameters; tied weights are counted once (nn.Module.parameters() deduplicates them)."""
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if not include_embeddings and isinstance(model, TTTLM):
        total -= model.embed.weight.numel()
    return total
