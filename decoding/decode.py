"""Token-by-token decoding with a state whose size does not grow with the context.

Per layer the decoder keeps
* the fast weights (and momenta) left by the last *complete* chunk,
* the pending partial chunk, as running sums: its gradient so far, sum over its tokens of
  eta_i,t * grad_{W_i} l_t at those fast weights (`ChunkGradients`, one [B, H, *, *] tensor per fast
  weight), added token by token, or a block of pending tokens at a time (`decoding.pending`); with
  momentum also the sum of its momentum gates [B, H],
* the sliding-window attention's rotated keys and values in a ring buffer of `window` slots.

The semantics are exactly the chunk form's (`TTTLM.forward`): a token of chunk c is answered by
the fast weights after chunk c-1 (plus, token-causal, chunk c's W1 step so far), and chunk c's
update is applied once its last token has been processed. That update costs no more than a token:
its gradient is a sum of per-token terms at the weights entering the chunk, so every token adds its
own term as it arrives (`kernels.lact.chunk_gradients`, the function the recurrent form sums a
chunk with), and the last token only applies momentum (decay = the mean gate), Muon, the signed step
and weight norm to that sum (`kernels.lact.apply_chunk_gradients`, the recurrent form's step).
In linear_attention mode the gradient is G1 = -sum_t eta1_t v_t h(k_t)^T, the chunk scan's update
in gradient units, which is also what token-causal queries add to W1.

`prefill` runs a prompt's complete chunks in the chunk form, answers the remainder as one short
chunk and adds its tokens to the running sums; `decode_step` then consumes one token per call. Both
run without gradients and update the `DecodeState` in place, through the model's own blocks and
layer loop (`TTTLM.hidden_states`) with each mixer's scan and window strategies set for the call
(`decoding_logits`): `PrefillScan` / `PrefillWindow` fill a layer's cache from the prompt,
`StepScan` / `StepWindow` answer one token from it and advance it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Iterator, Optional, Union

import torch
import torch.nn.functional as F

from decoding.pending import (PendingTokens, fold_period, forms_gradient_in_operand_dtype, key_features,
                              w1_chunk_gradient)
from kernels.fast_weights import FAST_WEIGHT_NAMES, ChunkGradients, FastWeights
from kernels.lact import ChunkStep, apply_chunk_gradients, chunk_gradients, swiglu_features
from kernels.token_step import lact_token_step, w1_token_read, w1_token_read_with_key_features, w1_token_step
from model.config import TTTConfig
from model.fast_weight_scan import ScanWeights, TTTInputs, chunk_step, fast_weight_scan
from model.lm import Block, BlockCall, TTTLM
from model.ttt_layer import LocalScan, LocalWindow, RowPositions, TTTMixer


@dataclass
class LayerCache:
    """One layer's decoding state; every tensor has a size fixed by the config, not the context."""

    fast_weights: FastWeights  # after the last complete chunk, [B, H, *, *] (fp32; fp64 in the tests)
    # The partial chunk's gradient so far at fast_weights, [B, H, *, *] per fast weight (with `pending`: of
    # the tokens folded so far, `decoding.pending`)
    chunk_gradients: ChunkGradients
    gate_sum: Optional[torch.Tensor]  # [B, H] sum of the partial chunk's momentum gates (None: momentum off)
    keys: Optional[torch.Tensor]  # [B, A, W, Dh] rotated keys, ring buffer indexed by position % W (None: no window)
    values: Optional[torch.Tensor]  # [B, A, W, Dh]
    pending: Optional[PendingTokens] = None  # the inputs of the tokens not yet in chunk_gradients

    def chunk_sums(self) -> list[torch.Tensor]:
        """The partial chunk's running sums, which restart from zero when its update is applied."""
        gradients = self.chunk_gradients.tensors() if self.chunk_gradients is not None else []
        return gradients + ([self.gate_sum] if self.gate_sum is not None else [])

    def buffers(self) -> list[torch.Tensor]:
        """The preallocated tensors (everything but the fast weights), updated in place while decoding."""
        pending = self.pending.tensors() if self.pending is not None else []
        return self.chunk_sums() + [t for t in (self.keys, self.values) if t is not None] + pending

    def tensors(self) -> list[torch.Tensor]:
        return self.fast_weights.tensors() + self.buffers()


