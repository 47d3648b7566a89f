"""Training FLOPs per token, counted term by term, and model FLOPs utilisation (MFU).

A training step costs three forwards (forward + backward at twice the forward), so every forward
count below is multiplied by 3. Recomputation under activation checkpointing is not counted (MFU
measures useful work). Per token and layer, with hidden D, attention window W, TTT heads H of
d = D/H with fast-weight hidden dh, chunk C:

* dense matmuls: 2 FLOPs per weight of every Linear (q/k/v, lr and momentum heads, output, MLP)
  plus the output head (vocab x D, tied or not: the logits are computed either way);
* sliding-window attention: q.k and p.v over the keys a token sees, 2 * 2 * D * keys, where
  keys = min(position + 1, W) averaged over the sequence;
* TTT, `recurrent` (LaCT, all three fast weights): per head 18 * d * dh: key forward through
  W0, W2 (4), the gradients of W0, W1, W2 and of h (8), the query forward through W0, W2, W1 (6);
* TTT, `parallel` (W1 only): per head 12 * d * dh: features of q and k (4 + 4), the chunk update
  V^T diag(eta) h(K) (2) and the apply S h(q) (2); `token_causal` adds the intra-chunk term
  h(q).h(k) and its weighted sum of values over C/2 keys on average, 2 * (C/2) * (dh + d).
Muon's Newton-Schulz iterations and momentum run once per chunk, not per token, and are left out.
"""

from __future__ import annotations

from typing import Optional

import torch

from model.config import LMConfig

TRAINING_MULTIPLIER = 3
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}
DEFAULT_CUDA_PEAK_TFLOPS = 989.0


def dense_weights_per_layer(cfg: LMConfig) -> int:
    hidden, ttt = cfg.hidden_size, cfg.ttt
    qkv_and_output = 4 * hidden * hidden
    per_token_heads = (3 if ttt.per_token_lr else 0) + (1 if ttt.momentum else 0) + (1 if ttt.output_scale else 0)
    learning_rate_heads = hidden * ttt.num_heads * per_token_heads  # lr, momentum and output-scale projections
    mlp = 3 * hidden * cfg.resolved_mlp_hidden_size()
    return qkv_and_output + learning_rate_heads + mlp


def mean_attended_keys(window: int, seq_len: int) -> float:
    """Average over positions t < seq_len of min(t + 1, window)."""
    if window <= 0:
        return 0.0
    inside = min(window, seq_len)
    return (inside * (inside + 1) / 2 + (seq_len - inside) * window) / seq_len


def ttt_forward_flops_per_head(cfg: LMConfig) -> float:
    ttt = cfg.ttt
    d, dh = ttt.resolved_head_dim(cfg.hidden_size), ttt.resolved_inner_dim(cfg.hidden_size)
    if ttt.mode == "recurrent":
        return 18.0 * d * dh
    intra_chunk = 2 * (ttt.chunk_size / 2) * (dh + d) if ttt.token_causal else 0.0
    return 12.0 * d * dh + intra_chunk


def forward_flops_per_token(cfg: LMConfig, seq_len: int) -> float:
    """Forward FLOPs of one token in a sequence of `seq_len` tokens."""
    attention = 4.0 * cfg.hidden_size * mean_attended_keys(cfg.window_size, seq_len)
    ttt = cfg.ttt.num_heads * ttt_forward_flops_per_head(cfg)
    per_layer = 2.0 * dense_weights_per_layer(cfg) + attention + ttt
    return cfg.num_layers * per_layer + 2.0 * cfg.vocab_size * cfg.hidden_size


def baseline_forward_flops_per_token(cfg: LMConfig, seq_len: int) -> float:
    """The same count for `model.baseline.BaselineLM`: q/k/v/o and the MLP, full causal attention over
    (seq_len + 1) / 2 keys on average, and the head."""
    hidden = cfg.hidden_size
    dense = 4 * hidden * hidden + 3 * hidden * cfg.resolved_mlp_hidden_size()
    attention = 4.0 * hidden * mean_attended_keys(seq_len, seq_len)
    return cfg.num_layers * (2.0 * dense + attention) + 2.0 * cfg.vocab_size * hidden


def training_flops_per_token(cfg: LMConfig, seq_len: int) -> float:
    return TRAINING_MULTIPLIER * forward_flops_per_token(cfg, seq_len)


def peak_flops_per_device(configured_tflops: Optional[float], device: torch.device) -> Optional[float]:
    """The configured peak, else a table lookup by CUDA device name (bf16 dense); None on CPU."""
    if configured_tflops is not None:
        return configured_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    matches = [tflops for key, tflops in PEAK_BF16_TFLOPS.items() if key in name]
    return (matches[0] if matches else DEFAULT_CUDA_PEAK_TFLOPS) * 1e12
