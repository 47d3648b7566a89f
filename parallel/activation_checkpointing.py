"""Activation checkpointing per block, applied from outside the model like the other wrappers of parallel/.

Each `Block.forward` is replaced on the instance by a wrapper that runs it under
torch.utils.checkpoint (the non-reentrant variant: it supports keyword arguments, non-tensor inputs
such as a None fast-weight state, and ZeRO-3's parameter hooks during recomputation). Two policies
(`train.activation_checkpointing_policy`, whose values the run config checks):

* `full`: the block's activations are dropped after the forward and the whole block is recomputed in
  the backward: ~1/3 more compute for memory that no longer grows with depth x length;
* `selective`: the outputs of the matrix products (GEMMs, attention, the TTT kernels: the expensive
  ops) are kept and only the cheap elementwise glue between them (casts, SiLU, norms, RoPE, residuals)
  is recomputed. Most of the memory of a block sits in that glue's intermediates at long context, and
  recomputing it costs a few percent of the step instead of a third.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from model.baseline import BaselineBlock
from model.lm import Block


def _expensive_ops() -> set:
    """The ops whose outputs `selective` keeps: matrix products, attention and the project's own kernels."""
    aten = torch.ops.aten
    ops = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
           aten._scaled_dot_product_efficient_attention.default, aten._scaled_dot_product_flash_attention.default,
           aten._scaled_dot_product_cudnn_attention.default}
    tttla = getattr(torch.ops, "tttla", None)
    for name in dir(tttla) if tttla is not None else []:
        packet = getattr(tttla, name)
        if hasattr(packet, "default"):
            ops.add(packet.default)
    return ops


def _selective_context() -> Callable[[], Any]:
    keep = _expensive_ops()

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        return CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE

    return functools.partial(create_selective_checkpoint_contexts, policy)


def checkpoint_blocks(model: nn.Module, selective: bool = False) -> int:
    """Wrap every block of `model` (a TTTLM's, or the baseline transformer's, so that both are measured
    alike) in activation checkpointing, `full` or `selective`; returns how many were wrapped."""
    options: dict[str, Any] = {"use_reentrant": False}
    if selective:
        options["context_fn"] = _selective_context()
    blocks = [module for module in model.modules() if isinstance(module, (Block, BaselineBlock))]
    for block in blocks:
        plain_forward = block.forward

        @functools.wraps(plain_forward)
        def checkpointed(*args: Any, _forward=plain_forward, **kwargs: Any) -> Any:
            return checkpoint(_forward, *args, **options, **kwargs)

        block.forward = checkpointed
    return len(blocks)
