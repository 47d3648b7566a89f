"""Randomised check of `kernels.ttt_la.chunk_ttt_la` over the whole space of shapes and options it accepts.

Every case draws its shape and options from a seed, runs the kernel forward and backward and compares
the output, final state, final momentum and every input gradient with an independent float64 loop
(`float64_chunk_loop`, written here and sharing no code with `kernels/`). The inputs are rounded to the
case's dtype first and the loop reads those rounded values, so only the kernel's own arithmetic counts.

A kernel that crashes (an illegal memory access poisons the whole CUDA context) must fail its own case
and not the run, so cases run in worker subprocesses in batches; when a worker dies, every case of its
batch that did not report is re-run alone in a fresh process, which names the one that crashed.
Every failure prints its parameters and a command that replays it:

    python -m tests.gpu.kernel_fuzz --count 200             # seeds 0..199 plus the fixed cases
    python -m tests.gpu.kernel_fuzz --case '{"seed": 7, ...}'  # replay one case
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

# Relative Frobenius error allowed per compared tensor. fp32 operands are multiplied in IEEE fp32
# (no tf32), so only summation order differs from float64: 1e-6 at these sizes, 1e-4 allowed. bf16
# operands: the kernel rounds eta*v and the stored chunk states to bf16 (2^-9 relative each) before the
# tensor-core products, which lands at 1e-3..5e-3; 2e-2 leaves room for short, cancelling reductions
# (dbeta over one chunk), while a wrong index or formula is O(1) and the bugs this test was written for
# were 0.2-0.7.
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}
MAX_TOKENS = 6144  # B * T per case: keeps the float64 loop and 200+ cases within a few minutes


@dataclass
class FuzzCase:
    """One draw: a plain batch (`cu_seqlens` None) or documents packed on one row (B = 1)."""

    seed: int
    dtype: str
    batch: int
    seq_len: int
    heads: int
    d: int  # value dim
    dh: int  # feature dim
    chunk_size: int
    momentum: bool
    token_causal: bool
    update_sign: float
    initial_state: bool
    initial_momentum: bool
    cu_seqlens: Optional[list[int]] = None
    name: str = ""

    def replay_command(self) -> str:
        return f"python -m tests.gpu.kernel_fuzz --case '{json.dumps(asdict(self))}'"


def _head_dim(rng: random.Random) -> int:
    """Multiples of 16 in [16, 256], half of them the powers of two most models use."""
    if rng.random() < 0.5:
        return rng.choice([16, 32, 64, 128, 256])
    return 16 * rng.randint(1, 16)


def _chunk_size(rng: random.Random) -> int:
    """Log-uniform in [16, 2048]; half of them powers of two, the rest any integer."""
    if rng.random() < 0.5:
        return 2 ** rng.randint(4, 11)
    return int(round(2 ** rng.uniform(4, 11)))


def _odd_lengths(rng: random.Random, docs: int, total: int) -> list[int]:
    """`docs` odd document lengths summing to about `total` (at least 1 each)."""
    cuts = sorted(rng.sample(range(1, max(total, docs + 1)), docs - 1)) if docs > 1 else []
    lengths = [b - a for a, b in zip([0] + cuts, cuts + [max(total, docs)])]
    return [n if n % 2 else n + 1 for n in lengths]


def draw_case(seed: int) -> FuzzCase:
    rng = random.Random(seed)
    chunk = _chunk_size(rng)
    momentum = rng.random() < 0.5
    varlen = rng.random() < 0.35
    batch = 1 if varlen else rng.randint(1, 3)
    tokens = min(MAX_TOKENS // batch, max(1, int(chunk * rng.uniform(0.2, 4.5))))
    if tokens % chunk == 0 and rng.random() < 0.7:
        tokens += rng.choice([-1, 1]) if tokens > 1 else 1  # T not a multiple of C, mostly
    cu_seqlens = None
    if varlen:
        lengths = _odd_lengths(rng, rng.randint(1, 4), tokens)
        cu_seqlens = [0] + [sum(lengths[: i + 1]) for i in range(len(lengths))]
        tokens = cu_seqlens[-1]
    return FuzzCase(
        seed=seed, dtype=rng.choice(["bfloat16", "bfloat16", "float32"]), batch=batch, seq_len=tokens,
        heads=rng.randint(1, 3), d=_head_dim(rng), dh=_head_dim(rng), chunk_size=chunk, momentum=momentum,
        token_causal=rng.random() < 0.5, update_sign=rng.choice([1.0, -1.0]), initial_state=rng.random() < 0.7,
        initial_momentum=momentum and rng.random() < 0.6, cu_seqlens=cu_seqlens,
    )


def _issue_case(name: str, dh: int, momentum: bool, batch: int = 1, cu_seqlens: Optional[list[int]] = None) -> FuzzCase:
    seq_len = cu_seqlens[-1] if cu_seqlens else 1289
    return FuzzCase(seed=1000 + dh, dtype="bfloat16", batch=batch, seq_len=seq_len, heads=2, d=64, dh=dh,
                    chunk_size=64, momentum=momentum, token_causal=True, update_sign=1.0, initial_state=True,
                    initial_momentum=momentum, cu_seqlens=cu_seqlens, name=name)


# Crashes and wrong gradients seen at small head dims with token-causal chunks in bf16; kept forever.
FIXED_CASES = [
    _issue_case("varlen dh16", 16, False, cu_seqlens=[0, 646, 1289]),
    _issue_case("varlen dh32", 32, False, cu_seqlens=[0, 646, 1289]),
    _issue_case("varlen dh32 momentum", 32, True, cu_seqlens=[0, 646, 1289]),
    _issue_case("B1 T1289 dh16", 16, False),
    _issue_case("varlen chunk-aligned dh16", 16, False, cu_seqlens=[0, 640, 1280]),
    _issue_case("varlen dh16 momentum", 16, True, cu_seqlens=[0, 646, 1289]),
    _issue_case("B2 T1289 dh16 momentum", 16, True, batch=2),
]


# ------------------------------------------------------------------------------------------------
# the float64 loop


def _document_bounds(case: FuzzCase) -> list[tuple[int, int, int]]:
    """(row, start, end) of every document."""
    if case.cu_seqlens is None:
        return [(b, 0, case.seq_len) for b in range(case.batch)]
    return [(0, s, e) for s, e in zip(case.cu_seqlens[:-1], case.cu_seqlens[1:])]


def float64_chunk_loop(case: FuzzCase, hq, hk, v, eta1, initial_state, beta, initial_momentum):
    """The layer's definition, one document and one chunk at a time, in the inputs' dtype (float64):

      o_t  = S h(q_t) [+ sign * sum_{s <= t in chunk} eta_s (h(q_t) . h(k_s)) v_s]
      M    = beta_c M + sum_{t in chunk} eta_t v_t h(k_t)^T   (M = the chunk update when momentum is off)
      S    = S + sign * M                                      (after the chunk is answered)
    """
    outputs = torch.zeros_like(v)
    finals, final_momenta, chunk_index = [], [], 0
    for doc, (row, start, end) in enumerate(_document_bounds(case)):
        state = initial_state[doc]  # [H, d, dh]
        momentum = initial_momentum[doc] if initial_momentum is not None else torch.zeros_like(state)
        for s in range(start, end, case.chunk_size):
            e = min(s + case.chunk_size, end)
            q_c, k_c, v_c, eta_c = hq[row, s:e], hk[row, s:e], v[row, s:e], eta1[row, s:e]
            o_c = torch.einsum("hde,nhe->nhd", state, q_c)
            if case.token_causal:
                scores = torch.einsum("nhe,mhe->hnm", q_c, k_c).tril()
                o_c = o_c + case.update_sign * torch.einsum("hnm,mhd->nhd", scores, v_c * eta_c[..., None])
            outputs[row, s:e] = o_c
            update = torch.einsum("nhd,nhe->hde", v_c * eta_c[..., None], k_c)
            if beta is not None:
                momentum = beta[0 if case.cu_seqlens else row, chunk_index, :, None, None] * momentum + update
                update = momentum
            state = state + case.update_sign * update
            chunk_index += 1
        if case.cu_seqlens is None:
            chunk_index = 0
        finals.append(state)
        final_momenta.append(momentum)
    final_momentum = torch.stack(final_momenta) if beta is not None else None
    return outputs, torch.stack(finals), final_momentum


# ------------------------------------------------------------------------------------------------
# one case


def case_inputs(case: FuzzCase, device: str) -> dict[str, torch.Tensor]:
    """Random inputs at the case's dtype (states fp32, as the layer passes them)."""
    g = torch.Generator(device=device).manual_seed(case.seed)
    dtype = getattr(torch, case.dtype)
    randn = lambda *s: torch.randn(*s, device=device, generator=g)  # noqa: E731
    B, T, H = case.batch, case.seq_len, case.heads
    docs = len(case.cu_seqlens) - 1 if case.cu_seqlens else B
    inputs = dict(
        hq=(randn(B, T, H, case.dh) * case.dh**-0.5).to(dtype),
        hk=(randn(B, T, H, case.dh) * case.dh**-0.5).to(dtype),
        v=randn(B, T, H, case.d).to(dtype),
        eta1=(torch.rand(B, T, H, device=device, generator=g) * 0.1 + 0.01).to(dtype),
    )
    if case.initial_state:
        inputs["initial_state"] = randn(docs, H, case.d, case.dh) * 0.1
    if case.momentum:
        chunks = sum(math.ceil((e - s) / case.chunk_size) for _, s, e in _document_bounds(case))
        rows = 1 if case.cu_seqlens else B
        per_row = chunks if case.cu_seqlens else math.ceil(T / case.chunk_size)
        inputs["beta"] = torch.rand(rows, per_row, H, device=device, generator=g) * 0.5 + 0.4
        if case.initial_momentum:
            inputs["initial_momentum"] = randn(docs, H, case.d, case.dh) * 0.1
    return inputs


