"""Decoding with every buffer allocated once and updated in place, one position per row.

`decoding/decode.py` defines the semantics (and is proven equal to the chunk form); this module runs
the same computation in the shape a CUDA graph can replay:
* the state lives in static tensors: the fast weights, the partial chunk's running sums, the window
  ring, each row's absolute position [B] on the device; a step writes into them and allocates
  nothing that outlives it;
* rows sit at their own positions, so prompts of different lengths decode together: each prompt is
  prefilled on its own (or with prompts of its length) and the constant-size states are stacked.
  Left-padding would be wrong here: pad tokens would enter the fast weights and shift every later
  chunk boundary. Per-row positions keep every row's chunk boundaries where its own sequence has them;
* no value is read back to the host: where a row completes a chunk is a device flag
  (position % C == C - 1), and the chunk update is a fixed-shape computation from every row's
  running sums whose result is kept only where the flag is set (`torch.where`), so rows at other
  phases are untouched.

Every token adds its terms of its chunk's gradient to the running sums inside `forward_token`, so
the chunk update `apply_chunk_updates` reads no token: momentum, Muon, the signed step and weight
norm on [B, H, d, dh]-sized sums, the work of about one token (`decoding/decode.py`). From
`decoding.pending.DEFER_FROM_BATCH` rows on, the tokens are kept instead and folded into the sums
every P tokens (`decoding.pending.fold_period`) by the same call, before any chunk update: lighter
token steps, a heavier step every P tokens. It runs at the steps where some row completes a chunk or
fills its slots, which the host knows from its own count of the steps without reading the device
(`decoding.graphs` launches it with the token step as one graph).
`forward_token` runs the model's own blocks with each mixer's strategies set to `RowStepScan` /
`RowStepWindow` (`decoding.decode.decoding_logits`), rows at their own positions.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Optional, Union

import torch

from decoding.compiled import block_step, chunk_update_step
from decoding.decode import DecodeState, LayerCache, decoding_logits, prefill, store_window, ttt_token_output
from decoding.pending import defers_chunk_gradients
from kernels.fast_weights import FastWeights, PerSequenceTensors
from kernels.ring_attention import ring_attention
from model.fast_weight_scan import ScanWeights, TTTInputs
from model.lm import Block, BlockCall, TTTLM
from model.ttt_layer import LocalScan, LocalWindow, RowPositions, TTTMixer


@dataclass
class RowStepScan(LocalScan):
    """The scan for one token per row, each row at its own position ([B] `rows.offset`): the
    token joins its row's running sums and is answered from `cache`; the chunk updates wait for
    `StaticDecoder.apply_chunk_updates`."""

    cache: LayerCache

    def __call__(
        self, weights: ScanWeights, x: torch.Tensor, inputs: TTTInputs, state: Optional[FastWeights], rows: RowPositions
    ) -> tuple[torch.Tensor, FastWeights]:
        """x [B, 1, D] and its inputs -> ([B, 1, H, d] output, the cache's fast weights)."""
        return ttt_token_output(weights, self.cache, inputs, rows.offset[:, None]), self.cache.fast_weights


@dataclass
class RowStepWindow(LocalWindow):
    """The window attention of one token per row, each row at its own position, over `cache`'s whole
    ring, counting the slots filled so far (fixed shapes; `kernels.ring_attention`)."""

    reads_window_mask = False

    cache: LayerCache

    def __call__(
        self, mixer: TTTMixer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: RowPositions, window_mask: Any
    ) -> torch.Tensor:
        """[B, 1, D] projections -> [B, 1, D]."""
        q_rot = store_window(self.cache, mixer, q, k, v, rows.offset[:, None])  # [B, A, 1, Dh]
        out = ring_attention(q_rot[:, :, 0], self.cache.keys, self.cache.values, rows.offset,
                             allow_triton=mixer.cfg.ttt.use_kernel)  # [B, A, Dh]
        return out.reshape(q.shape)


@dataclass
class StaticDecoder:
    """The decoding state of B rows in static buffers, and the in-place step over it."""

    model: TTTLM
    layers: list[LayerCache]  # fast weights materialised [B, H, *, *] (momenta zero until a chunk fills them)
    positions: torch.Tensor  # [B] int64: the absolute position of each row's next token
    host_positions: list[int]  # the same positions, counted on the host (never read from the device)
    tokens: torch.Tensor  # [B] int64: the tokens the next step consumes (written by the caller or the sampler)
    logits: torch.Tensor  # [B, V]: the next-token logits the last step produced
    completes: torch.Tensor  # [B] bool: whether the last step's token completed its row's chunk
    folds: torch.Tensor  # [B] bool: whether it filled its row's pending slots (`decoding.pending`)
    step_backend: Optional[str] = None  # None: eager steps; else each layer's step compiled by it (`compile_steps`)

    @classmethod
    def from_states(cls, model: TTTLM, states: list[DecodeState], order: Optional[torch.Tensor] = None) -> "StaticDecoder":
        """Stack the rows of prefilled states (any positions) into static buffers; `order` [B] picks
        and orders the stacked rows (default: as given)."""
        positions = torch.tensor([s.position for s in states for _ in range(s.layers[0].fast_weights.w1.shape[0])])
        order = torch.arange(len(positions)) if order is None else order.cpu()
        positions = positions[order]
        device = model.embed.weight.device
        layers = [_stack_layer([s.layers[i] for s in states], order.to(device)) for i in range(len(model.blocks))]
        batch = len(positions)
        return cls(
            model=model,
            layers=layers,
            positions=positions.to(device),
            host_positions=positions.tolist(),
            tokens=torch.zeros(batch, dtype=torch.long, device=device),
            logits=torch.zeros(batch, model.cfg.vocab_size, dtype=model.embed.weight.dtype, device=device),
            completes=torch.zeros(batch, dtype=torch.bool, device=device),
            folds=torch.zeros(batch, dtype=torch.bool, device=device),
        )

    def compile_steps(self, backend: Optional[str] = "inductor") -> None:
        """Run each layer's token step and chunk update compiled by `backend` from now on (None: eagerly);
        see `decoding.compiled`. The results are those of the eager steps."""
        self.step_backend = backend

    def buffers(self) -> list[torch.Tensor]:
        """Every tensor a step writes (the CUDA-graph runner snapshots them around its warm-up)."""
        own = [self.positions, self.tokens, self.logits, self.completes, self.folds]
        return own + [t for layer in self.layers for t in layer.tensors()]

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())

    @torch.no_grad()
    def forward_token(self) -> None:
        """Consume `tokens` at `positions`: writes `logits`, the running sums, the ring, `completes`,
        `folds`; advances `positions`. Fixed shapes, no host read."""
        chunk, period = self.model.cfg.ttt.chunk_size, self.fold_period()
        self.completes.copy_(self.positions % chunk == chunk - 1)
        self.folds.copy_(self.positions % period == period - 1)
        strategies = [(RowStepScan(cache), RowStepWindow(cache)) for cache in self.layers]
        call_block = block_step(self.step_backend)
        logits = decoding_logits(self.model, strategies, self.tokens[:, None], self.positions, call_block=call_block)  # [B, 1, V]
        self.logits.copy_(logits[:, 0])
        self.positions += 1

    @torch.no_grad()
    def apply_chunk_updates(self) -> None:
        """Fold the pending tokens of the rows whose last token filled their slots, then apply each layer's
        chunk update to the rows whose last token completed a chunk and restart their running sums, all
        layers in one call (`decoding.compiled.chunk_updates`)."""
        mixers = [block.mixer for block in self.model.blocks]
        chunk_update_step(self.step_backend)(mixers, self.layers, self.completes, self.folds)

    @torch.no_grad()
    def consume(self, tokens: torch.Tensor) -> torch.Tensor:
        """Consume one token per row (tokens [B]) eagerly, chunk updates included -> its logits [B, V]
        (a copy): a step driven from outside, as `transformers`' generate drives a model."""
        due = self.chunk_due()
        self.tokens.copy_(tokens)
        self.forward_token()
        if due:
            self.apply_chunk_updates()
        self.advance_host()
        return self.logits.clone()

    def select(self, rows: torch.Tensor) -> "StaticDecoder":
        """A decoder of the rows at `rows` [B'] (any order, repeats allowed), in fresh buffers."""
        host = rows.tolist()
        return replace(
            self,
            layers=[_stack_layer([layer], rows) for layer in self.layers],
            **{name: getattr(self, name)[rows] for name in ("positions", "tokens", "logits", "completes", "folds")},
            host_positions=[self.host_positions[row] for row in host],
        )

    def chunk_due(self) -> bool:
        """Whether the next token completes some row's chunk or fills its pending slots (from the host's
        count of the steps): the step then runs `apply_chunk_updates`."""
        period = self.fold_period()
        return any(p % period == period - 1 for p in self.host_positions)

    def fold_period(self) -> int:
        """How many tokens the pending slots hold (`decoding.pending.fold_period`), or the chunk without
        them: a chunk's end is always a fold's."""
        pending = self.layers[0].pending
        return pending.v.shape[1] if pending is not None else self.model.cfg.ttt.chunk_size

    def advance_host(self) -> None:
        self.host_positions = [p + 1 for p in self.host_positions]


