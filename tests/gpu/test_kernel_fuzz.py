"""The randomised kernel check (`tests/gpu/kernel_fuzz.py`) as part of the GPU suite: the cases that
once crashed or returned wrong gradients, then 200 seeded draws over every accepted shape and option."""

import pytest
import torch

from tests.gpu.kernel_fuzz import FIXED_CASES, draw_case, report, run_cases

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_fixed_small_head_token_causal_cases():
    failures = report(run_cases(FIXED_CASES))
    assert not failures, "\n".join(failures)


def test_randomised_cases():
    failures = report(run_cases([draw_case(seed) for seed in range(200)], workers=8))
    assert not failures, "\n".join(failures)
