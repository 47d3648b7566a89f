"""The output head and its cross-entropy, without materialising fp32 [T, V] logits.

At long context the logits are the largest activation of a small model: 64K tokens x 32000 vocabulary
in fp32 is 7.8 GiB, with as much again for their gradient. `linear_cross_entropy` walks the tokens in
chunks: each chunk's logits are formed, reduced to its loss and turned into its gradients at once
(d hidden = (softmax - onehot) W, d W += (softmax - onehot)^T hidden), then dropped. Peak extra memory
is one chunk of logits; the backward pass only scales the stored gradients by the incoming one. This is
the fused linear cross-entropy of Liger / fla, written plainly in PyTorch so it runs, and is tested, on
CPU as well.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from model.layers import compute_dtype

IGNORE_INDEX = -100
# Tokens per chunk: chunk x vocabulary fp32 logits (and their softmax) at a time, 2 x 256 MiB at V = 32000.
LOSS_CHUNK_TOKENS = 2048


def chunk_terms(
    logits: torch.Tensor, targets: torch.Tensor, reduce_dtype: torch.dtype, grad_dtype: torch.dtype, want_grad: bool
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One chunk's [n, V] logits and targets -> (the summed loss of its targets that are not IGNORE_INDEX,
    and d loss / d logits = softmax - onehot (zero rows for ignored targets) in `grad_dtype`, or None).

    Everything between the chunk's two matrix products: eagerly about eight passes over [n, V] fp32;
    compiled (`loss_backend`), Inductor fuses them into a few."""
    logits = logits.to(reduce_dtype)
    valid = targets != IGNORE_INDEX
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    log_normaliser = torch.logsumexp(logits, dim=-1)
    target_logit = logits.gather(1, safe_targets[:, None])[:, 0]
    loss = torch.where(valid, log_normaliser - target_logit, torch.zeros_like(target_logit)).sum()
    if not want_grad:
        return loss, None
    grad = torch.exp(logits.sub_(log_normaliser[:, None]))  # softmax, in place of the logits
    grad[torch.arange(grad.shape[0], device=grad.device), safe_targets] -= 1.0
    grad.mul_(valid[:, None])
    return loss, grad.to(grad_dtype)


class LinearCrossEntropy(torch.autograd.Function):
    """sum over targets != IGNORE_INDEX of -log softmax(hidden W^T)[target]; gradients formed in the forward.

    Logits, loss and the weight gradient are reduced in fp32 (float64 for float64 inputs); the GEMMs run in
    the compute dtype (autocast's, else the input's). `terms` is `chunk_terms` or its compiled form.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
                terms: Callable = chunk_terms) -> torch.Tensor:  # fmt: skip
        dtype = compute_dtype(hidden)  # autocast's, as F.linear would run
        want_hidden_grad, want_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        reduce_dtype = torch.promote_types(dtype, torch.float32)  # fp32, or float64 in the proofs
        with torch.autocast(hidden.device.type, enabled=False):
            h_all, w = hidden.to(dtype), weight.to(dtype)
            loss = torch.zeros((), dtype=reduce_dtype, device=hidden.device)
            dhidden = torch.empty_like(hidden) if want_hidden_grad else None
            dweight = torch.zeros(weight.shape, dtype=reduce_dtype, device=weight.device) if want_weight_grad else None
            for start in range(0, hidden.shape[0], chunk_tokens):
                h, t = h_all[start : start + chunk_tokens], targets[start : start + chunk_tokens]
                # [n, V]: the only logits alive at a time
                chunk_loss, grad = terms(h @ w.t(), t, reduce_dtype, dtype, want_hidden_grad or want_weight_grad)
                loss += chunk_loss
                if dhidden is not None:
                    dhidden[start : start + chunk_tokens] = grad @ w
                if dweight is not None:
                    dweight += (grad.t() @ h).to(reduce_dtype)
        ctx.save_for_backward(dhidden, dweight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        dhidden, dweight = ctx.saved_tensors
        dh = None if dhidden is None else dhidden * grad_loss.to(dhidden.dtype)
        dw = None if dweight is None else (dweight * grad_loss.to(dweight.dtype)).to(ctx.weight_dtype)
        return dh, dw, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int = LOSS_CHUNK_TOKENS,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """hidden [N, D], weight [V, D], targets [N] -> summed cross-entropy (fp32 scalar) of the targets that
    are not IGNORE_INDEX, as F.cross_entropy(hidden @ weight.T, targets, reduction="sum") computes it.
    `backend`: compile each chunk's elementwise work with it (None: eager)."""
    return LinearCrossEntropy.apply(hidden, weight, targets, chunk_tokens, compiled_chunk_terms(backend))


@functools.cache
def compiled_chunk_terms(backend: Optional[str]) -> Callable:
    """`chunk_terms`, or its compiled form (one graph; static shapes: every chunk but the last has the same)."""
    if backend is None:
        return chunk_terms
    return torch.compile(chunk_terms, fullgraph=True, dynamic=False, backend=backend)


def head_and_loss(
    hidden: torch.Tensor, weight: torch.Tensor, targets: Optional[torch.Tensor], return_logits: bool,
    loss_backend: Optional[str] = None,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The LM head on normalised hidden [B, T, D]: (logits [B, T, V] or None, loss sum, target count).

    Without logits to return, the loss takes the chunked path (its elementwise work compiled by
    `loss_backend` when given); with them it reuses the logits.
    """
    logits = F.linear(hidden, weight) if return_logits or targets is None else None
    if targets is None:
        return logits, None, None
    flat_targets = targets.flatten()
    if logits is None:
        loss_sum = linear_cross_entropy(hidden.flatten(0, 1), weight, flat_targets, backend=loss_backend)
    else:
        reduce_dtype = torch.promote_types(logits.dtype, torch.float32)
        loss_sum = F.cross_entropy(logits.flatten(0, 1).to(reduce_dtype), flat_targets, ignore_index=IGNORE_INDEX,
                                   reduction="sum")
    return logits, loss_sum, (targets != IGNORE_INDEX).sum()
