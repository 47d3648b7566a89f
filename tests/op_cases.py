"""Arguments for `torch.library.opcheck` of every `tttla::` op, on any device and dtype.

Shared by the CPU suite (Triton interpreter, fp32) and the GPU suite (bf16 and fp32). Each case
covers one way the op is called by the layer: a plain batch (`rows` equal documents), momentum
with a negative update sign, packed documents (`cu_seqlens`, whose chunk count the fake
implementation cannot know without beta), and the backward ops on what the forward returned.
Shapes are tiny but cross chunk boundaries and end in a partial chunk.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from kernels.features import (
    swiglu_features_backward_inline_op, swiglu_features_backward_op, swiglu_features_inline_op, swiglu_features_op,
)
from kernels.token_step import w1_token_read_keys_op, w1_token_read_op
from kernels.ttt_la import (
    chunk_scan_backward_op, chunk_scan_op, chunk_scan_rows_backward_op, chunk_scan_rows_op, chunk_updates_op,
)

TOKENS, HEADS, D, DH, CHUNK = 40, 2, 16, 32, 16
ROWS = 2  # a plain batch: 2 rows of 20 tokens, 2 chunks each (the second one short)
CU_SEQLENS = [0, 7, 30, 40]  # packed documents: 1 + 2 + 1 chunks


def _make(device: str, dtype: torch.dtype, seed: int) -> Callable[..., torch.Tensor]:
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0, grad: bool = True, fp32: bool = False) -> torch.Tensor:
        x = torch.randn(*shape, device=device, generator=generator) * scale
        return x.to(torch.float32 if fp32 else dtype).requires_grad_(grad)

    return randn


def _scan_args(randn, device: str, dtype: torch.dtype, momentum: bool, packed: bool, grad: bool) -> tuple:
    docs = len(CU_SEQLENS) - 1 if packed else ROWS
    chunks = 4 if packed else ROWS * 2
    beta = torch.rand(chunks, HEADS, device=device).requires_grad_(grad) if momentum else None
    return (
        randn(TOKENS, HEADS, DH, scale=DH**-0.5, grad=grad), randn(TOKENS, HEADS, DH, scale=DH**-0.5, grad=grad),
        randn(TOKENS, HEADS, D, grad=grad), (torch.rand(TOKENS, HEADS, device=device) * 0.1).to(dtype).requires_grad_(grad),
        randn(docs, HEADS, D, DH, scale=0.1, grad=grad, fp32=True), beta,
        randn(docs, HEADS, D, DH, scale=0.1, grad=grad, fp32=True) if momentum else None,
        torch.tensor(CU_SEQLENS, device=device, dtype=torch.int32) if packed else None,
        1 if packed else ROWS, CHUNK, True, -1.0 if momentum else 1.0,
    )  # fmt: skip


SCAN_VARIANTS = {"plain": (False, False), "momentum": (True, False), "packed": (False, True),
                 "packed_momentum": (True, True)}  # fmt: skip
# The inlined registrations (`kernels.triton_utils.inline_op`): the plain-row variants, and their fake
# implementation is their body on fake tensors, which only compiled (not interpreted) kernels allow.
INLINE_CASES = ("swiglu_features_inline", "swiglu_features_backward_inline",
                *(f"chunk_scan_rows{kind}_{variant}" for kind in ("", "_backward") for variant in ("plain", "momentum")))


def op_cases(device: str, dtype: torch.dtype) -> dict[str, tuple[Any, tuple]]:
    """{case name: (op, args)} for every op and variant."""
    randn = _make(device, dtype, seed=0)
    x, w0, w2 = randn(TOKENS, HEADS, D), randn(HEADS, DH, D, scale=D**-0.5), randn(HEADS, DH, D, scale=D**-0.5)
    cases: dict[str, tuple[Any, tuple]] = {
        "swiglu_features": (swiglu_features_op, (x, w0, w2, True)),
        "swiglu_features_recompute": (swiglu_features_op, (x, w0, w2, False)),
    }
    with torch.no_grad():
        _, projections = swiglu_features_op(x, w0, w2, True)
    grad_h = randn(TOKENS, HEADS, DH, grad=False)
    detached = [t.detach() for t in (x, w0, w2)]
    cases["swiglu_features_backward"] = (swiglu_features_backward_op, (grad_h, *detached, projections, True, True))
    cases["swiglu_features_backward_recompute_x_only"] = (
        swiglu_features_backward_op, (grad_h, *detached, None, True, False))
    for name, (momentum, packed) in SCAN_VARIANTS.items():
        args = _scan_args(randn, device, dtype, momentum, packed, grad=True)
        cases[f"chunk_scan_{name}"] = (chunk_scan_op, args)
        plain = [t.detach() if isinstance(t, torch.Tensor) else t for t in args]
        with torch.no_grad():
            o, final, final_momentum, states, momenta = chunk_scan_op(*plain)
        hq, hk, v, eta, _, beta, _, cu_seqlens, rows, chunk_size, token_causal, sign = plain
        cotangent = randn(*o.shape, grad=False)
        dfinal = torch.randn_like(final)
        cases[f"chunk_scan_backward_{name}"] = (chunk_scan_backward_op, (
            cotangent, hq, hk, v, eta, states, momenta if momentum else None, beta, dfinal,
            torch.randn_like(final_momentum) if momentum else None, cu_seqlens, rows, chunk_size, token_causal, sign,
        ))  # fmt: skip
    plain = cases["chunk_scan_plain"][1]
    cases["chunk_updates"] = (chunk_updates_op, (plain[2].detach(), plain[1].detach(), plain[3].detach(), ROWS, CHUNK))
    add_read_cases(cases, randn)
    add_inline_cases(cases)
    return cases


def add_read_cases(cases: dict[str, tuple[Any, tuple]], randn) -> None:
    """The pending-token decoder's read (`kernels.token_step`): one token of 3 rows, without autograd."""
    q, k = randn(3, HEADS, D, grad=False), randn(3, HEADS, D, grad=False)
    w0, w2 = (randn(HEADS, DH, D, scale=D**-0.5, grad=False) for _ in range(2))
    w1 = randn(3, HEADS, D, DH, scale=DH**-0.5, grad=False, fp32=True)
    cases["w1_token_read"] = (w1_token_read_op, (q, w0, w2, w1))
    cases["w1_token_read_keys"] = (w1_token_read_keys_op, (q, k, w0, w2, w1))


def add_inline_cases(cases: dict[str, tuple[Any, tuple]]) -> None:
    """Each inlined op on its opaque twin's arguments (the scan's without cu_seqlens)."""
    cases["swiglu_features_inline"] = (swiglu_features_inline_op, cases["swiglu_features"][1])
    cases["swiglu_features_backward_inline"] = (swiglu_features_backward_inline_op, cases["swiglu_features_backward"][1])
    for variant in ("plain", "momentum"):
        args = cases[f"chunk_scan_{variant}"][1]
        cases[f"chunk_scan_rows_{variant}"] = (chunk_scan_rows_op, (*args[:7], *args[8:]))
        args = cases[f"chunk_scan_backward_{variant}"][1]
        cases[f"chunk_scan_rows_backward_{variant}"] = (chunk_scan_rows_backward_op, (*args[:10], *args[11:]))