def _relative_error(reference: torch.Tensor, got: Optional[torch.Tensor]) -> float:
    if got is None or not torch.isfinite(got).all():
        return math.inf
    scale = reference.norm().item()
    return (reference - got.double()).norm().item() / (scale if scale > 0 else 1.0)


def run_case(case: FuzzCase, device: str = "cuda") -> dict[str, float]:
    """Relative errors of every compared tensor: o, final_state, final_momentum and grad_<input>."""
    from kernels import triton_utils
    from kernels.lact import ScanOptions
    from kernels.ttt_la import chunk_ttt_la

    triton_utils.poison_outputs = True  # an element the kernel fails to write shows as NaN
    inputs = case_inputs(case, device)
    kernel_in = {k: x.clone().requires_grad_() for k, x in inputs.items()}
    ref_in = {k: x.double().requires_grad_() for k, x in inputs.items()}
    cu = torch.tensor(case.cu_seqlens, device=device, dtype=torch.int32) if case.cu_seqlens else None
    got = chunk_ttt_la(
        kernel_in["hq"], kernel_in["hk"], kernel_in["v"], kernel_in["eta1"], kernel_in.get("initial_state"),
        ScanOptions(case.chunk_size, token_causal=case.token_causal, update_sign=case.update_sign),
        beta=kernel_in.get("beta"), initial_momentum=kernel_in.get("initial_momentum"), cu_seqlens=cu,
    )
    docs = len(case.cu_seqlens) - 1 if case.cu_seqlens else case.batch
    zeros_state = torch.zeros(docs, case.heads, case.d, case.dh, dtype=torch.float64, device=device)
    ref = float64_chunk_loop(case, ref_in["hq"], ref_in["hk"], ref_in["v"], ref_in["eta1"],
                             ref_in.get("initial_state", zeros_state), ref_in.get("beta"), ref_in.get("initial_momentum"))
    errors = {}
    for label, r, o in zip(("o", "final_state", "final_momentum"), ref, got):
        if r is not None:
            errors[label] = _relative_error(r.detach(), o)
    g = torch.Generator(device=device).manual_seed(case.seed + 1)
    cotangents = [torch.randn(r.shape, device=device, generator=g, dtype=torch.float64) if r is not None else None
                  for r in ref]
    sum((r * c).sum() for r, c in zip(ref, cotangents) if r is not None).backward()
    sum((o.double() * c).sum() for o, c in zip(got, cotangents) if c is not None).backward()
    for name in inputs:
        errors[f"grad_{name}"] = _relative_error(ref_in[name].grad, kernel_in[name].grad)
    if device == "cuda":
        torch.cuda.synchronize()  # an asynchronous fault surfaces inside this case, not the next
    return errors