def _stack_layer(caches: list[LayerCache], order: torch.Tensor) -> LayerCache:
    """One layer's caches concatenated along the batch and indexed by `order` (fresh, contiguous
    storage). Every cache holds the same fields (`decoding.decode.decoding_weights`)."""

    def stacked(parts: list) -> Union[PerSequenceTensors, torch.Tensor, None]:
        if parts[0] is None:
            return None
        if isinstance(parts[0], torch.Tensor):
            return torch.cat(parts)[order]
        return type(parts[0]).concat(parts).select(order)

    return LayerCache(**{f.name: stacked([getattr(c, f.name) for c in caches]) for f in fields(LayerCache)})


@torch.no_grad()
def prefill_prompts(
    model: TTTLM, prompts: list[list[int]], keep_last: Optional[int] = None, call_block: BlockCall = Block.forward,
    deferred: Optional[bool] = None,
) -> tuple[list[torch.Tensor], StaticDecoder]:
    """Prefill prompts of any lengths (each >= 1 token) -> (per prompt its logits [P_i, V], or of its
    last `keep_last` positions, and the prompts' decoder, rows in the prompts' order).

    Prompts of one length are prefilled together in the chunk form (rows never interact, so this is
    exact); the states are then stacked in the prompts' order, each row at its own position.
    `deferred` (None: `decoding.pending.defers_chunk_gradients` for this many rows) keeps each
    partial chunk as pending tokens rather than running sums.
    """
    if deferred is None:
        deferred = defers_chunk_gradients(model.cfg.ttt, len(prompts))
    device = model.embed.weight.device
    by_length: dict[int, list[int]] = {}
    for index, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {index} is empty: decoding needs at least one prompt token")
        by_length.setdefault(len(prompt), []).append(index)
    states, logits = [], [torch.empty(0)] * len(prompts)
    for indices in by_length.values():
        group_ids = torch.tensor([prompts[i] for i in indices], device=device)
        group_logits, state = prefill(model, group_ids, keep_last, call_block, deferred)
        states.append(state)
        for row, index in enumerate(indices):
            logits[index] = group_logits[row]
    stacked_rows = [index for indices in by_length.values() for index in indices]
    order = torch.argsort(torch.tensor(stacked_rows))  # stacked row of each prompt, in the prompts' order
    return logits, StaticDecoder.from_states(model, states, order)


def prefill_rows(
    model: TTTLM, prompts: list[list[int]], call_block: BlockCall = Block.forward, deferred: Optional[bool] = None
) -> tuple[torch.Tensor, StaticDecoder]:
    """Prefill prompts of any lengths (each >= 1 token) -> (last-token logits [B, V], their decoder);
    `call_block` as in `decoding.decode.prefill`, `deferred` as in `prefill_prompts`."""
    logits, decoder = prefill_prompts(model, prompts, keep_last=1, call_block=call_block, deferred=deferred)
    return torch.stack([row[-1] for row in logits]), decoder
