"""Every Triton kernel, forward and backward, on a few of the smallest shapes, for compute-sanitizer.

    compute-sanitizer --tool memcheck --error-exitcode 1 python -m tests.gpu.sanitize_kernels
    compute-sanitizer --tool racecheck --error-exitcode 1 python -m tests.gpu.sanitize_kernels

The shapes cover each launch path of `kernels.chunk` (update formed inside the scan for C <= 256,
stored chunk updates through `chunk_outer` above it; token-causal apply with one and several sub-blocks
and with the narrow-tile choice; momentum; varlen documents) and both `kernels.features` backward
variants. Each case is also checked against the float64 loop, so a clean report is also a right one.
"""

from __future__ import annotations

import sys

import torch

from kernels import features
from kernels.lact import swiglu_features as swiglu_reference
from tests.gpu.kernel_fuzz import FuzzCase, case_failure, run_case


def _case(dtype: str, d: int, dh: int, chunk: int, seq_len: int, token_causal: bool, momentum: bool,
          cu_seqlens=None, batch: int = 1) -> FuzzCase:
    return FuzzCase(seed=seq_len + chunk, dtype=dtype, batch=batch, seq_len=seq_len, heads=2, d=d, dh=dh,
                    chunk_size=chunk, momentum=momentum, token_causal=token_causal, update_sign=-1.0,
                    initial_state=True, initial_momentum=momentum, cu_seqlens=cu_seqlens)


CASES = [
    _case("bfloat16", 16, 16, 16, 37, True, True, batch=2),             # fused scan, one sub-block
    _case("bfloat16", 16, 32, 64, 133, True, False),                    # narrow-tile token-causal apply
    _case("bfloat16", 32, 16, 100, 211, True, True, [0, 77, 211]),      # several sub-blocks, varlen
    _case("bfloat16", 16, 16, 300, 333, False, True),                   # chunk_outer + stored-update scan
    _case("float32", 16, 16, 300, 301, True, False, [0, 1, 301]),       # fp32, a one-token document
]


def run_features(dtype: torch.dtype, save_projections: bool) -> float:
    """Relative error of the fused feature kernel's output and gradients at d = dh = 16."""
    features.SAVE_PROJECTIONS = save_projections
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 37, 2, 16, device="cuda", generator=g).to(dtype)
    w0, w2 = ((torch.randn(2, 16, 16, device="cuda", generator=g) * 0.25).to(dtype) for _ in range(2))
    ours = [t.clone().requires_grad_() for t in (x, w0, w2)]
    ref = [t.double().requires_grad_() for t in (x, w0, w2)]
    out, expected = features.swiglu_features(*ours), swiglu_reference(*ref)
    cotangent = torch.randn_like(expected)
    (out.double() * cotangent).sum().backward()
    (expected * cotangent).sum().backward()
    pairs = [(expected, out)] + [(r.grad, o.grad) for r, o in zip(ref, ours)]
    return max(((e - o.double()).norm() / e.norm()).item() for e, o in pairs)


def main() -> None:
    failures = []
    for case in CASES:
        failure = case_failure(case, run_case(case))
        print(f"{case.dtype} d={case.d} dh={case.dh} C={case.chunk_size} T={case.seq_len}: {failure or 'ok'}")
        failures += [failure] if failure else []
    for dtype in (torch.bfloat16, torch.float32):
        for save in (True, False):
            error = run_features(dtype, save)
            ok = error < (2e-2 if dtype == torch.bfloat16 else 1e-4)
            print(f"features {dtype} save_projections={save}: {error:.2e} {'ok' if ok else 'FAIL'}")
            failures += [] if ok else [f"features {dtype}"]
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
