"""The randomised kernel check (`tests/gpu/kernel_fuzz.py`) as part of the GPU suite: the cases that
once crashed or returned wrong gradients, then seeded draws over every accepted shape and option: 24 in
`make test-gpu` (which stays within five minutes), 200 more in `make test-gpu-slow`."""

import pytest
import torch

from tests.gpu.kernel_fuzz import FIXED_CASES, draw_case, report, run_cases

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_fixed_small_head_token_causal_cases():
    failures = report(run_cases(FIXED_CASES))
    assert not failures, "\n".join(failures)


QUICK_DRAWS = 24  # about 36 s on an H100 (48 took 72 s)


def test_randomised_cases():
    failures = report(run_cases([draw_case(seed) for seed in range(QUICK_DRAWS)], workers=8))
    assert not failures, "\n".join(failures)


@pytest.mark.gpu_slow
def test_more_randomised_cases():
    failures = report(run_cases([draw_case(seed) for seed in range(QUICK_DRAWS, QUICK_DRAWS + 200)], workers=8))
    assert not failures, "\n".join(failures)
