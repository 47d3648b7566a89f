"""Configuration dataclasses for the TTT-as-linear-attention layer and the language model.

They double as OmegaConf structured configs: `OmegaConf.structured(LMConfig)` gives a typed schema,
so a YAML file or a dotlist override with an unknown key or a wrongly typed value fails at merge
time. Value checks that types cannot express live in `validate()`, and every error names the key
(`model.ttt.chunk_size=0 must be >= 1`) so the user knows which line of which file to change.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional

from omegaconf import OmegaConf

TTT_MODES = ("recurrent", "linear_attention")
# Earlier names of a mode, still read so that configs saved with checkpoints before the rename load.
RENAMED_TTT_MODES = {"parallel": "linear_attention"}
FAST_WEIGHT_SETS = ("all", "w1")
FEATURE_MAPS = ("swiglu", "identity")
NS_SCHEDULE_NAMES = ("lact", "classic")  # kernels.lact.NS_SCHEDULES
ROPE_LAYOUTS = ("half", "interleaved")
WINDOW_KERNELS = ("flex", "triton")  # LMConfig.window_kernel


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the offending key."""


def _require(condition: bool, key: str, value: object, why: str) -> None:
    if not condition:
        raise ConfigError(f"{key}={value!r} {why}")


@dataclass
class TTTConfig:
    """The fast-weight (LaCT) sequence layer.

    `mode="recurrent"` is the faithful LaCT inner loop (any fast-weight set, weight norm allowed);
    `mode="linear_attention"` is the chunk scan, exact only when W1 alone is fast and weight norm is off,
    which is why that combination is enforced here rather than silently ignored.
    A sequence whose length is not a multiple of `chunk_size` ends in a shorter final chunk.

    `mode` .. `weight_norm` keep the project's small parallel-first defaults (the parallel W1-only form
    kept LaCT's quality at equal size, docs/quality.md); the released layer as a whole is the preset
    `configs/model/lact_760m.yaml`. The fields after `use_kernel` reproduce the layer as released (a1600012888/LaCT, `lact_llm`:
    `ttt_operation.py` and `layer_lact_swiglu.py`) and default to what it does; each can be switched
    off to study it. They act on the per-token inputs and the output, so both modes offer them:
    * `rope`: RoPE on the TTT q/k after their L2 norm (released configs: `ttt_nope=False`), with
      the attention branch's tables (`model.rope_theta`, blocks of the attention head dim,
      positions absolute or restarting per packed document);
    * `ns_coefficients`: Muon's Newton-Schulz schedule, "lact" (five different (a, b, c), as
      released) or "classic" (3.4445, -4.7750, 2.0315) x 5; it iterates in the operand dtype (bf16
      under autocast, as released) after a Frobenius normalisation + 1e-7;
    * `output_scale`: the per-head gate silu(ttt_scale_proj(x)) on the normed TTT output
      (`learnable_ttt_scale=True` in every released config);
    * `qk_affine`: learnable per-channel scale and offset on q/k before the TTT branch's SiLU;
    * `w02_rank`: r > 0 makes the learned initial W0, W2 low-rank plus 0.5 I (W_left W_right + 0.5 I,
      rank 32 in the released configs); 0 keeps them full matrices (the released class default);
    * `l2_eps`, `weight_norm_eps`, `output_norm_eps`: x / (|x| + 1e-5) for the TTT q/k, weight
      norm W / (|W|_row + 1e-5) |W(0)|_row, and the per-head RMSNorm's 1e-5, as released;
    * `init_gain` 1.0 and `low_rank_init_gain` 0.5: std gain / sqrt(fan_in) of the full-rank fast
      weights and of the low-rank factors (std gain / sqrt(rank) and gain / sqrt(d)), as released.
      The learning-rate, momentum and output-scale heads start as every linear layer,
      normal(0, model.init_std); the learning-rate bias carries inv_softplus(base_lr), which the
      released code adds in its forward instead (same function; its bias = ours - inv_softplus(base_lr)).
    The two ladder simplifications (arXiv 2602.21204, Table 2) that change the layer's form:
    * `feature_map="identity"`: the fast weight is one linear layer, f(x) = W1 x (h(x) = x, dh = d,
      no W0/W2; needs `fast_weights="w1"`), "V3";
    * `per_token_lr=false`: one learned learning rate per head and weight instead of a projection of
      the token, "V4".
    """

    mode: str = "linear_attention"
    num_heads: int = 2
    inter_multi: float = 1.0  # dh = inter_multi * d (fast-weight MLP hidden size)
    chunk_size: int = 64
    fast_weights: str = "w1"  # "all": W0, W1, W2 are fast (recurrent only); "w1": W1 only
    momentum: bool = False
    muon: bool = False
    weight_norm: bool = False
    token_causal: bool = False  # add the intra-chunk causal term (linear_attention mode)
    update_sign: float = 1.0  # +1: gradient descent on -<f(k), v>; -1: gradient ascent
    base_lr: float = 1e-3  # softplus(bias) at init for the per-token learning rates
    use_kernel: bool = True  # allow the Triton kernels on CUDA (the public ops decide; TTTLA_KERNELS overrides)
    # The feature kernel's SwiGLU projections a, b [T, H, 2 dh] kept for its backward (faster) or recomputed
    # there (2 dh x 2 bytes less activation memory per token, head and input); kernels.features.SAVE_PROJECTIONS.
    save_feature_projections: bool = True
    # The linear-attention scan's features h(q), h(k) recomputed in its backward from q and k (with their
    # projections) instead of kept: 6 dh bytes less per token and head in bf16, two feature kernels more
    # per layer (kernels/feature_scan.py; the Triton path without packed documents or sequence parallelism).
    # On by default: at 125M/16K on an H100 it took the compiled step's peak from 11.64 to 9.96 GiB at the
    # same speed (docs/bench/trainer_125m_16k_compiled.md, Memory); elsewhere it does nothing.
    recompute_features: bool = True
    # The branch's q, k, v (silu, l2 norm and RoPE of the qkv projection the block keeps anyway) recomputed
    # in the compiled blocks' backward instead of kept: 3 d bytes x 2 less per token and head in bf16.
    # Only where the blocks are compiled (the partitioner recomputes them); eager blocks keep them.
    # On by default: with recompute_features, 9.62 GiB (1.16x the transformer's 8.32) for +0.7 % step time.
    recompute_inputs: bool = True
    rope: bool = True
    ns_coefficients: str = "lact"
    output_scale: bool = True
    qk_affine: bool = True
    w02_rank: int = 0
    l2_eps: float = 1e-5
    weight_norm_eps: float = 1e-5
    output_norm_eps: float = 1e-5
    init_gain: float = 1.0
    low_rank_init_gain: float = 0.5
    feature_map: str = "swiglu"
    per_token_lr: bool = True

    def __post_init__(self) -> None:
        """The earlier name `parallel` (which read like sequence parallelism, `parallel.sp`) becomes
        `linear_attention` with a warning, so a checkpoint's saved config still builds its model."""
        if self.mode in RENAMED_TTT_MODES:
            renamed = RENAMED_TTT_MODES[self.mode]
            warnings.warn(f"model.ttt.mode={self.mode} is now called model.ttt.mode={renamed}", stacklevel=2)
            self.mode = renamed

    def resolved_head_dim(self, hidden_size: int) -> int:
        """d: the TTT heads split the shared q/k/v projections, so d = hidden_size / num_heads."""
        return hidden_size // self.num_heads

    def resolved_inner_dim(self, hidden_size: int) -> int:
        """dh: the feature size; the identity feature map has none of its own (dh = d)."""
        if self.feature_map == "identity":
            return self.resolved_head_dim(hidden_size)
        return int(round(self.resolved_head_dim(hidden_size) * self.inter_multi))

    def validate(self, hidden_size: int, prefix: str = "model.ttt") -> None:
        _require(self.mode in TTT_MODES, f"{prefix}.mode", self.mode, f"must be one of {TTT_MODES}")
        _require(self.num_heads >= 1, f"{prefix}.num_heads", self.num_heads, "must be >= 1")
        _require(
            hidden_size % self.num_heads == 0,
            f"{prefix}.num_heads",
            self.num_heads,
            f"must divide model.hidden_size={hidden_size}",
        )
        _require(self.inter_multi > 0, f"{prefix}.inter_multi", self.inter_multi, "must be > 0")
        _require(self.chunk_size >= 1, f"{prefix}.chunk_size", self.chunk_size, "must be >= 1")
        _require(
            self.fast_weights in FAST_WEIGHT_SETS,
            f"{prefix}.fast_weights",
            self.fast_weights,
            f"must be one of {FAST_WEIGHT_SETS}",
        )
        _require(self.update_sign in (1.0, -1.0), f"{prefix}.update_sign", self.update_sign, "must be +1 or -1")
        _require(self.base_lr > 0, f"{prefix}.base_lr", self.base_lr, "must be > 0")
        _require(self.init_gain > 0, f"{prefix}.init_gain", self.init_gain, "must be > 0")
        _require(self.low_rank_init_gain > 0, f"{prefix}.low_rank_init_gain", self.low_rank_init_gain, "must be > 0")
        _require(
            self.ns_coefficients in NS_SCHEDULE_NAMES,
            f"{prefix}.ns_coefficients",
            self.ns_coefficients,
            f"must be one of {NS_SCHEDULE_NAMES}",
        )
        _require(self.w02_rank >= 0, f"{prefix}.w02_rank", self.w02_rank, "must be >= 0 (0: full-rank W0/W2)")
        for key in ("l2_eps", "weight_norm_eps", "output_norm_eps"):
            _require(getattr(self, key) >= 0, f"{prefix}.{key}", getattr(self, key), "must be >= 0")
        _require(self.output_norm_eps > 0, f"{prefix}.output_norm_eps", self.output_norm_eps, "must be > 0")
        _require(
            self.feature_map in FEATURE_MAPS, f"{prefix}.feature_map", self.feature_map, f"must be one of {FEATURE_MAPS}"
        )
        self._validate_combinations(prefix)

    def _validate_combinations(self, prefix: str) -> None:
        """What the feature map and the mode allow of the other options."""
        if self.feature_map == "identity":
            _require(
                self.fast_weights == "w1",
                f"{prefix}.fast_weights",
                self.fast_weights,
                f"must be 'w1' when {prefix}.feature_map='identity' (a single linear fast layer has no W0/W2)",
            )
            _require(
                self.w02_rank == 0,
                f"{prefix}.w02_rank",
                self.w02_rank,
                f"must be 0 when {prefix}.feature_map='identity' (there is no W0/W2)",
            )
        if self.mode == "linear_attention":
            _require(
                self.fast_weights == "w1",
                f"{prefix}.fast_weights",
                self.fast_weights,
                f"must be 'w1' when {prefix}.mode='linear_attention' (W0/W2 updates make the features "
                f"state-dependent; use {prefix}.mode=recurrent)",
            )
            _require(
                not self.weight_norm,
                f"{prefix}.weight_norm",
                self.weight_norm,
                f"must be false when {prefix}.mode='linear_attention' (weight norm breaks the prefix sum; "
                f"use {prefix}.mode=recurrent)",
            )
        else:
            _require(
                not self.token_causal,
                f"{prefix}.token_causal",
                self.token_causal,
                f"is only defined for {prefix}.mode='linear_attention' (LaCT's recurrent form is block-causal)",
            )