@dataclass
class DecodeState:
    layers: list[LayerCache]
    position: int  # tokens consumed so far; the next token sits at this absolute position

    def memory_bytes(self) -> int:
        """Bytes of the distinct storages the state holds (an expanded view counts once, at its storage's size)."""
        seen: dict[int, int] = {}
        for layer in self.layers:
            for t in layer.tensors():
                storage = t.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
        return sum(seen.values())


def decoding_weights(ttt: TTTConfig, fast: FastWeights) -> FastWeights:
    """`fast` with the fields the decoder's chunk update reads and writes, and only those: the weights
    and, with momentum, the momentum of every fast weight (zero until a first update, which is how
    that update starts it). The fields never change from the first token on, so the state keeps its
    size and states taken at any position stack."""
    if not ttt.momentum:
        return fast.weights()
    return fast.with_momenta(FAST_WEIGHT_NAMES[ttt.fast_weights])


def empty_cache(mixer: TTTMixer, fast: FastWeights, deferred: bool = False) -> LayerCache:
    """A cache with zeroed buffers around the given fast weights (batch, device and state dtype from them);
    `deferred`: the partial chunk's tokens kept and folded into its running gradient a block at a time
    (`decoding.pending`) rather than one by one."""
    cfg = mixer.cfg
    if deferred and cfg.ttt.token_causal:
        raise ValueError("token-causal decoding reads the partial chunk's running W1 gradient every token: "
                         "it cannot defer the chunk's gradient to the chunk's end (decode with deferred=False)")
    fast = decoding_weights(cfg.ttt, fast)
    batch, device, state_dtype = fast.w1.shape[0], fast.w1.device, fast.w1.dtype

    def zeros(*shape: int, dtype: torch.dtype = state_dtype) -> torch.Tensor:
        return torch.zeros(*shape, dtype=dtype, device=device)

    keys = values = None
    if mixer.attn_heads:
        head_dim = cfg.hidden_size // mixer.attn_heads
        model_dtype = mixer.qkv.weight.dtype
        keys, values = (zeros(batch, mixer.attn_heads, cfg.window_size, head_dim, dtype=model_dtype) for _ in range(2))
    pending = None
    if deferred:
        pending = PendingTokens.zeros(batch, cfg.ttt, mixer.num_heads, mixer.head_dim, mixer.inner_dim,
                                      mixer.qkv.weight.dtype, state_dtype, device)  # fmt: skip
    return LayerCache(
        fast_weights=fast,
        chunk_gradients=ChunkGradients.zeros(fast, FAST_WEIGHT_NAMES[cfg.ttt.fast_weights]),
        gate_sum=zeros(batch, mixer.num_heads) if mixer.momentum_proj is not None else None,
        keys=keys,
        values=values,
        pending=pending,
    )


def feature_weights_of_rows(weights: ScanWeights, fast: FastWeights) -> FastWeights:
    """`fast` with the W0, W2 the tokens' features read: with only W1 fast, W0 and W2 never leave their
    learned values, so every row's copy equals the learned [H, dh, d] weights (state dtype), which one
    matrix product reads once for all rows instead of B copies; otherwise the rows' own."""
    if weights.ttt.fast_weights != "w1":
        return fast
    return replace(fast, w0=weights.initial.w0[0], w2=weights.initial.w2[0])


