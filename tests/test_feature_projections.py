"""`model.ttt.save_feature_projections`: the feature kernel keeps its SwiGLU projections for the
backward, or recomputes them there; the layer computes the same outputs and gradients either way.

Runs the Triton kernels through the interpreter (fp32, where it is exact) in a linear_attention mixer,
and lists what autograd saves: with the setting off, no [T, H, 2 dh] projection tensor is kept.
"""

from __future__ import annotations

import os

import pytest
import torch

from model.config import LMConfig, TTTConfig
from model.ttt_layer import TTTMixer

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the Triton kernels run on CPU only under TRITON_INTERPRET=1")  # fmt: skip

HIDDEN, HEADS, SEQ = 32, 2, 24
INNER = TTTConfig(num_heads=HEADS).resolved_inner_dim(HIDDEN)  # dh


def run(save: bool) -> tuple[list[torch.Tensor], list[tuple[int, ...]]]:
    """(output and every gradient, the shapes autograd saved) of one mixer forward + backward."""
    torch.manual_seed(0)
    # The features as their own op (the setting's subject); with recompute_features they keep nothing anyway.
    ttt = TTTConfig(num_heads=HEADS, chunk_size=8, mode="linear_attention", fast_weights="w1",
                    save_feature_projections=save, recompute_features=False)  # fmt: skip
    mixer = TTTMixer(LMConfig(hidden_size=HIDDEN, num_layers=1, num_attn_heads=2, window_size=0, ttt=ttt))
    x = torch.randn(1, SEQ, HIDDEN, requires_grad=True)
    saved: list[tuple[int, ...]] = []

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        out, _ = mixer(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    return [out.detach(), x.grad, *(p.grad for p in mixer.parameters() if p.grad is not None)], saved


def test_recomputed_projections_give_the_same_layer_and_are_not_kept(monkeypatch):
    monkeypatch.setenv("TTTLA_KERNELS", "triton")
    kept, kept_shapes = run(save=True)
    recomputed, recomputed_shapes = run(save=False)
    for a, b in zip(kept, recomputed, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)  # fp32, the same products in another kernel pass
    projections = (SEQ, HEADS, 2 * INNER)  # a, b of one input, as the feature kernel writes them
    assert kept_shapes.count(projections) == 2  # q's and k's
    assert recomputed_shapes.count(projections) == 0