def case_failure(case: FuzzCase, errors: dict[str, float]) -> Optional[str]:
    tolerance = TOLERANCE[case.dtype]
    bad = {k: v for k, v in errors.items() if not v <= tolerance}
    return None if not bad else ", ".join(f"{k} {v:.3g}" for k, v in bad.items()) + f" (tolerance {tolerance})"


# ------------------------------------------------------------------------------------------------
# running many cases, each crash confined to its own case


@dataclass
class CaseResult:
    case: FuzzCase
    errors: dict[str, float] = field(default_factory=dict)
    crash: str = ""

    @property
    def failure(self) -> Optional[str]:
        if self.crash:
            return f"crashed: {self.crash}"
        return case_failure(self.case, self.errors)


def _worker(cases: list[FuzzCase], timeout_s: float) -> dict[int, CaseResult]:
    """Run cases in one fresh process; the results it printed before it exited or died."""
    payload = json.dumps([asdict(c) for c in cases])
    try:
        proc = subprocess.run([sys.executable, "-m", "tests.gpu.kernel_fuzz", "--worker"], input=payload,
                              capture_output=True, text=True, timeout=timeout_s)
        output, stderr = proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        output, stderr = e.stdout or "", f"timed out after {timeout_s:.0f} s"
        output = output.decode() if isinstance(output, bytes) else output
    results = {}
    for line in output.splitlines():
        if line.startswith("RESULT "):
            item = json.loads(line[len("RESULT "):])
            results[item["index"]] = CaseResult(cases[item["index"]], errors=item["errors"])
    last_line = next((ln for ln in reversed((stderr or "").strip().splitlines()) if ln.strip()), "no output")
    for index, case in enumerate(cases):
        if index not in results:
            results[index] = CaseResult(case, crash=last_line[-300:])
    return results


