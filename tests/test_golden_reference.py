"""The mixer, in every mode and option, equals the golden LaCT mixer (`tests/golden_lact.py`) end to end.

Compared in float64 from the mixer input x to its output, the final fast weights and momenta, and the
gradient of every parameter. The golden mixer shares no code with the layer, so agreement to 1e-10
(the forms differ only in summation order: ~1e-15, Newton-Schulz amplifying rounding by a few
orders) means the layer computes the released LaCT function, and any real slip (a dropped update, a
wrong axis, a swapped rate) shows up as an O(1e-3 .. 1) error. Sizes: T = 21 is not a multiple of
C = 8, d = 12 != dh = 18, and the RoPE blocks (attention head dim 8) straddle the TTT heads (d = 12).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from model.config import LMConfig, TTTConfig
from model.proof import relative_error
from model.ttt_layer import TTTMixer
from tests.golden_lact import golden_mixer

TOLERANCE = 1e-10

OFFICIAL = TTTConfig(
    mode="recurrent", num_heads=2, inter_multi=1.5, chunk_size=8, fast_weights="all", momentum=True, muon=True,
    weight_norm=True, w02_rank=3,
)  # fmt: skip: the released layer's options, at tiny size
PARALLEL = replace(OFFICIAL, mode="parallel", fast_weights="w1", weight_norm=False)

CASES = {
    "official": OFFICIAL,
    "official-full-rank-w0w2": replace(OFFICIAL, w02_rank=0),
    "recurrent-plain": replace(OFFICIAL, momentum=False, muon=False, weight_norm=False, rope=False, qk_affine=False,
                               output_scale=False, w02_rank=0),  # fmt: skip
    "recurrent-classic-ns-ascent": replace(OFFICIAL, ns_coefficients="classic", update_sign=-1.0),
    "recurrent-w1-weightnorm": replace(OFFICIAL, fast_weights="w1"),
    "parallel-all-options": PARALLEL,
    "parallel-no-momentum-no-muon": replace(PARALLEL, momentum=False, muon=False),
    "parallel-identity-per-head-lr": replace(PARALLEL, feature_map="identity", per_token_lr=False, w02_rank=0),
    "recurrent-identity-per-head-lr": replace(PARALLEL, mode="recurrent", feature_map="identity", per_token_lr=False,
                                              w02_rank=0),  # fmt: skip
}


def make_mixer(ttt: TTTConfig, seed: int = 0) -> TTTMixer:
    """A float64 mixer whose every parameter is moved off its init (fixed seed), with learning rates
    of order 0.1 so that each update term matters at the 1e-3 level or more."""
    cfg = LMConfig(hidden_size=24, num_attn_heads=3, window_size=5, rope_theta=100.0, ttt=ttt).validate()
    torch.manual_seed(seed)
    mixer = TTTMixer(cfg).double()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in mixer.named_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
        lr = mixer.lr_bias if mixer.lr_proj is None else mixer.lr_proj.bias
        lr.copy_(-1.5 + 0.5 * torch.randn(lr.shape, generator=generator, dtype=lr.dtype))
    return mixer


def compare(mixer: TTTMixer, x: torch.Tensor) -> dict[str, float]:
    """Relative errors of the mixer against the golden mixer: output, final state, parameter gradients."""
    params = dict(mixer.named_parameters())
    y, state = mixer(x)
    y_gold, state_gold = golden_mixer(mixer, x)
    generator = torch.Generator().manual_seed(7)
    errors = {"output": relative_error(y, y_gold)}
    probe_y = torch.randn(y.shape, generator=generator, dtype=y.dtype)  # random cotangents reach every path
    objective, objective_gold = (y * probe_y).sum(), (y_gold * probe_y).sum()
    for name, expected in state_gold.items():
        actual = getattr(state, name)
        errors[f"state {name}"] = relative_error(actual, expected)
        probe = torch.randn(expected.shape, generator=generator, dtype=expected.dtype)
        objective, objective_gold = objective + (actual * probe).sum(), objective_gold + (expected * probe).sum()
    grads = torch.autograd.grad(objective, list(params.values()))
    grads_gold = torch.autograd.grad(objective_gold, list(params.values()))
    for name, g, g_gold in zip(params, grads, grads_gold):
        errors[f"grad {name}"] = relative_error(g, g_gold)
    return errors


@pytest.mark.parametrize("case", sorted(CASES))
def test_mixer_equals_golden_lact(case: str) -> None:
    mixer = make_mixer(CASES[case])
    x = torch.randn(2, 21, 24, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    errors = compare(mixer, x)
    worst = max(errors, key=errors.get)
    assert errors[worst] < TOLERANCE, f"{worst}: {errors[worst]:.2e}"
