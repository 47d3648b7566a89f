"""`kernels.token_step`: one decoded token of the fast-weight branch as one kernel (W1 only, or all three).

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
from kernels.fast_weights import ChunkGradients, FastWeights
from kernels.token_step import lact_token_step, w1_token_read, w1_token_step, w1_token_step_reference
from tests.test_decode_static import assert_kernel_decoding_equals_float64, forced_tokens, static_logits
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


@pytest.mark.parametrize("seed", range(8))
def test_read_kernel_equals_the_float64_step_without_its_update(seed: int, monkeypatch) -> None:
    """`w1_token_read` (the kernel without G1) answers what the float64 step answers when it is not
    token-causal, W1 h(q), whatever k, v and the learning rate are."""
    monkeypatch.setenv("TTTLA_KERNELS", "triton")
    case = random_case(seed) | dict(token_causal=False)
    expected, _ = run(case, w1_token_step_reference, torch.float64)
    w0, w2 = (None if w is None else w.float() for w in (case["w0"], case["w2"]))
    out = w1_token_read(case["q"].float(), w0, w2, case["w1"].float())
    assert out.dtype == torch.float32 and out.shape == case["v"].shape
    assert relative_error(out.double(), expected) < FP32_TOLERANCE


@pytest.mark.parametrize("seed", range(4))
def test_read_kernel_over_many_rows_equals_the_float64_read(seed: int, monkeypatch) -> None:
    """Batches past one program's block of `READ_ROWS` tokens and not a multiple of it (the last block
    part empty), state rows split over programs, odd d and dh, q strided as the mixer gives it."""
    from kernels.token_step import READ_ROWS, w1_token_read_reference

    monkeypatch.setenv("TTTLA_KERNELS", "triton")
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    batch, heads = rng.choice([READ_ROWS + 1, 2 * READ_ROWS + 3]), rng.choice([1, 3])
    swiglu = seed % 2 == 0
    d = rng.choice([24, 72, 130])
    dh = rng.choice([40, 136]) if swiglu else d
    q = torch.randn(batch, 3, heads, d, generator=g)[:, 0]  # a row-strided view, as q of the fused projection
    w0, w2 = (torch.randn(heads, dh, d, generator=g) * d**-0.5 if swiglu else None for _ in range(2))
    w1 = torch.randn(batch, heads, d, dh, generator=g) * dh**-0.5
    out = w1_token_read(q, w0, w2, w1)
    expected = w1_token_read_reference(*(None if t is None else t.double() for t in (q, w0, w2, w1)))
    assert out.shape == (batch, heads, d) and relative_error(out.double(), expected) < FP32_TOLERANCE


@pytest.mark.parametrize("seed", range(4))
def test_read_kernel_forms_the_key_features_beside_the_read(seed: int, monkeypatch) -> None:
    """`w1_token_read_with_key_features` (what a pending-token step keeps of its key): the read unchanged and
    h(k) [B, H, dh] against float64, over several token blocks and state blocks (only the first state
    block writes h(k)), odd d and dh, k strided as the mixer gives it."""
    from kernels.lact import swiglu_features
    from kernels.token_step import READ_ROWS, w1_token_read_reference, w1_token_read_with_key_features

    monkeypatch.setenv("TTTLA_KERNELS", "triton")
    rng, g = random.Random(seed), torch.Generator().manual_seed(100 + seed)
    batch, heads = rng.choice([3, READ_ROWS + 1, 2 * READ_ROWS + 3]), rng.choice([1, 3])
    d, dh = rng.choice([24, 72, 130]), rng.choice([40, 136])
    qk = torch.randn(batch, 3, heads, d, generator=g)
    q, k = qk[:, 0], qk[:, 1]
    w0, w2 = (torch.randn(heads, dh, d, generator=g) * d**-0.5 for _ in range(2))
    w1 = torch.randn(batch, heads, d, dh, generator=g) * dh**-0.5
    out, hk = w1_token_read_with_key_features(q, k, w0, w2, w1)
    expected = w1_token_read_reference(q.double(), w0.double(), w2.double(), w1.double())
    expected_hk = swiglu_features(k.double()[:, None], w0.double(), w2.double())[:, 0]
    assert out.shape == (batch, heads, d) and relative_error(out.double(), expected) < FP32_TOLERANCE
    assert hk.shape == (batch, heads, dh) and hk.dtype == k.dtype
    assert relative_error(hk.double(), expected_hk) < FP32_TOLERANCE
    square = torch.randn(batch, heads, d, d, generator=g) * d**-0.5  # the identity map: dh = d
    identity_out, identity_hk = w1_token_read_with_key_features(q, k, None, None, square)
    expected = w1_token_read_reference(q.double(), None, None, square.double())
    assert identity_hk is k and relative_error(identity_out.double(), expected) < FP32_TOLERANCE


@pytest.mark.parametrize("mode", ["parallel", "parallel-identity-per-head-lr"])
def test_decoding_with_pending_tokens_through_the_read_kernel_equals_the_float64_decoder(mode: str, monkeypatch) -> None:
    """Pending tokens (`decoding.pending`): every token step reads through the kernel without G1, the
    chunk's gradient is formed at its end, and the logits are the float64 running-sum decoder's."""
    assert_kernel_decoding_equals_float64(mode, token_step, "_read_launch", prompt_lengths=[1, 8, 13], steps=12,
                                          seed=9, monkeypatch=monkeypatch, deferred=True)


def test_every_row_of_the_state_is_updated(monkeypatch) -> None:
    """Rows past a program's first block and columns past a tile are written (not left as they were)."""
    monkeypatch.setenv("TTTLA_KERNELS", "triton")
    case = random_case(3) | dict(q=torch.randn(1, 1, 130), k=torch.randn(1, 1, 130), v=torch.ones(1, 1, 130),
                                 eta1=torch.ones(1, 1), w1=torch.zeros(1, 1, 130, 136), g1=torch.zeros(1, 1, 130, 136),
                                 w0=torch.randn(1, 136, 130), w2=torch.randn(1, 136, 130))  # fmt: skip
    _, g1 = run(case, w1_token_step, torch.float32)
    assert (g1 != 0).all()


