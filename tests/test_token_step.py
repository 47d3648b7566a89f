"""`kernels.token_step`: one decoded token of the W1-only fast-weight branch as one kernel.

The kernel runs through the Triton interpreter (fp32). Each random case draws shapes and options over
what the op accepts (odd d and dh that are not multiples of the tiles, batch and heads, SwiGLU or the
identity map, token-causal or not, either update sign, strided q, k, v, eta1 and w1) and compares the output
and the updated running gradient with the float64 torch form. Then the decoder: static decoding
through the kernel equals the eager chunk form's logits.
"""

from __future__ import annotations

import copy
import os
import random

import pytest
import torch

from kernels import token_step
from kernels.token_step import w1_token_step, w1_token_step_reference
from tests.test_decode_static import forced_tokens, reference_logits, static_logits
from tests.test_generate_decode import MODES, make_model
from verification.proof import relative_error

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the Triton kernels run on CPU only under TRITON_INTERPRET=1")  # fmt: skip

FP32_TOLERANCE = 1e-5  # relative: fp32 sums of at most a few hundred terms against float64


def random_case(seed: int) -> dict:
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    batch, heads = rng.choice([1, 2, 3]), rng.choice([1, 2, 4])
    swiglu = rng.random() < 0.7
    d = rng.choice([8, 24, 40, 72, 130])
    dh = rng.choice([8, 40, 96, 136]) if swiglu else d
    draw = lambda *shape, scale=1.0: torch.randn(*shape, generator=g) * scale  # noqa: E731
    w1 = draw(batch, heads, dh, d, scale=dh**-0.5).transpose(-1, -2)  # [B, H, d, dh] through strides
    if rng.random() < 0.5:
        w1 = w1.contiguous()
    qkv = draw(batch, 3, heads, d)  # q, k, v as row-strided views of one projection, as the mixer gives them
    return dict(
        q=qkv[:, 0], k=qkv[:, 1], v=qkv[:, 2],
        eta1=(torch.rand(batch, heads, 3, generator=g) * 0.3)[..., 1],  # strided, as etas[:, 0, 1]
        w0=draw(heads, dh, d, scale=d**-0.5) if swiglu else None, w2=draw(heads, dh, d, scale=d**-0.5) if swiglu else None,
        w1=w1, g1=draw(batch, heads, d, dh, scale=0.1),
        update_sign=rng.choice([1.0, -1.0]), token_causal=rng.random() < 0.7,
    )


def run(case: dict, step, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, updated g1) of `step` on the case's tensors in `dtype` (g1 a fresh copy)."""
    cast = {name: value.to(dtype) if isinstance(value, torch.Tensor) else value for name, value in case.items()}
    cast["g1"] = cast["g1"].clone()
    out = step(**cast)
    return out, cast["g1"]


@pytest.mark.parametrize("seed", range(16))
def test_kernel_equals_float64_form(seed: int, monkeypatch) -> None:
    monkeypatch.setenv("TTTLA_KERNELS", "triton")
    case = random_case(seed)
    out, g1 = run(case, w1_token_step, torch.float32)
    expected_out, expected_g1 = run(case, w1_token_step_reference, torch.float64)
    assert out.dtype == torch.float32 and out.shape == case["v"].shape
    assert relative_error(out.double(), expected_out) < FP32_TOLERANCE
    assert relative_error(g1.double(), expected_g1) < FP32_TOLERANCE


def test_every_row_of_the_state_is_updated(monkeypatch) -> None:
    """Rows past a program's first block and columns past a tile are written (not left as they were)."""
    monkeypatch.setenv("TTTLA_KERNELS", "triton")
    case = random_case(3) | dict(q=torch.randn(1, 1, 130), k=torch.randn(1, 1, 130), v=torch.ones(1, 1, 130),
                                 eta1=torch.ones(1, 1), w1=torch.zeros(1, 1, 130, 136), g1=torch.zeros(1, 1, 130, 136),
                                 w0=torch.randn(1, 136, 130), w2=torch.randn(1, 136, 130))  # fmt: skip
    _, g1 = run(case, w1_token_step, torch.float32)
    assert (g1 != 0).all()


@pytest.mark.parametrize("mode", ["parallel", "parallel-token-causal-momentum-muon", "parallel-identity-per-head-lr"])
def test_static_decoding_through_the_kernel_equals_the_float64_decoder(mode: str, monkeypatch) -> None:
    """An fp32 model decoding four rows at different chunk phases through the kernel (every token step
    of every layer launches it) gives the logits of the float64 model's decoder (the torch form)."""
    model64 = make_model(copy.deepcopy(MODES[mode]))
    model32 = copy.deepcopy(model64).float()
    prompts = [t.tolist() for t in forced_tokens(model64, 3, seed=5)[:, :13]]
    prompts = [prompts[0][:1], prompts[1][:8], prompts[2]]
    continuations = forced_tokens(model64, 3, seed=6)[:, :12]
    launches, launch = [], token_step._launch
    monkeypatch.setattr(token_step, "_launch", lambda *args, **kwargs: launches.append(1) or launch(*args, **kwargs))
    monkeypatch.setenv("TTTLA_KERNELS", "triton")
    decoded = static_logits(model32, prompts, continuations)
    monkeypatch.setenv("TTTLA_KERNELS", "reference")
    assert len(launches) == continuations.shape[1] * len(model32.blocks)
    for row, prompt in enumerate(prompts):
        expected = reference_logits(model64, prompt, continuations[row])[: continuations.shape[1]]
        assert relative_error(decoded[row].double(), expected) < 1e-4  # fp32 through two layers


def test_compiled_steps_through_the_kernel_equal_the_eager_ones(monkeypatch) -> None:
    """The op inside a compiled decode step (it writes the running gradient in place) gives the eager
    steps' logits: the in-place update survives the graph's functionalisation."""
    model = make_model(copy.deepcopy(MODES["parallel-token-causal-momentum-muon"])).float()
    prompts = [t.tolist() for t in forced_tokens(model, 2, seed=7)[:, :5]]
    continuations = forced_tokens(model, 2, seed=8)[:, :10]
    monkeypatch.setenv("TTTLA_KERNELS", "triton")
    eager = static_logits(model, prompts, continuations)
    compiled = static_logits(model, prompts, continuations, step_backend="aot_eager")
    assert relative_error(compiled, eager) < 1e-6
