"""The partial chunk kept as its tokens' inputs, their gradient formed a block of tokens at a time.

A decoder can hold the partial chunk in one of two ways; both give the chunk update the same gradient,
G_i = sum over the chunk's tokens of eta_i,t * grad_{W_i} l_t at the weights entering the chunk
(`kernels.lact.chunk_gradients`), summed in a different order:

* **running sums** (`LayerCache.chunk_gradients`): every token adds its term as it arrives. A token
  step then reads and writes the [B, H, d, dh] gradient of every fast weight (fp32), which at large
  batches is most of what the fast-weight branch moves: 1.18 MB a row and layer for G1 alone at 125M,
  beside the 0.59 MB of W1 the token's output reads. Token-causal reads need it (they read W1 - G1).
* **pending tokens** (`PendingTokens`, here): every token writes its key, v (in the activations' dtype,
  so nothing is rounded) and its learning rates into its slot, position % P, and every P tokens
  (`fold_period`: `FOLD_TOKENS`, or C where that does not divide it) the P slots' gradient is formed
  as the training forward forms a chunk's (one batched product per weight) and added to the running
  sums, which the chunk update then reads. A token step reads only the fast weights its output needs.
  Where the gradient is formed as a chunk update (`forms_gradient_in_operand_dtype`) the key is kept
  as its features h(k), which the token step's read kernel forms beside h(q) from the W0, W2 tiles it
  loads anyway, so a fold is the update's outer products alone.

Pending tokens trade a heavier step every P tokens (the P tokens' gradient, about 75 MFLOP of outer
products a row and layer at 125M with P = 256, and one read and write of the running sums) for lighter
token steps, which is the right trade where throughput matters (large batches) and the wrong one at
batch 1, where a step's latency is what a user sees: `defers_chunk_gradients` chooses. Folding every
P tokens rather than once a chunk keeps the chunk-completing step near a token step's cost (formed
from all C = 2048 tokens at once it was 2.5x the median step at batch 64 on an H100: it reads every
slot, 4.8 GB over 12 layers) and the slots P/C the size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.fast_weights import PerSequenceTensors
from kernels.ttt_la import chunk_updates
from model.config import TTTConfig
from model.fast_weight_scan import FeatureMap

# The batch from which a decoder keeps pending tokens by default. Below it the chunk-completing step's
# extra work (forming the chunk's gradient) is a larger share of a launch-bound step, and its latency
# is what a user waits for; from it on the token steps' bytes dominate the throughput.
DEFER_FROM_BATCH = 8
# Pending tokens a decoder folds into the running sums at once: each fold is one chunk update of this many
# tokens (long enough for the tensor cores), and the slots hold this many tokens rather than a chunk.
FOLD_TOKENS = 256


@dataclass
class PendingTokens(PerSequenceTensors):
    """The inputs of the tokens since the last fold, slot position % P of each row (P = `fold_period`)."""

    k: torch.Tensor  # [B, P, H, d] the keys, or [B, P, H, dh] their features h(k) (`keys_as_features`); the activations' dtype
    v: torch.Tensor  # [B, P, H, d]
    etas: torch.Tensor  # [B, P, 3, H] the learning rates of W0, W1, W2, the state's dtype

    @staticmethod
    def zeros(batch: int, ttt: TTTConfig, heads: int, head_dim: int, feature_dim: int, dtype: torch.dtype,
              state_dtype: torch.dtype, device: torch.device) -> "PendingTokens":  # fmt: skip
        """Empty slots for `batch` rows: a fold reads its slots only once all P are written."""
        period = fold_period(ttt)
        key_dim = feature_dim if keys_as_features(ttt, dtype, device) else head_dim
        return PendingTokens(
            k=torch.zeros(batch, period, heads, key_dim, dtype=dtype, device=device),
            v=torch.zeros(batch, period, heads, head_dim, dtype=dtype, device=device),
            etas=torch.zeros(batch, period, 3, heads, dtype=state_dtype, device=device),
        )

    def write(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, etas: torch.Tensor) -> None:
        """Store the tokens at absolute `positions` [B, n] (any position per row, n <= P) in their slots:
        k [B, n, H, d] (or h(k) [B, n, H, dh] where `keys_as_features`), v [B, n, H, d], etas [B, n, 3, H].
        Fixed shapes, no host read (a decode step's write)."""
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        slots = positions % self.k.shape[1]
        self.k[rows, slots] = k.to(self.k.dtype)
        self.v[rows, slots] = v.to(self.v.dtype)
        self.etas[rows, slots] = etas.to(self.etas.dtype)


def forms_gradient_in_operand_dtype(ttt: TTTConfig, pending: PendingTokens) -> bool:
    """Whether the pending chunk's gradient is formed from its 16-bit tokens as they are
    (`w1_chunk_gradient`), so its slots hold the keys' features (`keys_as_features`)."""
    return keys_as_features(ttt, pending.v.dtype, pending.v.device)


def keys_as_features(ttt: TTTConfig, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether pending slots of `dtype` on `device` keep the keys as their features h(k), the gradient
    then formed as a chunk update of them (`w1_chunk_gradient`): with only W1 fast (the features do
    not change within the chunk), on CUDA in 16 bits (the products take fp32 accumulators there)."""
    return ttt.fast_weights == "w1" and torch.device(device).type == "cuda" and dtype in (torch.bfloat16, torch.float16)


def key_features(ttt: TTTConfig, pending: PendingTokens, k: torch.Tensor, features: FeatureMap,
                 feature_weights: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:  # fmt: skip
    """What `pending`'s slots keep of keys k [B, n, H, d]: their features where the gradient is formed
    as a chunk update (`forms_gradient_in_operand_dtype`, in k's dtype), the keys otherwise."""
    return features(k, *feature_weights).to(k.dtype) if forms_gradient_in_operand_dtype(ttt, pending) else k


def w1_chunk_gradient(hk: torch.Tensor, v: torch.Tensor, etas: torch.Tensor, allow_triton: bool = True) -> torch.Tensor:
    """G1 = -sum_t eta1_t v_t h(k_t)^T over the n tokens of every row (hk [B, n, H, dh], v [B, n, H, d] in
    16 bits, etas [B, n, 3, H]), [B, H, d, dh] fp32, formed as the training chunk form forms a chunk's
    update: each row's tokens as one chunk of the scan's update kernel (`kernels.ttt_la.chunk_updates`:
    eta1 v rounded to 16 bits, 16-bit products, fp32 accumulation), which reads them where they lie.

    In the state dtype (fp32) the same products run on CUDA cores: for a 2048-token chunk at batch 64
    and 12 layers they took 49.7 ms on an H100, against 3.2 ms for a token step; as batched products
    of permuted copies of the tokens, 13.9 ms."""
    tokens = v.shape[1]
    return -chunk_updates(v, hk, etas[:, :, 1], tokens, allow_triton)[:, 0]


def fold_period(ttt: TTTConfig) -> int:
    """P: how many tokens pending slots hold, folded into the running sums when all are written:
    `FOLD_TOKENS` where it divides the chunk (so a chunk's end is a fold's), the chunk otherwise."""
    chunk = ttt.chunk_size
    return FOLD_TOKENS if chunk % FOLD_TOKENS == 0 else chunk


def defers_chunk_gradients(ttt: TTTConfig, batch: int) -> bool:
    """Whether a decoder of `batch` rows keeps pending tokens rather than running sums by default:
    from `DEFER_FROM_BATCH` rows on, unless token-causal reads need the running W1 gradient."""
    return batch >= DEFER_FROM_BATCH and not ttt.token_causal
