"""Proof 6: bad configuration values fail with an error that names the key."""

from __future__ import annotations

import pytest
import torch
from omegaconf.errors import ConfigKeyError, ValidationError

from model.config import ConfigError, LMConfig, TTTConfig, load_model_config
from model.lm import TTTLM, count_parameters


@pytest.mark.parametrize(
    "overrides,key",
    [
        (dict(ttt=TTTConfig(chunk_size=0)), "model.ttt.chunk_size"),
        (dict(ttt=TTTConfig(mode="sideways")), "model.ttt.mode"),
        (dict(ttt=TTTConfig(num_heads=3)), "model.ttt.num_heads"),
        (dict(ttt=TTTConfig(mode="linear_attention", fast_weights="all")), "model.ttt.fast_weights"),
        (dict(ttt=TTTConfig(mode="linear_attention", weight_norm=True)), "model.ttt.weight_norm"),
        (dict(ttt=TTTConfig(mode="recurrent", token_causal=True)), "model.ttt.token_causal"),
        (dict(ttt=TTTConfig(ns_coefficients="quintic")), "model.ttt.ns_coefficients"),
        (dict(ttt=TTTConfig(w02_rank=-1)), "model.ttt.w02_rank"),
        (dict(ttt=TTTConfig(feature_map="relu")), "model.ttt.feature_map"),
        (dict(ttt=TTTConfig(mode="recurrent", fast_weights="all", feature_map="identity")), "model.ttt.fast_weights"),
        (dict(ttt=TTTConfig(feature_map="identity", w02_rank=4)), "model.ttt.w02_rank"),
        (dict(ttt=TTTConfig(l2_eps=-1.0)), "model.ttt.l2_eps"),
        (dict(rope_layout="diagonal"), "model.rope_layout"),
        (dict(ttt=TTTConfig(update_sign=0.5)), "model.ttt.update_sign"),
        (dict(num_attn_heads=5), "model.num_attn_heads"),
        (dict(window_size=-1), "model.window_size"),
        (dict(window_size=0), "model.window_size"),
        (dict(vocab_size=1), "model.vocab_size"),
    ],
)
def test_invalid_value_names_its_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        TTTLM(LMConfig(**overrides))


def test_unknown_yaml_key_is_rejected(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text("hidden_size: 64\nttt:\n  chunk_sz: 32\n")
    with pytest.raises(ConfigKeyError, match="chunk_sz"):
        load_model_config(str(path))


def test_wrong_type_in_override_is_rejected():
    with pytest.raises(ValidationError, match="chunk_size"):
        load_model_config("configs/model/tiny.yaml", ["ttt.chunk_size=big"])


@pytest.mark.parametrize("name", ["tiny", "125m", "350m", "760m", "1.3b"])
def test_shipped_model_configs_are_valid(name):
    cfg = load_model_config(f"configs/model/{name}.yaml")
    assert cfg.ttt.chunk_size >= 1


def test_chunk_remainder_is_handled_not_rejected():
    """A sequence length that the chunk size does not divide ends in a shorter chunk (documented)."""
    import torch

    model = TTTLM(LMConfig(ttt=TTTConfig(chunk_size=16)))
    out = model(torch.randint(0, 256, (1, 21)))
    assert out.logits.shape == (1, 21, 256) and torch.isfinite(out.logits).all()


@pytest.mark.parametrize(
    "path,released",
    # The released LaCT models' counts, from their config files and code (layer_lact_swiglu.py,
    # modeling_lact.py, fla's GatedMLP with intermediate size 256 * ceil(8 D / 3 / 256) and weight-only
    # RMSNorms): embeddings + untied head 2 * 32000 D, final norm D, and per layer 2 D (norms) + 4 D^2
    # (qkv, o_proj) + 2 * 4 * 2 * 32 * d (low-rank W0, W2) + 4 d^2 (W1) + 12 D + 12 (lr_proj)
    # + 4 D (qk scale, offset) + 2 * (4 D + 4) (ttt_scale_proj, momentum_proj) + d (ttt_norm) + 3 D M (MLP).
    [("configs/model/lact_760m.yaml", 797_625_312), ("configs/model/lact_3b.yaml", 2_982_516_192)],
)
def test_released_presets_have_the_released_parameter_count(path: str, released: int) -> None:
    with torch.device("meta"):
        model = TTTLM(load_model_config(path))
    assert count_parameters(model) == released


def test_the_earlier_mode_name_still_loads_with_a_warning():
    """Configs saved with checkpoints before the rename say mode=parallel; they build the same model."""
    with pytest.warns(UserWarning, match="model.ttt.mode=parallel is now called model.ttt.mode=linear_attention"):
        assert TTTConfig(mode="parallel").mode == "linear_attention"
    with pytest.warns(UserWarning):
        assert load_model_config("configs/model/tiny.yaml", ["ttt.mode=parallel"]).ttt.mode == "linear_attention"
