"""`kernels.feature_scan`: the features and the W1 chunk scan as one step that keeps q and k, not h(q), h(k).

Triton kernels through the interpreter (fp32, where its dots are exact). Each random case compares the
fused step with the float64 reference (features of `kernels.lact`, then `ttt_la_parallel_reference`),
forward and every gradient, at the fp32 tolerance of the kernel tests; with the two public ops one
after the other on the same kernels, it must agree bit for bit (the same kernels, in the same order).
Then what autograd keeps: no h(q), h(k) and no projections; and `model.ttt.recompute_features`
reaching the mixer, compiled as one graph.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from kernels.feature_scan import feature_chunk_scan
from kernels.features import swiglu_features
from kernels.lact import ScanOptions
from kernels.lact import swiglu_features as reference_features
from kernels.reference import ttt_la_parallel_reference
from kernels.ttt_la import chunk_ttt_la
from model.config import LMConfig, TTTConfig
from model.ttt_layer import TTTMixer
from verification.proof import relative_error

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the Triton kernels run on CPU only under TRITON_INTERPRET=1")  # fmt: skip

FP32_TOLERANCE = 1e-4  # relative, fp32 kernels against the float64 reference


def random_case(seed: int) -> dict:
    """Shapes, options and fp32 inputs drawn over what the op accepts: odd lengths, short last chunks,
    momentum on or off, token-causal or not, either update sign."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    batch, heads = rng.choice([1, 2]), rng.choice([1, 2])
    d, dh = rng.choice([16, 32]), rng.choice([16, 32])
    chunk = rng.choice([4, 8, 16])
    seq_len = rng.randint(1, 3 * chunk + 3)
    momentum = rng.random() < 0.5
    draw = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).requires_grad_()  # noqa: E731
    chunks = -(-seq_len // chunk)
    return dict(
        q=draw(batch, seq_len, heads, d), k=draw(batch, seq_len, heads, d), v=draw(batch, seq_len, heads, d),
        w0=draw(heads, dh, d, scale=d**-0.5), w2=draw(heads, dh, d, scale=d**-0.5),
        eta=(torch.rand(batch, seq_len, heads, generator=g) * 0.2).requires_grad_(),
        init=draw(batch, heads, d, dh, scale=0.1),
        beta=torch.rand(batch, chunks, heads, generator=g).requires_grad_() if momentum else None,
        init_momentum=draw(batch, heads, d, dh, scale=0.1) if momentum else None,
        options=ScanOptions(chunk, None, rng.random() < 0.5, rng.choice([1.0, -1.0])),
    )


def outputs_and_gradients(case: dict, step) -> dict[str, torch.Tensor]:
    """`step(case)` -> (o, final, final momentum); then the gradients of a loss that reads all three, by name."""
    o, final, momentum = step(case)
    g = torch.Generator().manual_seed(99)
    loss = (o * torch.randn(o.shape, generator=g).to(o.dtype)).sum() + 0.1 * final.square().sum()
    if momentum is not None:
        loss = loss + 0.1 * momentum.square().sum()
    names = [n for n in ("q", "k", "w0", "w2", "v", "eta", "init", "beta", "init_momentum") if case[n] is not None]
    gradients = torch.autograd.grad(loss, [case[n] for n in names])
    results = {"o": o, "final": final, **({"final momentum": momentum} if momentum is not None else {})}
    return {**results, **{f"d{n}": g for n, g in zip(names, gradients)}}


def fused(case: dict):
    return feature_chunk_scan(case["q"], case["k"], case["w0"], case["w2"], case["v"], case["eta"], case["init"],
                              case["options"], beta=case["beta"], initial_momentum=case["init_momentum"])  # fmt: skip


def two_ops(case: dict):
    hq, hk = (swiglu_features(case[x], case["w0"], case["w2"]) for x in ("q", "k"))
    return chunk_ttt_la(hq, hk, case["v"], case["eta"], case["init"], case["options"], beta=case["beta"],
                        initial_momentum=case["init_momentum"])  # fmt: skip


def reference(case: dict):
    """The float64 reference: the features of `kernels.lact`, then `ttt_la_parallel_reference`."""
    hq, hk = (reference_features(case[x], case["w0"], case["w2"]) for x in ("q", "k"))
    return ttt_la_parallel_reference(hq, hk, case["v"], case["eta"], case["init"], case["options"], beta=case["beta"],
                                     initial_momentum=case["init_momentum"])  # fmt: skip


def widened(case: dict) -> dict:
    """float64 copies of the case's tensors, leaves of their own."""
    return {n: (t.detach().double().requires_grad_() if isinstance(t, torch.Tensor) else t) for n, t in case.items()}


@pytest.mark.parametrize("seed", range(12))
def test_fused_step_equals_the_float64_reference_and_the_two_ops(seed, monkeypatch):
    monkeypatch.setenv("TTTLA_KERNELS", "triton")
    case = random_case(seed)
    got = outputs_and_gradients(case, fused)
    separate = outputs_and_gradients(case, two_ops)
    expected = outputs_and_gradients(widened(case), reference)
    assert got.keys() == separate.keys() == expected.keys()
    for name, value in got.items():
        assert torch.equal(value, separate[name]), f"{name}: the fused step differs from the two ops"
        assert relative_error(value.double(), expected[name]) < FP32_TOLERANCE, name


def saved_bytes(step, case: dict) -> int:
    total = 0

    def count(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
        step(case)
    return total


def test_fused_step_keeps_neither_features_nor_projections(monkeypatch):
    """Against the two ops: h(q), h(k) (2 x [T, H, dh]) and the projections (2 x [T, H, 2 dh]) less."""
    monkeypatch.setenv("TTTLA_KERNELS", "triton")
    case = random_case(3)
    batch, seq_len, heads, _ = case["q"].shape
    dh = case["w0"].shape[1]
    features_and_projections = 2 * batch * seq_len * heads * (dh + 2 * dh) * 4
    assert saved_bytes(two_ops, case) - saved_bytes(fused, case) >= features_and_projections


def mixer_run(recompute: bool, compiled: bool) -> list[torch.Tensor]:
    torch.manual_seed(0)
    ttt = TTTConfig(num_heads=2, chunk_size=8, mode="linear_attention", fast_weights="w1", momentum=True,
                    token_causal=True, recompute_features=recompute)  # fmt: skip
    mixer = TTTMixer(LMConfig(hidden_size=32, num_layers=1, num_attn_heads=2, window_size=0, ttt=ttt))
    x = torch.randn(1, 21, 32, requires_grad=True)
    run = torch.compile(mixer, fullgraph=True, backend="aot_eager") if compiled else mixer
    out, _ = run(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    return [out.detach(), x.grad, *(p.grad for p in mixer.parameters() if p.grad is not None)]


@pytest.mark.parametrize("compiled", [False, True])
def test_the_setting_reaches_the_mixer_and_changes_nothing_it_computes(compiled, monkeypatch):
    monkeypatch.setenv("TTTLA_KERNELS", "triton")
    kept = mixer_run(recompute=False, compiled=False)
    recomputed = mixer_run(recompute=True, compiled=compiled)
    for a, b in zip(kept, recomputed, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_the_setting_saves_memory_in_the_mixer(monkeypatch):
    monkeypatch.setenv("TTTLA_KERNELS", "triton")

    def mixer_saved(recompute: bool) -> int:
        ttt = TTTConfig(num_heads=2, chunk_size=8, mode="linear_attention", fast_weights="w1", recompute_features=recompute)
        mixer = TTTMixer(LMConfig(hidden_size=32, num_layers=1, num_attn_heads=2, window_size=0, ttt=ttt))
        return saved_bytes(lambda _: mixer(torch.randn(1, 21, 32, requires_grad=True)), {})

    assert mixer_saved(recompute=True) < mixer_saved(recompute=False)