@dataclass
class LMConfig:
    """The language model: embeddings, `num_layers` hybrid blocks, final norm, output head."""

    vocab_size: int = 256
    hidden_size: int = 128
    num_layers: int = 2
    mlp_hidden_size: Optional[int] = None  # defaults to the SwiGLU 8/3 rule, rounded up to 64
    num_attn_heads: int = 4
    window_size: int = 64  # sliding-window attention; 0 turns the attention branch off
    # The window's GPU kernel: FlexAttention over a block mask (flex), or kernels.window_attention (triton).
    # Elsewhere (CPU, float64) the blockwise SDPA band runs either way.
    window_kernel: str = "flex"
    rope_theta: float = 1e6  # the released LaCT configs' theta, shared by the attention branch and the TTT q/k
    rope_layout: str = "half"  # pairs (i, i + D/2) as fla's RotaryEmbedding in the released code; "interleaved": (2i, 2i+1)
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    init_std: float = 0.02
    ttt: TTTConfig = field(default_factory=TTTConfig)

    def resolved_mlp_hidden_size(self) -> int:
        if self.mlp_hidden_size is not None:
            return self.mlp_hidden_size
        return 64 * ((8 * self.hidden_size // 3 + 63) // 64)

    def validate(self, prefix: str = "model") -> "LMConfig":
        _require(self.vocab_size >= 2, f"{prefix}.vocab_size", self.vocab_size, "must be >= 2")
        _require(self.hidden_size >= 1, f"{prefix}.hidden_size", self.hidden_size, "must be >= 1")
        _require(self.num_layers >= 1, f"{prefix}.num_layers", self.num_layers, "must be >= 1")
        _require(self.window_size >= 0, f"{prefix}.window_size", self.window_size, "must be >= 0 (0 disables it)")
        _require(self.window_kernel in WINDOW_KERNELS, f"{prefix}.window_kernel", self.window_kernel,
                 f"must be one of {WINDOW_KERNELS}")
        _require(self.rope_layout in ROPE_LAYOUTS, f"{prefix}.rope_layout", self.rope_layout, f"must be one of {ROPE_LAYOUTS}")
        if self.window_size > 0 or self.ttt.rope:
            _require(self.num_attn_heads >= 1, f"{prefix}.num_attn_heads", self.num_attn_heads, "must be >= 1")
            _require(
                self.hidden_size % self.num_attn_heads == 0,
                f"{prefix}.num_attn_heads",
                self.num_attn_heads,
                f"must divide {prefix}.hidden_size={self.hidden_size}",
            )
            _require(
                (self.hidden_size // self.num_attn_heads) % 2 == 0,
                f"{prefix}.num_attn_heads",
                self.num_attn_heads,
                f"must leave an even attention head dim for RoPE ({prefix}.hidden_size={self.hidden_size}; "
                f"the TTT q/k use the same RoPE blocks when {prefix}.ttt.rope=true)",
            )
        if self.window_size == 0 and not self.ttt.token_causal:
            raise ConfigError(
                f"{prefix}.window_size=0 with {prefix}.ttt.token_causal=false leaves tokens blind to their "
                f"own chunk; set {prefix}.ttt.token_causal=true (linear_attention mode) or a positive window"
            )
        if self.mlp_hidden_size is not None:
            _require(self.mlp_hidden_size >= 1, f"{prefix}.mlp_hidden_size", self.mlp_hidden_size, "must be >= 1")
        _require(self.norm_eps > 0, f"{prefix}.norm_eps", self.norm_eps, "must be > 0")
        _require(self.init_std > 0, f"{prefix}.init_std", self.init_std, "must be > 0")
        self.ttt.validate(self.hidden_size, prefix=f"{prefix}.ttt")
        return self


def load_model_config(path: str, overrides: Optional[list[str]] = None) -> LMConfig:
    """A model YAML merged onto the LMConfig schema with dotlist overrides, then validated.

    Unknown keys and wrongly typed values fail inside OmegaConf.merge, naming the key.
    """
    merged = OmegaConf.merge(OmegaConf.structured(LMConfig), OmegaConf.load(path), OmegaConf.from_dotlist(overrides or []))
    cfg: LMConfig = OmegaConf.to_object(merged)
    return cfg.validate()