def run_cases(cases: list[FuzzCase], workers: int = 4, batch_size: int = 8, timeout_s: float = 600.0,
              progress: bool = False) -> list[CaseResult]:
    """All cases in batches over `workers` processes; a batch with a crash is re-run case by case."""
    batches = [cases[i : i + batch_size] for i in range(0, len(cases), batch_size)]
    results: list[CaseResult] = []
    with ThreadPoolExecutor(workers) as pool:
        for batch, found in zip(batches, pool.map(lambda b: _worker(b, timeout_s), batches)):
            if any(r.crash for r in found.values()) and len(batch) > 1:
                found = {i: _worker([c], timeout_s)[0] for i, c in enumerate(batch)}
            results.extend(found[i] for i in range(len(batch)))
            if progress:
                failed = sum(1 for r in results if r.failure)
                print(f"{len(results)}/{len(cases)} cases run, {failed} failed", file=sys.stderr, flush=True)
    return results


def _worker_main() -> None:
    cases = [FuzzCase(**c) for c in json.loads(sys.stdin.read())]
    for index, case in enumerate(cases):
        print("RESULT " + json.dumps({"index": index, "errors": run_case(case)}), flush=True)


def report(results: list[CaseResult]) -> list[str]:
    """One line per failing case with its parameters and the command that replays it."""
    lines = []
    for r in results:
        if r.failure:
            lines.append(f"FAIL {r.case.name or 'seed ' + str(r.case.seed)}: {r.failure}\n  {r.case.replay_command()}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--first", type=int, default=0, help="first random seed")
    parser.add_argument("--count", type=int, default=200, help="number of random seeds")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--case", help="replay one case given as JSON (runs in this process)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker_main()
    if args.case:
        case = FuzzCase(**json.loads(args.case))
        errors = run_case(case)
        print(json.dumps(errors, indent=1), "\n", case_failure(case, errors) or "ok")
        return None
    cases = FIXED_CASES + [draw_case(s) for s in range(args.first, args.first + args.count)]
    results = run_cases(cases, workers=args.workers, progress=True)
    failures = report(results)
    print("\n".join(failures), flush=True)
    worst = {dtype: max((max(r.errors.values()) for r in results if r.errors and r.case.dtype == dtype), default=0.0)
             for dtype in TOLERANCE}
    print(f"{len(results) - len(failures)}/{len(results)} cases passed; worst relative error per dtype: "
          + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