def token_gradients(
    weights: ScanWeights, cache: LayerCache, k: torch.Tensor, v: torch.Tensor, etas: torch.Tensor
) -> ChunkGradients:
    """The tokens' ([B, n]: k, v [B, n, H, d], etas [B, n, 3, H]) summed terms of their chunk's gradient at
    the weights entering the chunk (state dtype)."""
    fast, dtype = feature_weights_of_rows(weights, cache.fast_weights), cache.fast_weights.w1.dtype
    eta0, eta1, eta2 = etas.to(dtype).unbind(dim=2)  # [B, n, H] each
    return chunk_gradients(k.to(dtype), v.to(dtype), eta0, eta1, eta2, fast, weights.ttt.fast_weights, weights.features)


def absorb_tokens(weights: ScanWeights, cache: LayerCache, inputs: TTTInputs, positions: torch.Tensor) -> None:
    """Add the tokens at `positions` [B, n] to the partial chunk, in place: their terms of its gradient
    to the running sums; or, with pending slots of P tokens and the first position a multiple of P (a
    prompt's tokens after its last complete chunk), the terms of the first n - n % P tokens and the inputs
    of the others to their slots; and their momentum gates."""
    if cache.pending is None:
        cache.chunk_gradients.add_(token_gradients(weights, cache, inputs.k, inputs.v, inputs.etas))
    else:
        pending, tokens = cache.pending, inputs.k.shape[1]
        folded = tokens - tokens % pending.v.shape[1]
        keys = key_features(weights.ttt, pending, inputs.k, weights.features, weights.feature_weights)
        if folded:
            cache.chunk_gradients.add_(pending_gradients(weights, cache, keys[:, :folded], inputs.v[:, :folded],
                                                         inputs.etas[:, :folded]))  # fmt: skip
        if folded < tokens:
            pending.write(positions[:, folded:], keys[:, folded:], inputs.v[:, folded:], inputs.etas[:, folded:])
    add_momentum_gates(cache, inputs)


def pending_gradients(
    weights: ScanWeights, cache: LayerCache, keys: torch.Tensor, v: torch.Tensor, etas: torch.Tensor
) -> ChunkGradients:
    """The summed terms of tokens as pending slots keep them ([B, n]: keys k or h(k), `decoding.pending
    .keys_as_features`; v; etas): one chunk update of 16-bit features where
    `decoding.pending.forms_gradient_in_operand_dtype`, `token_gradients` in the state dtype otherwise."""
    if forms_gradient_in_operand_dtype(weights.ttt, cache.pending):
        return ChunkGradients(g1=w1_chunk_gradient(keys, v, etas, weights.ttt.use_kernel))
    return token_gradients(weights, cache, keys, v, etas)


def fold_pending(weights: ScanWeights, cache: LayerCache, rows: Optional[torch.Tensor] = None) -> None:
    """Add the P pending slots' terms to the running sums, in place, of the rows where `rows` ([B] bool,
    on the device) is set (their slots all hold this period's tokens), or of every row (None)."""
    pending = cache.pending
    terms = pending_gradients(weights, cache, pending.k, pending.v, pending.etas)
    for total, term in zip(cache.chunk_gradients.tensors(), terms.tensors()):
        if rows is None:
            total.add_(term)
        else:
            total.add_(torch.where(row_mask(rows, term), term, 0.0))


def ttt_token_output(weights: ScanWeights, cache: LayerCache, inputs: TTTInputs, positions: torch.Tensor) -> torch.Tensor:
    """The fast-weight branch for one token per row at `positions` [B, 1] -> [B, 1, H, d]. The token joins
    its chunk first; then W1 after the last complete chunk answers it, plus (token-causal) the partial
    chunk's W1 step so far, -update_sign * G1 (the chunk form's intra-chunk term): one fused op
    (`kernels.token_step`) where the Triton kernels run (`model.ttt.use_kernel`), its torch form elsewhere."""
    if cache.pending is not None:
        return pending_token_output(weights, cache, inputs, positions)
    if weights.ttt.fast_weights == "w1":
        return w1_token_output(weights, cache, inputs)
    ttt = weights.ttt
    out = lact_token_step(inputs.q[:, 0], inputs.k[:, 0], inputs.v[:, 0], inputs.etas[:, 0], cache.fast_weights,
                          cache.chunk_gradients, ttt.update_sign, ttt.token_causal, allow_triton=ttt.use_kernel)
    add_momentum_gates(cache, inputs)
    return out[:, None]


