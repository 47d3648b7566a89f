"""Shared test helpers: fresh random inputs for the layer's maths (float64 unless a test says otherwise)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.reference import FastWeights, num_chunks


@dataclass
class LayerInputs:
    q: torch.Tensor  # [B, T, H, d], L2-normalised as in the layer
    k: torch.Tensor
    v: torch.Tensor
    eta0: torch.Tensor  # [B, T, H]
    eta1: torch.Tensor
    eta2: torch.Tensor
    beta: torch.Tensor  # [B, N, H]
    weights: FastWeights  # initial fast weights, per sequence

    def tensors(self) -> list[torch.Tensor]:
        w = self.weights
        return [self.q, self.k, self.v, self.eta0, self.eta1, self.eta2, self.beta, w.w0, w.w1, w.w2]


def make_layer_inputs(
    batch: int, seq_len: int, heads: int, d: int, dh: int, chunk: int, *, dtype=torch.float64, seed: int | None = None
) -> LayerInputs:
    """Random inputs of the layer's real shapes and ranges (learning rates in (0, 0.5), decays in (0.05, 0.95))."""
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % (2**31))

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen, dtype=dtype)

    q, k = (F.normalize(randn(batch, seq_len, heads, d), dim=-1) for _ in range(2))
    v = randn(batch, seq_len, heads, d)
    etas = [0.5 * rand(batch, seq_len, heads) for _ in range(3)]
    beta = 0.05 + 0.9 * rand(batch, num_chunks(seq_len, chunk), heads)
    weights = FastWeights(
        w0=randn(batch, heads, dh, d) / math.sqrt(d),
        w1=randn(batch, heads, d, dh) / math.sqrt(dh),
        w2=randn(batch, heads, dh, d) / math.sqrt(d),
    )
    return LayerInputs(q, k, v, *etas, beta, weights)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||; NaN anywhere counts as a failure (inf)."""
    if not torch.isfinite(actual).all():
        return math.inf
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()
