"""The FLOP count behind MFU: its dense term equals the model's matmul weights, and each term
scales the way its docstring says."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from model.config import load_model_config
from model.lm import TTTLM
from train.flops import dense_weights_per_layer, forward_flops_per_token, mean_attended_keys, ttt_forward_flops_per_head

REPO = Path(__file__).resolve().parents[1]


def test_dense_term_counts_every_linear_weight_of_the_blocks() -> None:
    cfg = load_model_config(str(REPO / "configs/model/125m.yaml"))
    with torch.device("meta"):
        model = TTTLM(cfg)
    linear = sum(m.weight.numel() for block in model.blocks for m in block.modules() if isinstance(m, nn.Linear))
    assert dense_weights_per_layer(cfg) * cfg.num_layers == linear


def test_attended_keys_grow_then_saturate_at_the_window() -> None:
    assert mean_attended_keys(4, 4) == 2.5  # (1 + 2 + 3 + 4) / 4
    assert mean_attended_keys(4, 1_000_000) == pytest.approx(4, rel=1e-5)
    assert mean_attended_keys(0, 100) == 0.0


def test_lact_recurrent_layer_counts_18_d_dh_per_head() -> None:
    cfg = load_model_config(str(REPO / "configs/model/760m.yaml"))
    d = cfg.hidden_size // cfg.ttt.num_heads
    assert ttt_forward_flops_per_head(cfg) == 18 * d * d


def test_token_causal_adds_the_intra_chunk_term() -> None:
    cfg = load_model_config(str(REPO / "configs/model/tiny.yaml"))
    causal = replace(cfg, ttt=replace(cfg.ttt, token_causal=True))
    d = cfg.hidden_size // cfg.ttt.num_heads
    extra = forward_flops_per_token(causal, 256) - forward_flops_per_token(cfg, 256)
    assert extra == cfg.num_layers * cfg.ttt.num_heads * 2 * (cfg.ttt.chunk_size / 2) * (d + d)
