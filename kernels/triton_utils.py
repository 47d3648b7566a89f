"""What the Triton paths share: the one kernel-or-reference switch, output buffers, tiles and precision.

Kernel or reference is decided here, once per call, by the public ops (`kernels.features.swiglu_features`,
`kernels.ttt_la.chunk_ttt_la`); their callers never decide it again. The rule:

* by default the Triton kernels run on CUDA tensors when the caller allows them (the layer passes
  `model.ttt.use_kernel`), and the PyTorch reference runs everywhere else;
* the environment variable TTTLA_KERNELS forces one side for every op: `triton` runs the kernels on
  any device (on the CPU only under TRITON_INTERPRET=1, as the tests run them), `reference` runs the
  reference on any device; `auto` (or unset) is the default rule.

An op may still take the reference for inputs its kernel does not serve (Muon in the chunk scan,
float64 features); those cases are stated in each op's docstring.

The training step's kernel ops (the features and the scan over plain rows) are registered twice
(`inline_op`):
* as a `torch.library.custom_op` with a fake implementation: opaque to torch.compile, which calls back
  into Python for it at run time (its own launches, through Triton's launcher, a few hundred
  microseconds of host time a call). It serves the Triton interpreter (whose kernels cannot be traced)
  and inputs whose shapes depend on values (packed documents' chunk tables);
* as a `torch.library.triton_op`: Inductor traces its body, so its kernels and the torch work around
  them become part of the compiled graph, launched from Inductor's own wrapper (from C++ with
  `cpp_wrapper`, replayed with its CUDA graphs). A training step calls eight kernel ops a layer, and
  a 16K step's host profile put most of its time beyond the kernels in them.
`inline_kernels` picks between them, once, in the public op.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Callable, Optional, Sequence

import torch

KERNELS_ENV = "TTTLA_KERNELS"
KERNELS_CHOICES = ("auto", "triton", "reference")
# The inlined registrations are taken on CUDA (`inline_kernels`) unless TTTLA_INLINE_KERNELS=0: at 125M/16K
# they took the compiled step from 0.92x to 1.08x the transformer (docs/bench/trainer_125m_16k_compiled.md).
INLINE_ENV = "TTTLA_INLINE_KERNELS"
# Operand dtypes the kernels take (fp32 accumulation for all of them).
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Tests set this to fill every kernel-written buffer with NaN first, so an unwritten element shows.
poison_outputs = False


def use_triton(x: torch.Tensor, allow: bool = True) -> bool:
    """Whether an op on `x` runs its Triton kernels: TTTLA_KERNELS if set, else `allow` on CUDA tensors."""
    choice = os.environ.get(KERNELS_ENV, "auto")
    if choice not in KERNELS_CHOICES:
        raise ValueError(f"{KERNELS_ENV}={choice!r} must be one of {', '.join(KERNELS_CHOICES)}")
    if choice == "auto":
        return allow and x.is_cuda
    return choice == "triton"


def new_buffer(shape, dtype, device) -> torch.Tensor:
    """An output buffer a kernel writes in full (NaN-filled when `poison_outputs`)."""
    if poison_outputs:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def absent(like: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The empty tensor a torch.library op returns for an output it does not produce (op schemas
    cannot return None); `like`'s device, and its dtype unless `dtype` is given."""
    return like.new_empty(0, dtype=dtype)


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: fp32 operands are multiplied exactly (the tests compare to float64),
    not in tf32; 16-bit operands take the tensor cores as they are."""
    return "ieee" if dtype == torch.float32 else "tf32"


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launch arithmetic on the host. Plain integers: `triton.cdiv` is a constexpr
    function whose every Python call costs microseconds, and each op launch makes a dozen such calls."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), on the host; see `cdiv`."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def tile(dim: int, cap: int) -> int:
    """A tile side for a dimension of `dim`: its next power of two, at least 16 (tl.dot's minimum), at most `cap`."""
    return max(16, min(cap, next_power_of_2(dim)))


def inline_kernels(*tensors: torch.Tensor) -> bool:
    """Whether a kernel op on `tensors` takes its inlined registration (`inline_op`): CUDA tensors of
    concrete shapes, unless TTTLA_INLINE_KERNELS=0. Interpreted kernels (CPU) cannot be traced. A
    compiled graph whose sizes are symbolic (Dynamo recompiles with dynamic shapes when a size changes)
    keeps the opaque op: an inlined body picks tiles and grids from the sizes in Python."""
    concrete = all(isinstance(size, int) for x in tensors for size in x.shape)
    return tensors[0].is_cuda and concrete and os.environ.get(INLINE_ENV, "1") != "0"


_inside_inline_op = threading.local()


def launcher(kernel):
    """The kernel as a launch site calls it (`launcher(kernel)[grid](...)`): wrapped for tracing inside
    an inlined op's body (`torch.library.wrap_triton`), the kernel itself anywhere else, where a wrapped
    kernel would dispatch each launch through a higher-order op (about a millisecond)."""
    if getattr(_inside_inline_op, "active", False):
        return torch.library.wrap_triton(kernel)
    return kernel


def inline_op(name: str, body: Callable, kernels: Sequence) -> "torch._library.custom_ops.CustomOpDef":
    """`body` (typed arguments, its launches through `launcher`) as the `torch.library.triton_op` `name`.

    Its fake implementation is the body itself on fake tensors (the traced launches do nothing there),
    so it must not read tensor values. `kernels` are the Triton kernels it launches: torch finds them by
    reading the body's source for literal `wrap_triton(kernel)` calls, which `launcher` hides, and keys
    its compiled-graph cache on their source; listed here, an edited kernel is never served stale."""

    @functools.wraps(body)
    def traced_body(*args, **kwargs):
        outer = getattr(_inside_inline_op, "active", False)
        _inside_inline_op.active = True
        try:
            return body(*args, **kwargs)
        finally:
            _inside_inline_op.active = outer

    schema = torch.library.infer_schema(body, mutates_args=())  # the body's annotations, in its own module
    op = torch.library.triton_op(name, traced_body, mutates_args=(), schema=schema)
    listed = getattr(torch._library.triton, "triton_ops_to_kernels", None)  # absent where torch keys no cache on them
    if listed is not None:
        listed[name] = list(kernels)
    return op