def w1_token_output(weights: ScanWeights, cache: LayerCache, inputs: TTTInputs) -> torch.Tensor:
    """`ttt_token_output` with only W1 fast, through `kernels.token_step.w1_token_step`: the token's
    features (from the learned W0, W2), its term of the chunk's gradient and its read in one kernel
    where the Triton kernels run (`model.ttt.use_kernel`), the same maths in torch elsewhere."""
    ttt = weights.ttt
    w0, w2 = learned_feature_weights(weights)
    eta1 = inputs.etas[:, 0, 1]  # [B, H]
    out = w1_token_step(inputs.q[:, 0], inputs.k[:, 0], inputs.v[:, 0], eta1, w0, w2, cache.fast_weights.w1,
                        cache.chunk_gradients.g1, ttt.update_sign, ttt.token_causal, allow_triton=ttt.use_kernel)
    add_momentum_gates(cache, inputs)
    return out[:, None]


def learned_feature_weights(weights: ScanWeights) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The learned W0, W2 [H, dh, d] the W1-only token kernels featurise with, as learned (they read them
    in fp32); (None, None) for the identity map."""
    return weights.feature_weights if weights.features is swiglu_features else (None, None)


def pending_token_output(
    weights: ScanWeights, cache: LayerCache, inputs: TTTInputs, positions: torch.Tensor
) -> torch.Tensor:
    """`ttt_token_output` where the cache keeps pending tokens: the token's inputs go to its slot, and
    the fast weights after the last complete chunk answer it, W1 h(q) (never token-causal here): the
    read alone, with the learned W0, W2 in one kernel (`kernels.token_step.w1_token_read`) where only W1
    is fast, with the rows' own W0, W2 in torch otherwise. Where the slots keep the keys' features
    (`decoding.pending.keys_as_features`) the read kernel forms h(k) too."""
    ttt, fast, pending = weights.ttt, cache.fast_weights, cache.pending
    add_momentum_gates(cache, inputs)
    if forms_gradient_in_operand_dtype(ttt, pending):
        out, hk = w1_token_read_with_key_features(inputs.q[:, 0], inputs.k[:, 0], *learned_feature_weights(weights),
                                                  fast.w1, allow_triton=ttt.use_kernel)  # fmt: skip
        pending.write(positions, hk[:, None], inputs.v, inputs.etas)
        return out[:, None]
    pending.write(positions, inputs.k, inputs.v, inputs.etas)
    if ttt.fast_weights == "w1":
        return w1_token_read(inputs.q[:, 0], *learned_feature_weights(weights), fast.w1, allow_triton=ttt.use_kernel)[:, None]
    hq = weights.features(inputs.q.to(fast.w1.dtype), fast.w0, fast.w2)  # [B, 1, H, dh], the rows' own W0, W2
    return torch.einsum("bhde,bnhe->bnhd", fast.w1, hq)


def add_momentum_gates(cache: LayerCache, inputs: TTTInputs) -> None:
    """Add the tokens' ([B, n]) momentum gates to the partial chunk's sum (no-op with momentum off)."""
    if cache.gate_sum is not None:
        cache.gate_sum += inputs.momentum_gate.sum(dim=1).to(cache.gate_sum.dtype)


def chunk_update(weights: ScanWeights, cache: LayerCache) -> FastWeights:
    """The fast weights after the partial chunk's update, for every row [B, H, *, *] (rows whose chunk is
    not complete discard it): momentum, Muon, the signed step and weight norm (`chunk_update_inputs`)."""
    return apply_chunk_gradients(*chunk_update_inputs(weights, cache))


def chunk_update_inputs(
    weights: ScanWeights, cache: LayerCache
) -> tuple[FastWeights, ChunkGradients, Optional[torch.Tensor], ChunkStep]:
    """What `kernels.lact.apply_chunk_gradients` takes for the partial chunk: the fast weights, the chunk's
    gradient (the running sums; pending tokens are folded into them first, `fold_pending`), its momentum
    decay (the mean of its C gates, [B, H]; None with momentum off) and the step's options."""
    beta = None if cache.gate_sum is None else cache.gate_sum / weights.ttt.chunk_size
    return cache.fast_weights, cache.chunk_gradients, beta, chunk_step(weights, cache.fast_weights.w1.dtype)