KERNEL_OF_MODE = {"parallel": "_launch", "parallel-token-causal-momentum-muon": "_launch",
                  "parallel-identity-per-head-lr": "_launch", "recurrent-all-momentum-weightnorm": "lact_token_step_op",
                  "recurrent-released": "lact_token_step_op"}  # fmt: skip


@pytest.mark.parametrize("mode", sorted(KERNEL_OF_MODE))
def test_static_decoding_through_the_kernel_equals_the_float64_decoder(mode: str, monkeypatch) -> None:
    """An fp32 model decoding three rows at different chunk phases through the mode's kernel (every
    token step of every layer launches it) gives the logits of the float64 model's decoder (the torch
    form), W1 alone fast or all three (momentum, Muon, weight norm in the chunk updates between)."""
    assert_kernel_decoding_equals_float64(mode, token_step, KERNEL_OF_MODE[mode], prompt_lengths=[1, 8, 13], steps=12,
                                          seed=5, monkeypatch=monkeypatch)


@pytest.mark.parametrize("mode", ["parallel-token-causal-momentum-muon", "recurrent-released"])
def test_compiled_steps_through_the_kernel_equal_the_eager_ones(mode: str, monkeypatch) -> None:
    """The op inside a compiled decode step (it writes the running gradients in place) gives the eager
    steps' logits: the in-place updates survive the graph's functionalisation."""
    model = make_model(copy.deepcopy(MODES[mode])).float()
    prompts = [t.tolist() for t in forced_tokens(model, 2, seed=7)[:, :5]]
    continuations = forced_tokens(model, 2, seed=8)[:, :10]
    monkeypatch.setenv("TTTLA_KERNELS", "triton")
    eager = static_logits(model, prompts, continuations)
    compiled = static_logits(model, prompts, continuations, step_backend="aot_eager")
    assert relative_error(compiled, eager) < 1e-6


def random_lact_case(seed: int) -> dict:
    """A case of the all-fast (LaCT) step: each row's own W0, W1, W2 and running G0, G1, G2."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    batch, heads = rng.choice([1, 2, 3]), rng.choice([1, 2, 4])
    d, dh = rng.choice([8, 24, 40, 72, 130]), rng.choice([8, 40, 96, 136])
    draw = lambda *shape, scale=1.0: torch.randn(*shape, generator=g) * scale  # noqa: E731
    qkv = draw(batch, 3, heads, d)
    fast = FastWeights(w0=draw(batch, heads, dh, d, scale=d**-0.5), w1=draw(batch, heads, d, dh, scale=dh**-0.5),
                       w2=draw(batch, heads, dh, d, scale=d**-0.5))  # fmt: skip
    grads = ChunkGradients(g0=draw(batch, heads, dh, d, scale=0.1), g1=draw(batch, heads, d, dh, scale=0.1),
                           g2=draw(batch, heads, dh, d, scale=0.1))  # fmt: skip
    etas = (torch.rand(batch, 2, 3, heads, generator=g) * 0.3)[:, 1]  # strided, as the inputs' etas[:, 0]
    return dict(q=qkv[:, 0], k=qkv[:, 1], v=qkv[:, 2], etas=etas, fast=fast, grads=grads,
                update_sign=rng.choice([1.0, -1.0]), token_causal=rng.random() < 0.5)


def run_lact(case: dict, dtype: torch.dtype) -> tuple[torch.Tensor, ChunkGradients]:
    """(output, updated gradients) of `lact_token_step` on the case in `dtype` (fresh gradients)."""
    grads = case["grads"].map(lambda t: t.to(dtype).clone())
    fast = case["fast"].map(lambda t: t.to(dtype))
    cast = {name: case[name].to(dtype) for name in ("q", "k", "v", "etas")}
    out = lact_token_step(**cast, fast=fast, grads=grads, update_sign=case["update_sign"],
                          token_causal=case["token_causal"])  # fmt: skip
    return out, grads


@pytest.mark.parametrize("seed", range(16))
def test_lact_kernel_equals_float64_form(seed: int, monkeypatch) -> None:
    """The float64 run takes the torch form (`kernels.lact`), the fp32 run the kernel."""
    case = random_lact_case(seed)
    expected_out, expected_grads = run_lact(case, torch.float64)
    monkeypatch.setenv("TTTLA_KERNELS", "triton")
    out, grads = run_lact(case, torch.float32)
    assert out.dtype == torch.float32 and out.shape == case["v"].shape
    assert relative_error(out.double(), expected_out) < FP32_TOLERANCE
    for name in ("g0", "g1", "g2"):
        assert relative_error(getattr(grads, name).double(), getattr(expected_grads, name)) < FP32_TOLERANCE, name
