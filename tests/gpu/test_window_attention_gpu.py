"""The sliding-window kernels (kernels/window_attention.py) compiled for the GPU against float64.

Model shapes (12 heads of 64, a window of 2048; 8 heads of 128), bf16 as the model runs them, lengths
that are not multiples of the tiles, with and without packed documents; output and the three input
gradients against the float64 blockwise SDPA band (`model.swa.blockwise_band_attention`, O(T * W)
memory, so 8K tokens fit). Tolerance: bf16 inputs and outputs (2^-8 relative) around fp32 softmax
and accumulation.
"""

from __future__ import annotations

import pytest
import torch

from kernels.window_attention import window_attention
from model.swa import blockwise_band_attention
from verification.proof import relative_error

pytestmark = pytest.mark.gpu
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
BF16_TOLERANCE = 1.5e-2


def documents(seq_len: int) -> torch.Tensor:
    ids = torch.zeros(1, seq_len, dtype=torch.long, device="cuda")
    for cut in (seq_len // 5, seq_len // 5 + 1, seq_len // 2):
        ids[:, cut:] += 1
    return ids


@requires_cuda
@pytest.mark.parametrize("seq_len, heads, head_dim, window, packed", [
    (8191, 12, 64, 2048, False), (4099, 12, 64, 2048, True), (3001, 8, 128, 1000, False), (77, 4, 64, 2048, False),
])  # fmt: skip
def test_window_kernels_on_the_gpu(seq_len: int, heads: int, head_dim: int, window: int, packed: bool) -> None:
    g = torch.Generator(device="cuda").manual_seed(seq_len)
    qkv = torch.randn(1, seq_len, 3, heads, head_dim, generator=g, device="cuda")
    cotangent = torch.randn(1, seq_len, heads, head_dim, generator=g, device="cuda")
    doc_ids = documents(seq_len) if packed else None
    results = []
    for dtype, attend in ((torch.bfloat16, window_attention), (torch.float64, blockwise_band_attention)):
        leaf = qkv.to(dtype).requires_grad_()
        out = attend(*leaf.unbind(dim=2), window, doc_ids)
        out.backward(cotangent.to(dtype))
        results.append([out.detach(), *leaf.grad.unbind(dim=2)])
    for name, got, expected in zip(("output", "dq", "dk", "dv"), *results):
        assert got.dtype == torch.bfloat16, name
        assert relative_error(got.double(), expected) < BF16_TOLERANCE, name


@requires_cuda
@pytest.mark.gpu_slow  # two models compiled by Inductor: about a minute or two
def test_compiled_model_with_the_triton_window_equals_the_flex_one() -> None:
    """`model.window_kernel=triton` in the trainer's compiled blocks (fullgraph, Inductor, bf16 autocast):
    the loss and parameter gradients of a small LM match those with FlexAttention's window."""
    from model.config import LMConfig, TTTConfig
    from model.lm import TTTLM
    from train.compile import compile_blocks

    def loss_and_grads(window_kernel: str) -> list[torch.Tensor]:
        torch.manual_seed(0)
        cfg = LMConfig(vocab_size=512, hidden_size=256, num_layers=2, num_attn_heads=4, window_size=256,
                       window_kernel=window_kernel, ttt=TTTConfig(num_heads=2, chunk_size=256))  # fmt: skip
        model = TTTLM(cfg).cuda()
        compile_blocks(model)
        ids = torch.randint(0, 512, (1, 2049), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids[:, :-1], ids[:, 1:]).loss
        loss.backward()
        return [loss.detach(), *(p.grad for p in model.parameters())]

    for got, expected in zip(loss_and_grads("triton"), loss_and_grads("flex")):
        assert relative_error(got.double(), expected.double()) < 3e-2
