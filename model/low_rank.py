"""Low-rank learned initial fast weights, as the released LaCT language models use for W0 and W2.

W(0) = W_left W_right + 0.5 I per head ([H, rows, cols]): the initial weights cost 2 r (rows + cols)
parameters instead of rows x cols, while the fast weights the chunks update stay full matrices.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LowRankFastWeight(nn.Module):
    """W = W_left @ W_right + 0.5 I: [H, rows, r] @ [H, r, cols] -> [H, rows, cols] (I: rectangular identity)."""

    def __init__(self, heads: int, rows: int, cols: int, rank: int, gain: float) -> None:
        super().__init__()
        self.gain = gain
        self.w_left = nn.Parameter(torch.empty(heads, rows, rank))
        self.w_right = nn.Parameter(torch.empty(heads, rank, cols))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """std gain / sqrt(rank) and gain / sqrt(cols) for the two factors (as released, gain 0.5)."""
        nn.init.normal_(self.w_left, std=self.gain / math.sqrt(self.w_left.shape[-1]))
        nn.init.normal_(self.w_right, std=self.gain / math.sqrt(self.w_right.shape[-1]))

    def forward(self) -> torch.Tensor:
        rows, cols = self.w_left.shape[1], self.w_right.shape[2]
        eye = torch.eye(rows, cols, dtype=self.w_left.dtype, device=self.w_left.device)
        return self.w_left @ self.w_right + 0.5 * eye
