"""`python -m verification.proof`: measure, on seeded random float64 inputs, how closely the forms of the layer agree.

Prints the largest relative error seen over several sizes (T a multiple of C and not) for:
  1. LaCT's manual chunk update vs torch.autograd gradient of the inner loss;
  2. recurrent (W0/W2 frozen, no weight norm) vs parallel chunk scan: output, final state, input gradients;
  3. general recurrent (all fast weights, momentum, Muon, weight norm) vs its unrolled linear-attention rewrite;
  4. the whole mixer (x -> output, final state, every parameter gradient) with the released layer's options,
     recurrent and parallel, vs the golden LaCT mixer (verification/golden_lact.py: autograd inner gradients,
     no code shared with the layer).
Seeds are fixed, so a run reproduces. The README's equivalence table is this command's output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from kernels.fast_weights import FastWeights
from kernels.lact import RecurrentTrace, ScanOptions, lact_chunk_gradients, lact_recurrent, num_chunks, swiglu_features
from kernels.reference import ttt_la_parallel_reference
from model.config import LMConfig, TTTConfig
from model.ttt_layer import TTTMixer
from verification.golden_lact import compare_with_golden, perturbed_mixer
from verification.unrolled import unrolled_lact_output

SIZES = [(2, 64, 2, 16, 16, 16), (2, 77, 2, 16, 32, 16), (1, 45, 4, 12, 8, 10)]  # (B, T, H, d, dh, C)
# The released layer's options at a tiny size: T = 21 not a multiple of C = 8, d = 12 != dh = 18,
# RoPE blocks of 8 (attention head dim) straddling the TTT heads of 12.
TINY_RELEASED = TTTConfig(
    mode="recurrent", num_heads=2, inter_multi=1.5, chunk_size=8, fast_weights="all", momentum=True, muon=True,
    weight_norm=True, w02_rank=3,
)  # fmt: skip
GOLDEN_INPUT_SHAPE = (2, 21, 24)  # [B, T, D]


@dataclass
class LayerInputs:
    q: torch.Tensor  # [B, T, H, d], L2-normalised as in the layer
    k: torch.Tensor
    v: torch.Tensor
    eta0: torch.Tensor  # [B, T, H]
    eta1: torch.Tensor
    eta2: torch.Tensor
    beta: torch.Tensor  # [B, N, H]
    weights: FastWeights  # initial fast weights, per sequence

    def tensors(self) -> list[torch.Tensor]:
        w = self.weights
        return [self.q, self.k, self.v, self.eta0, self.eta1, self.eta2, self.beta, w.w0, w.w1, w.w2]


def make_layer_inputs(
    batch: int, seq_len: int, heads: int, d: int, dh: int, chunk: int, *, dtype=torch.float64, seed: int = 0
) -> LayerInputs:
    """Random inputs of the layer's real shapes and ranges (learning rates in (0, 0.5), decays in (0.05, 0.95))."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen, dtype=dtype)

    q, k = (F.normalize(randn(batch, seq_len, heads, d), dim=-1) for _ in range(2))
    v = randn(batch, seq_len, heads, d)
    etas = [0.5 * rand(batch, seq_len, heads) for _ in range(3)]
    beta = 0.05 + 0.9 * rand(batch, num_chunks(seq_len, chunk), heads)
    weights = FastWeights(
        w0=randn(batch, heads, dh, d) / math.sqrt(d),
        w1=randn(batch, heads, d, dh) / math.sqrt(dh),
        w2=randn(batch, heads, dh, d) / math.sqrt(d),
    )
    return LayerInputs(q, k, v, *etas, beta, weights)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||; NaN anywhere counts as a failure (inf)."""
    if not torch.isfinite(actual).all():
        return math.inf
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def inner_loss(k, v, eta, w0, w1, w2) -> torch.Tensor:
    """sum_t eta_t * l_t(W) with l_t = -<W1 h(k_t), v_t>: the objective a learning rate scales."""
    prediction = torch.einsum("bhde,bnhe->bnhd", w1, swiglu_features(k, w0, w2))
    return (-(prediction * v).sum(-1) * eta).sum()


def manual_vs_autograd() -> float:
    worst = 0.0
    for seed, (batch, seq_len, heads, d, dh, _) in enumerate(SIZES):
        x = make_layer_inputs(batch, seq_len, heads, d, dh, seq_len, seed=seed)
        weights = [w.clone().requires_grad_(True) for w in (x.weights.w0, x.weights.w1, x.weights.w2)]
        manual = lact_chunk_gradients(x.k, x.v, x.eta0, x.eta1, x.eta2, FastWeights(*weights))
        for i, eta in enumerate((x.eta0, x.eta1, x.eta2)):
            loss = inner_loss(x.k, x.v, eta, *weights)
            worst = max(worst, relative_error(getattr(manual, f"g{i}"), torch.autograd.grad(loss, weights[i])[0]))
    return worst


def recurrent_vs_parallel(momentum: bool, muon: bool) -> tuple[float, float, float]:
    worst = [0.0, 0.0, 0.0]
    for seed, size in enumerate(SIZES):
        x = make_layer_inputs(*size, seed=seed)
        chunk = size[-1]
        inputs = [t.requires_grad_(True) for t in (x.q, x.k, x.v, x.eta1, x.weights.w0, x.weights.w1, x.weights.w2)]
        beta = x.beta if momentum else None
        out_r, final_r = lact_recurrent(
            x.q, x.k, x.v, x.eta0, x.eta1, x.eta2, x.weights, chunk, beta=beta, muon=muon, fast_weights="w1"
        )
        hq, hk = (swiglu_features(t, x.weights.w0, x.weights.w2) for t in (x.q, x.k))
        out_p, final_p, _ = ttt_la_parallel_reference(hq, hk, x.v, x.eta1, x.weights.w1, ScanOptions(chunk, muon), beta=beta)
        probe = torch.randn(out_r.shape, generator=torch.Generator().manual_seed(seed), dtype=out_r.dtype)
        g_r = torch.autograd.grad((out_r * probe).sum(), inputs)
        g_p = torch.autograd.grad((out_p * probe).sum(), inputs)
        worst[0] = max(worst[0], relative_error(out_p, out_r))
        worst[1] = max(worst[1], relative_error(final_p, final_r.w1))
        worst[2] = max(worst[2], max(relative_error(a, b) for a, b in zip(g_p, g_r)))
    return tuple(worst)


def recurrent_vs_unrolled(momentum: bool, muon: bool, weight_norm: bool) -> float:
    worst = 0.0
    for seed, size in enumerate(SIZES):
        x = make_layer_inputs(*size, seed=seed)
        chunk = size[-1]
        beta = x.beta if momentum else None
        trace = RecurrentTrace([], [], [])
        out, _ = lact_recurrent(
            x.q, x.k, x.v, x.eta0, x.eta1, x.eta2, x.weights, chunk, beta=beta, muon=muon,
            weight_norm=weight_norm, fast_weights="all", trace=trace,
        )  # fmt: skip
        rewrite = unrolled_lact_output(
            x.q, x.k, x.v, x.eta1, x.weights.w1, trace, chunk, beta=beta, muon=muon, weight_norm=weight_norm
        )
        worst = max(worst, relative_error(rewrite, out))
    return worst


def tiny_mixer(ttt: TTTConfig, seed: int = 0) -> TTTMixer:
    """A float64 mixer of width 24 (3 attention heads of 8) with `ttt`, its parameters moved off their init."""
    cfg = LMConfig(hidden_size=24, num_attn_heads=3, window_size=5, rope_theta=100.0, ttt=ttt).validate()
    torch.manual_seed(seed)
    return perturbed_mixer(TTTMixer(cfg), seed)


def mixer_vs_golden(ttt: TTTConfig) -> tuple[float, float, float]:
    """Largest relative errors (output, final state, parameter gradients) of the mixer against the golden one."""
    x = torch.randn(GOLDEN_INPUT_SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    errors = compare_with_golden(tiny_mixer(ttt), x)
    worst = [max((e for name, e in errors.items() if name.startswith(p)), default=0.0) for p in ("output", "state", "grad")]
    return worst[0], worst[1], worst[2]


def main() -> None:
    print("| claim | options | max relative error (float64) |")
    print("|---|---|---|")
    print(f"| 1. manual LaCT update = autograd gradient | W0, W1, W2 | {manual_vs_autograd():.1e} |")
    for momentum, muon in [(False, False), (True, False), (True, True)]:
        out, state, grads = recurrent_vs_parallel(momentum, muon)
        opts = f"momentum={'on' if momentum else 'off'}, Muon={'on' if muon else 'off'}"
        print(f"| 2. recurrent (W1 only) = parallel scan | {opts} | output {out:.1e}, state {state:.1e}, input grads {grads:.1e} |")
    for momentum, muon, wn in [(False, False, False), (True, False, True), (True, True, True)]:
        opts = f"all fast weights, momentum={'on' if momentum else 'off'}, Muon={'on' if muon else 'off'}, weight norm={'on' if wn else 'off'}"
        print(f"| 3. recurrent = unrolled linear attention | {opts} | {recurrent_vs_unrolled(momentum, muon, wn):.1e} |")
    parallel = replace(TINY_RELEASED, mode="linear_attention", fast_weights="w1", weight_norm=False)
    for name, ttt in [("recurrent, released preset (W0, W1, W2 fast, weight norm)", TINY_RELEASED),
                      ("parallel (W1 only, no weight norm)", parallel)]:
        out, state, grads = mixer_vs_golden(ttt)
        opts = f"{name}: RoPE, qk affine, output scale, low-rank W0/W2, momentum, LaCT Muon"
        print(f"| 4. mixer = golden LaCT (autograd inner loop) | {opts} | output {out:.1e}, state {state:.1e}, parameter grads {grads:.1e} |")


if __name__ == "__main__":
    main()
