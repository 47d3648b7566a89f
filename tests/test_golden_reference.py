"""The mixer, in every mode and option, equals the golden LaCT mixer (`verification/golden_lact.py`) end to end.

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

from verification.golden_lact import compare_with_golden
from verification.proof import GOLDEN_INPUT_SHAPE, TINY_RELEASED as OFFICIAL, tiny_mixer

TOLERANCE = 1e-10

PARALLEL = replace(OFFICIAL, mode="linear_attention", fast_weights="w1", weight_norm=False)

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


@pytest.mark.parametrize("case", sorted(CASES))
def test_mixer_equals_golden_lact(case: str) -> None:
    mixer = tiny_mixer(CASES[case])
    x = torch.randn(GOLDEN_INPUT_SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    errors = compare_with_golden(mixer, x)
    worst = max(errors, key=errors.get)
    assert errors[worst] < TOLERANCE, f"{worst}: {errors[worst]:.2e}"