def restart_chunk_sums(cache: LayerCache, rows: Optional[torch.Tensor] = None) -> None:
    """Zero the running sums in place, of the rows where `rows` ([B] bool, on the device) is set, or
    of every row (None): their chunk's update has been applied and the next chunk starts empty."""
    for total in cache.chunk_sums():
        if rows is None:
            total.zero_()
        else:
            total.masked_fill_(row_mask(rows, total), 0.0)


def row_mask(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`rows` ([B] bool) shaped to broadcast over `like` [B, ...]: the rows a masked state update touches."""
    return rows.view(-1, *[1] * (like.dim() - 1))


def store_window(cache: LayerCache, mixer: TTTMixer, q, k, v, positions: torch.Tensor) -> torch.Tensor:
    """Write the rotated keys/values of [B, n] projections at absolute `positions` [B, n] (any
    position per row) into the ring slots position % W; return rotated q [B, A, n, Dh]."""
    q_rot, k_rot, v_heads = mixer.attention_heads(q, k, v, 0, positions)  # [B, n, A, Dh]
    n = k_rot.shape[1]
    kept = min(n, mixer.cfg.window_size)  # only the last `window` tokens can ever be attended to again
    rows = torch.arange(k.shape[0], device=k.device)[:, None]
    slots = positions[:, n - kept :] % mixer.cfg.window_size  # [B, kept]
    cache.keys[rows, :, slots] = k_rot[:, n - kept :]  # advanced indices first: the target is [B, kept, A, Dh]
    cache.values[rows, :, slots] = v_heads[:, n - kept :]
    return q_rot.transpose(1, 2)


@dataclass
class PrefillScan(LocalScan):
    """The scan over a whole prompt [B, P] from position 0, filling `cache`.

    Complete chunks run in the chunk form (their final state becomes the cache's fast weights); the
    remainder is answered as one short chunk from that state, and its tokens join the partial chunk
    (its update waits for the chunk's last token).
    """

    cache: LayerCache  # built around the learned initial fast weights

    def __call__(
        self, weights: ScanWeights, x: torch.Tensor, inputs: TTTInputs, state: Optional[FastWeights], rows: RowPositions
    ) -> tuple[torch.Tensor, FastWeights]:
        """x [B, P, D] and its inputs -> ([B, P, H, d] output, the fast weights after the complete chunks)."""
        cache, prompt_len, w1_chunk_scan = self.cache, x.shape[1], self.w1_chunk_scan(weights.ttt)
        complete = prompt_len - prompt_len % weights.ttt.chunk_size
        outputs = []
        if complete:
            out, fast = fast_weight_scan(weights, _slice_inputs(inputs, 0, complete), cache.fast_weights, w1_chunk_scan)
            cache.fast_weights = decoding_weights(weights.ttt, fast)  # `prefill` gives them their own storage
            outputs.append(out)
        if complete < prompt_len:
            remainder = _slice_inputs(inputs, complete, prompt_len)
            outputs.append(fast_weight_scan(weights, remainder, cache.fast_weights, w1_chunk_scan)[0])
            positions = torch.arange(complete, prompt_len, device=x.device).expand(x.shape[0], -1) + rows.offset
            absorb_tokens(weights, cache, remainder, positions)
        return torch.cat(outputs, dim=1), cache.fast_weights


@dataclass
class PrefillWindow(LocalWindow):
    """The window attention over a whole prompt (the local one, with the block mask the model builds
    once for all layers where it runs FlexAttention), keeping its last rotated keys and values in
    `cache`'s ring."""

    reads_window_mask = True

    cache: LayerCache

    def __call__(
        self, mixer: TTTMixer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: RowPositions, window_mask: Any
    ) -> torch.Tensor:
        """[B, P, D] projections of the prompt -> [B, P, D]."""
        attention = mixer.attention_branch(q, k, v, rows.offset, window_mask=window_mask)
        batch, prompt_len = q.shape[:2]
        positions = torch.arange(rows.offset, rows.offset + prompt_len, device=q.device).expand(batch, -1)
        store_window(self.cache, mixer, q, k, v, positions)
        return attention


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """t itself, or a copy when t is a view into a larger buffer (the parallel scan returns its final
    state as a slice of all chunk states, which would keep O(prompt length) memory alive)."""
    return t.clone() if t.untyped_storage().nbytes() > t.numel() * t.element_size() else t


def _slice_inputs(inputs: TTTInputs, start: int, end: int) -> TTTInputs:
    gate = inputs.momentum_gate
    return TTTInputs(*(None if t is None else t[:, start:end] for t in (inputs.q, inputs.k, inputs.v, inputs.etas, gate)))


@dataclass
class StepScan(LocalScan):
    """The scan for one token per row, every row at the same int position, from `cache`: the token
    joins the partial chunk's running sums and is answered by the fast weights before it; the chunk's
    update is applied from those sums when its last token arrives."""

    cache: LayerCache

    def __call__(
        self, weights: ScanWeights, x: torch.Tensor, inputs: TTTInputs, state: Optional[FastWeights], rows: RowPositions
    ) -> tuple[torch.Tensor, FastWeights]:
        """x [B, 1, D] and its inputs at the int position `rows.offset` -> ([B, 1, H, d] output, the cache's
        fast weights)."""
        cache, chunk = self.cache, weights.ttt.chunk_size
        ttt_out = ttt_token_output(weights, cache, inputs, torch.full((x.shape[0], 1), rows.offset, device=x.device))
        period = fold_period(weights.ttt)
        if cache.pending is not None and rows.offset % period == period - 1:
            fold_pending(weights, cache)  # the slots are full: their tokens join the running sums
        if rows.offset % chunk == chunk - 1:  # the chunk is complete: apply its update
            cache.fast_weights = chunk_update(weights, cache)
            restart_chunk_sums(cache)
        return ttt_out, cache.fast_weights


@dataclass
class StepWindow(LocalWindow):
    """The window attention of one token per row at one int position over `cache`'s ring, which it
    joins first."""

    reads_window_mask = False

    cache: LayerCache

    def __call__(
        self, mixer: TTTMixer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: RowPositions, window_mask: Any
    ) -> torch.Tensor:
        """[B, 1, D] projections -> [B, 1, D]."""
        cache = self.cache
        positions = torch.full((q.shape[0], 1), rows.offset, device=q.device)
        q_rot = store_window(cache, mixer, q, k, v, positions)
        filled = min(rows.offset + 1, mixer.cfg.window_size)
        keys, values = cache.keys[:, :, :filled], cache.values[:, :, :filled]  # ring slots fill in order
        return F.scaled_dot_product_attention(q_rot, keys, values).transpose(1, 2).reshape(q.shape)


@contextmanager
def mixer_strategies(model: TTTLM, strategies: list[tuple[LocalScan, LocalWindow]]) -> Iterator[None]:
    """Each layer's mixer runs with its (scan, window) pair inside the block; the previous ones come back after."""
    mixers = [block.mixer for block in model.blocks]
    previous = [(mixer.scan, mixer.window) for mixer in mixers]
    try:
        for mixer, (scan, window) in zip(mixers, strategies):
            mixer.set_strategies(scan, window)
        yield
    finally:
        for mixer, (scan, window) in zip(mixers, previous):
            mixer.set_strategies(scan, window)


def decoding_logits(
    model: TTTLM, strategies: list[tuple[LocalScan, LocalWindow]], input_ids: torch.Tensor,
    position_offset: Union[int, torch.Tensor], keep_last: Optional[int] = None, call_block: BlockCall = Block.forward,
) -> torch.Tensor:
    """The LM's logits [B, n, V] for ids [B, n] at `position_offset` (an int, or [B] per row), with each
    layer's mixer running its (scan, window) pair: the model's own blocks, layer loop and head. Each
    block runs through `call_block`: its plain forward, not the trainer's compiled module (whose graph
    was traced with the training strategies), or a decoder's compiled step (`decoding.compiled`).
    `keep_last` k: the head reads only the last k rows, [B, min(k, n), V] (a long prompt's [P, V]
    logits are never formed)."""
    with mixer_strategies(model, strategies):
        hidden, _ = model.hidden_states(input_ids, position_offset=position_offset, call_block=call_block)
    if keep_last is not None:
        hidden = hidden[:, -keep_last:]
    return F.linear(model.final_norm(hidden), model.output_weight())


@torch.no_grad()
def prefill(
    model: TTTLM, input_ids: torch.Tensor, keep_last: Optional[int] = None, call_block: BlockCall = Block.forward,
    deferred: bool = False,
) -> tuple[torch.Tensor, DecodeState]:
    """Run a batch of equal-length prompts [B, P] (P >= 1) -> (logits [B, P, V], or of the last
    `keep_last` positions, and the state ready for position P). `call_block` runs each block (its
    compiled form: `decoding.compiled.block_step`, one graph per prompt length); `deferred`: the state
    keeps the partial chunk as pending tokens (`decoding.pending`)."""
    if input_ids.shape[1] < 1:
        raise ValueError("prefill needs at least one prompt token per sequence")
    batch = input_ids.shape[0]
    caches = [empty_cache(block.mixer, block.mixer.initial_state(batch), deferred) for block in model.blocks]
    strategies = [(PrefillScan(cache), PrefillWindow(cache)) for cache in caches]
    logits = decoding_logits(model, strategies, input_ids, 0, keep_last, call_block)
    for cache in caches:
        cache.fast_weights = cache.fast_weights.map(_own_storage)
    return logits, DecodeState(caches, input_ids.shape[1])


@torch.no_grad()
def decode_step(model: TTTLM, state: DecodeState, token_ids: torch.Tensor) -> torch.Tensor:
    """Consume one token per sequence (token_ids [B]) at `state.position` -> next-token logits [B, V]."""
    strategies = [(StepScan(cache), StepWindow(cache)) for cache in state.layers]
    logits = decoding_logits(model, strategies, token_ids[:, None], state.position)
    state.position += 1
    return logits[:, 0]


def random_state(
    model: TTTLM, batch: int, position: int, generator: Optional[torch.Generator] = None, deferred: bool = False
) -> DecodeState:
    """A state as if `position` tokens had been consumed, with random contents (for timing only;
    `deferred`: pending tokens, as `prefill`'s).

    Its size does not depend on `position`, so benchmarks at a 1M-token context can skip the prefill.
    `generator` is a CPU generator; the values are moved to the model's device.
    """
    device = model.embed.weight.device

    def noise(like: torch.Tensor) -> torch.Tensor:
        return torch.rand(like.shape, generator=generator, dtype=like.dtype).to(device)

    caches = []
    for block in model.blocks:
        fast = decoding_weights(block.mixer.cfg.ttt, block.mixer.initial_state(batch)).map(lambda w: w + 0.01 * noise(w))
        cache = empty_cache(block.mixer, fast, deferred)
        for buffer in cache.buffers():
            buffer.copy_(noise(buffer))
        caches.append(cache)
    return DecodeState(caches, position)
