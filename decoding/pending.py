"""The partial chunk kept as its tokens' inputs, its gradient formed once when the chunk completes.

A decoder can hold the partial chunk in one of two ways; both give the chunk update the same gradient,
G_i = sum over the chunk's tokens of eta_i,t * grad_{W_i} l_t at the weights entering the chunk
(`kernels.lact.chunk_gradients`), summed in a different order:

* **running sums** (`LayerCache.chunk_gradients`): every token adds its term as it arrives. A token
  step then reads and writes the [B, H, d, dh] gradient of every fast weight (fp32), which at large
  batches is most of what the fast-weight branch moves: 1.18 MB a row and layer for G1 alone at 125M,
  beside the 0.59 MB of W1 the token's output reads. Token-causal reads need it (they read W1 - G1).
* **pending tokens** (`PendingTokens`, here): every token writes its key, v (in the activations' dtype,
  so nothing is rounded) and its learning rates into its slot, position % C, and the chunk's gradient
  is formed from all C of them at the chunk's end, as the training forward forms it (one batched
  product per weight). A token step reads only the fast weights its output needs. Where the gradient
  is formed as a chunk update (`forms_gradient_in_operand_dtype`) the key is kept as its features h(k),
  which the token step's read kernel forms beside h(q) from the W0, W2 tiles it loads anyway: the
  chunk-completing step is then the update's outer products alone (at batch 64 and 125M, forming the
  2048 tokens' features there was about 0.9 TFLOP and 7 GB of traffic over 12 layers).

Pending tokens trade a heavier chunk-completing step (the chunk's gradient: about 1.8 GFLOP a row and
layer at 125M with C = 2048, once every C steps) for lighter token steps, which is the right trade
where throughput matters (large batches) and the wrong one at batch 1, where the chunk-completing
step's latency is what a user sees: `defers_chunk_gradients` chooses.
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


@dataclass
class PendingTokens(PerSequenceTensors):
    """The inputs of the partial chunk's tokens, slot position % C of each row (C = `ttt.chunk_size`)."""

    k: torch.Tensor  # [B, C, H, d] the keys, or [B, C, H, dh] their features h(k) (`keys_as_features`); the activations' dtype
    v: torch.Tensor  # [B, C, H, d]
    etas: torch.Tensor  # [B, C, 3, H] the learning rates of W0, W1, W2, the state's dtype

    @staticmethod
    def zeros(batch: int, ttt: TTTConfig, heads: int, head_dim: int, feature_dim: int, dtype: torch.dtype,
              state_dtype: torch.dtype, device: torch.device) -> "PendingTokens":  # fmt: skip
        """Empty slots for `batch` rows: a chunk's update reads its slots only once all C are written."""
        chunk = ttt.chunk_size
        key_dim = feature_dim if keys_as_features(ttt, dtype, device) else head_dim
        return PendingTokens(
            k=torch.zeros(batch, chunk, heads, key_dim, dtype=dtype, device=device),
            v=torch.zeros(batch, chunk, heads, head_dim, dtype=dtype, device=device),
            etas=torch.zeros(batch, chunk, 3, heads, dtype=state_dtype, device=device),
        )

    def write(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, etas: torch.Tensor) -> None:
        """Store the tokens at absolute `positions` [B, n] (any position per row, n <= C) in their slots:
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


def w1_chunk_gradient(pending: PendingTokens, allow_triton: bool = True) -> torch.Tensor:
    """G1 = -sum_t eta1_t v_t h(k_t)^T over the C pending tokens of every row, [B, H, d, dh] fp32, formed
    from the slots' key features as the training chunk form forms a chunk's update: each row's one
    chunk of C tokens through the scan's update kernel (`kernels.ttt_la.chunk_updates`: eta1 v rounded
    to 16 bits, 16-bit products, fp32 accumulation), which reads the tokens where they lie.

    In the state dtype (fp32) the same products run on CUDA cores: at batch 64 and 12 layers they
    took 49.7 ms of a chunk-completing step on an H100, against 3.2 ms for a token step; as batched
    products of permuted copies of the tokens, 13.9 ms."""
    chunk = pending.v.shape[1]
    return -chunk_updates(pending.v, pending.k, pending.etas[:, :, 1], chunk, allow_triton)[:, 0]


def defers_chunk_gradients(ttt: TTTConfig, batch: int) -> bool:
    """Whether a decoder of `batch` rows keeps pending tokens rather than running sums by default:
    from `DEFER_FROM_BATCH` rows on, unless token-causal reads need the running W1 gradient."""
    return batch >= DEFER_FROM_BATCH and not ttt.token_causal
