"""Suite-wide set-up that must happen before any test module imports Triton.

On a host without CUDA, Triton kernels can only run in its interpreter, and `@triton.jit` decides
interpreted-or-compiled when the kernel module is first imported. Whichever test happens to import
`kernels` first would otherwise fix that choice for the whole session, so it is fixed here.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
