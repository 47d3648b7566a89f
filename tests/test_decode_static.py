"""Specification of the static-buffer decoder (decoding/static.py) and its step runner.

The reference is decoding/decode.py, itself proven equal to the chunk form. Float64 throughout: the
static step attends over the whole ring with a mask where the reference slices the filled slots, and
applies the chunk update through `torch.where`; both compute the same terms, so any difference beyond
~1e-15 relative is a semantic slip (a slot, a position or a boundary off by one), hence 1e-12.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from functools import partial

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from decoding.captured_prefill import CapturedPrefill
from decoding.decode import decode_step, prefill
from decoding.graphs import DecodeRunner
from decoding.pending import DEFER_FROM_BATCH
from decoding.sampling import sample_tokens
from decoding.static import prefill_rows
from tests.test_generate_decode import CHUNK, MODES, make_model
from verification.proof import relative_error

TOLERANCE = 1e-12
STEPS = 3 * CHUNK + 5  # every row crosses at least three chunk boundaries while decoding


def forced_tokens(model, rows: int, seed: int) -> torch.Tensor:
    return torch.randint(0, model.cfg.vocab_size, (rows, STEPS), generator=torch.Generator().manual_seed(seed))


def reference_logits(model, prompt: list[int], continuation: torch.Tensor) -> torch.Tensor:
    """One prompt through decoding/decode.py, then the continuation token by token: [STEPS, V]."""
    _, state = prefill(model, torch.tensor([prompt]))
    return torch.stack([decode_step(model, state, continuation[None, t])[0] for t in range(len(continuation))])


def static_logits(model, prompts: list[list[int]], continuations: torch.Tensor, step_backend=None,
                  deferred: bool = False) -> torch.Tensor:  # fmt: skip
    """All prompts as one batch of static rows, fed the continuations: [B, STEPS, V] (the steps compiled
    by `step_backend`, if given; `deferred`: the partial chunks kept as pending tokens)."""
    _, decoder = prefill_rows(model, prompts, deferred=deferred)
    runner = DecodeRunner(decoder, partial(sample_tokens, temperature=0.0, top_p=1.0), graphs=False, step_backend=step_backend)
    steps = []
    for t in range(continuations.shape[1]):
        decoder.tokens.copy_(continuations[:, t])
        runner.step()
        steps.append(decoder.logits.clone())
    return torch.stack(steps, dim=1)


def assert_kernel_decoding_equals_float64(mode: str, module, kernel: str, prompt_lengths: list[int], steps: int,
                                          seed: int, monkeypatch, deferred: bool = False) -> None:
    """An fp32 copy of the mode's float64 model decodes rows of `prompt_lengths` (different chunk and
    window phases) `steps` tokens through `module.kernel` (TTTLA_KERNELS=triton): every token step of
    every layer launches it once, and the logits equal the float64 model's decoder (the torch forms,
    running sums; `deferred`: the fp32 decoder keeps pending tokens)."""
    model64 = make_model(copy.deepcopy(MODES[mode]))
    model32 = copy.deepcopy(model64).float()
    prompts = [t.tolist() for t in forced_tokens(model64, len(prompt_lengths), seed=seed)]
    prompts = [prompt[:length] for prompt, length in zip(prompts, prompt_lengths)]
    continuations = forced_tokens(model64, len(prompt_lengths), seed=seed + 1)[:, :steps]
    launches, launch = [], getattr(module, kernel)
    monkeypatch.setattr(module, kernel, lambda *args: launches.append(1) or launch(*args))
    monkeypatch.setenv("TTTLA_KERNELS", "triton")
    decoded = static_logits(model32, prompts, continuations, deferred=deferred)
    monkeypatch.setenv("TTTLA_KERNELS", "reference")
    assert len(launches) == steps * len(model32.blocks)
    for row, prompt in enumerate(prompts):
        expected = reference_logits(model64, prompt, continuations[row])[:steps]
        assert relative_error(decoded[row].double(), expected) < 1e-4  # fp32 through two layers


@pytest.mark.parametrize("mode", sorted(MODES))
def test_static_rows_of_mixed_lengths_equal_the_decoder_one_prompt_at_a_time(mode: str) -> None:
    """Prompt lengths 1, 8 (on a boundary), 13 (past the window) and 6: four chunk phases in one batch."""
    model = make_model(MODES[mode])
    prompts = [t.tolist() for t in forced_tokens(model, 4, seed=1)[:, :13]]
    prompts = [prompts[0][:1], prompts[1][:8], prompts[2], prompts[3][:6]]
    continuations = forced_tokens(model, 4, seed=2)
    batched = static_logits(model, prompts, continuations)
    for row, prompt in enumerate(prompts):
        assert relative_error(batched[row], reference_logits(model, prompt, continuations[row])) < TOLERANCE


DEFERRABLE = sorted(mode for mode, ttt in MODES.items() if not ttt.token_causal)


@pytest.mark.parametrize("fold", [CHUNK // 4, CHUNK], ids=["folded_every_quarter_chunk", "folded_at_the_chunk_end"])
@pytest.mark.parametrize("mode", DEFERRABLE)
def test_pending_tokens_decode_as_the_running_sums_do(mode: str, fold: int, monkeypatch) -> None:
    """The partial chunk kept as its tokens and folded into its running gradient every `fold` tokens
    (`decoding.pending`) gives the logits of the running-sum decoder one prompt at a time: rows at four
    chunk phases (so folds of some rows beside others' token steps, and prompts whose remainder is partly
    folded at the prefill), three boundaries each, every mode that can defer (W1 alone or all three fast,
    momentum, Muon, weight norm)."""
    import decoding.pending

    monkeypatch.setattr(decoding.pending, "FOLD_TOKENS", fold)
    model = make_model(MODES[mode])
    prompts = [t.tolist() for t in forced_tokens(model, 4, seed=11)[:, : 2 * CHUNK - 1]]
    prompts = [prompts[0][:1], prompts[1][:CHUNK], prompts[2], prompts[3][: CHUNK - 3]]
    continuations = forced_tokens(model, 4, seed=12)
    deferred = static_logits(model, prompts, continuations, deferred=True)
    for row, prompt in enumerate(prompts):
        assert relative_error(deferred[row], reference_logits(model, prompt, continuations[row])) < TOLERANCE


@pytest.mark.parametrize("mode", ["parallel", "recurrent-released"])
def test_stepwise_decoder_folds_pending_tokens_as_the_running_sums_add_them(mode: str, monkeypatch) -> None:
    """`decode_step` (every row at one position) on a state that keeps pending tokens folded every quarter
    chunk: the logits of the running-sum reference, from a prompt whose remainder is partly folded."""
    import decoding.pending

    monkeypatch.setattr(decoding.pending, "FOLD_TOKENS", CHUNK // 4)
    model = make_model(MODES[mode])
    tokens = forced_tokens(model, 2, seed=15)
    prompt_len = CHUNK + CHUNK // 4 + 1
    _, state = prefill(model, tokens[:, :prompt_len], deferred=True)
    assert state.layers[0].pending.v.shape[1] == CHUNK // 4
    stepped = torch.stack([decode_step(model, state, tokens[:, t]) for t in range(prompt_len, STEPS)], dim=1)
    for row in range(2):
        expected = reference_logits(model, tokens[row, :prompt_len].tolist(), tokens[row, prompt_len:])
        assert relative_error(stepped[row], expected) < TOLERANCE


@pytest.mark.parametrize("mode", [mode for mode in DEFERRABLE if MODES[mode].fast_weights == "w1"])
def test_pending_chunk_gradient_formed_as_a_chunk_update_decodes_as_the_running_sums_do(mode: str, monkeypatch) -> None:
    """The pending tokens' gradient formed as the training form forms a chunk's update (`decoding.pending
    .w1_chunk_gradient`: each row's pending key features as one chunk of `kernels.ttt_la.chunk_updates`,
    folded every half chunk; on CUDA in 16 bits, forced here in float64) gives the running-sum decoder's
    logits: its sign, learning rate, slots and key features (formed by the token steps and the prompt's
    remainder) are the chunk gradient's."""
    import decoding.pending

    monkeypatch.setattr(decoding.pending, "keys_as_features", lambda ttt, dtype, device: True)
    monkeypatch.setattr(decoding.pending, "FOLD_TOKENS", CHUNK // 2)
    model = make_model(MODES[mode])
    prompts = [t.tolist() for t in forced_tokens(model, 3, seed=13)[:, : 2 * CHUNK - 1]]
    prompts = [prompts[0][:1], prompts[1][:CHUNK], prompts[2]]
    continuations = forced_tokens(model, 3, seed=14)
    deferred = static_logits(model, prompts, continuations, deferred=True)
    for row, prompt in enumerate(prompts):
        assert relative_error(deferred[row], reference_logits(model, prompt, continuations[row])) < TOLERANCE


def test_token_causal_decoding_refuses_pending_tokens() -> None:
    """Token-causal reads need the running W1 gradient every token: asking to defer it is an error, and
    the default for a large batch keeps the running sums."""
    model = make_model(MODES["parallel-token-causal-momentum-muon"])
    with pytest.raises(ValueError, match="token-causal"):
        prefill_rows(model, [[1, 2]], deferred=True)
    _, decoder = prefill_rows(model, [[1, 2]] * DEFER_FROM_BATCH)
    assert all(layer.pending is None and layer.chunk_gradients is not None for layer in decoder.layers)


def test_large_batches_keep_pending_tokens_by_default() -> None:
    model = make_model(MODES["parallel"])
    for batch, deferred in ((DEFER_FROM_BATCH - 1, False), (DEFER_FROM_BATCH, True)):
        _, decoder = prefill_rows(model, [[1, 2, 3]] * batch)
        assert all((layer.pending is not None) == deferred for layer in decoder.layers)
        assert all(layer.chunk_gradients is not None for layer in decoder.layers)


@pytest.mark.parametrize(
    "mode", ["parallel-identity-per-head-lr", "parallel-token-causal-momentum-muon", "recurrent-released"]
)
def test_rows_completing_chunks_together_beside_rows_mid_chunk(mode: str) -> None:
    """Prompt lengths C - 1, C, 2C - 1 and 1: rows 0 and 2 complete a chunk at the same step while rows
    1 and 3 are mid-chunk, so one update call restarts some rows' running sums and leaves the others'.
    The modes cover both kinds of sums (G1 alone, and G0, G1, G2) with momentum gates."""
    model = make_model(MODES[mode])
    prompts = [t.tolist() for t in forced_tokens(model, 4, seed=3)[:, : 2 * CHUNK - 1]]
    prompts = [prompts[0][: CHUNK - 1], prompts[1][:CHUNK], prompts[2], prompts[3][:1]]
    continuations = forced_tokens(model, 4, seed=4)
    batched = static_logits(model, prompts, continuations)
    for row, prompt in enumerate(prompts):
        assert relative_error(batched[row], reference_logits(model, prompt, continuations[row])) < TOLERANCE


def test_the_chunk_update_costs_the_same_at_any_chunk_size() -> None:
    """`apply_chunk_updates` reads only the running sums: its matmul FLOPs (Muon's) do not grow with
    the chunk, where re-running the chunk's C buffered tokens would."""
    flops = []
    for chunk in (CHUNK, 4 * CHUNK):
        model = make_model(replace(MODES["recurrent-released"]), chunk=chunk)
        _, decoder = prefill_rows(model, [[1] * (chunk - 1), [2] * 3])
        with FlopCounterMode(display=False) as counter:
            decoder.apply_chunk_updates()
        flops.append(counter.get_total_flops())
    assert flops[0] == flops[1] > 0


class MatmulCount(TorchDispatchMode):
    """Counts the matrix products run inside it (each a kernel launch on a GPU)."""

    PRODUCTS = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.matmul.default}

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.PRODUCTS
        return func(*args, **(kwargs or {}))


def test_the_chunk_update_runs_every_layers_muon_as_one_iteration() -> None:
    """The boundary's matrix products do not grow with the layers: Newton-Schulz runs once for all the
    layers' W0, W1, W2 updates (15 products: 5 steps of 3), not 15 per weight and layer. (Full-rank
    learned W0, W2: low-rank ones add their own factor products per layer.)"""
    counts = []
    for layers in (1, 3):
        model = make_model(MODES["recurrent-all-muon"])
        for seed in range(1, layers):
            model.blocks.extend(make_model(MODES["recurrent-all-muon"], seed=seed).blocks)
        _, decoder = prefill_rows(model, [[1] * (CHUNK - 1), [2] * 3])
        with MatmulCount() as products:
            decoder.apply_chunk_updates()
        counts.append(products.count)
    assert counts == [15, 15], counts


def test_rows_without_a_completed_chunk_keep_their_fast_weights() -> None:
    """The update runs for every row but lands only where the device flag is set."""
    model = make_model(MODES["recurrent-all-momentum-weightnorm"])
    _, decoder = prefill_rows(model, [[1] * (CHUNK - 1), [2] * 3])  # row 0 completes its chunk next, row 1 does not
    before = [layer.fast_weights.w1.clone() for layer in decoder.layers]
    DecodeRunner(decoder, partial(sample_tokens, temperature=0.0, top_p=1.0), graphs=False).step()
    for layer, w1 in zip(decoder.layers, before):
        assert not torch.equal(layer.fast_weights.w1[0], w1[0]) and torch.equal(layer.fast_weights.w1[1], w1[1])


class HostReads(TorchDispatchMode):
    """Fails on every op that hands a tensor's values to the host: `.item()`, `bool(t)`, `int(t)` (all
    `_local_scalar_dense`) and ops whose output shape depends on the values (boolean indexing, nonzero),
    each a device-to-host sync on a GPU."""

    FORBIDDEN = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
                 torch.ops.aten.masked_select.default, torch.ops.aten.repeat_interleave.Tensor}  # fmt: skip

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.FORBIDDEN:
            raise AssertionError(f"the decode step reads tensor values on the host through {func}")
        return func(*args, **(kwargs or {}))


def no_host_copies(*args, **kwargs):
    raise AssertionError("the decode step copies a tensor to the host (.tolist() / .numpy())")


@pytest.mark.parametrize("temperature, top_p", [(0.0, 1.0), (0.8, 0.9)])
def test_step_reads_nothing_back_to_the_host(temperature: float, top_p: float, monkeypatch) -> None:
    """Three steps across a chunk boundary, sampling included, under a mode that rejects host reads."""
    model = make_model(MODES["parallel-token-causal-momentum-muon"])
    _, decoder = prefill_rows(model, [[1] * (CHUNK - 2), [2] * 3])
    runner = DecodeRunner(decoder, partial(sample_tokens, temperature=temperature, top_p=top_p), graphs=False)
    monkeypatch.setattr(torch.Tensor, "tolist", no_host_copies)
    monkeypatch.setattr(torch.Tensor, "numpy", no_host_copies)
    with HostReads():
        for _ in range(3):
            runner.step()
    assert decoder.host_positions == [CHUNK + 1, 6]


def test_the_host_read_check_catches_an_item_call() -> None:
    """Guards the test above: the mode does see a host read."""
    with pytest.raises(AssertionError, match="_local_scalar_dense"), HostReads():
        torch.ones(2).sum().item()


def test_captured_prefill_needs_a_cuda_prompt() -> None:
    """The graph-captured prefill (`decoding.captured_prefill`, proven equal to eager on the GPU) says
    what it needs on a CPU prompt instead of failing inside the capture."""
    model = make_model(MODES["parallel"])
    with pytest.raises(ValueError, match="CUDA device"):
        CapturedPrefill(lambda ids: prefill(model, ids), torch.zeros(1, 3, dtype=torch.long))


def test_a_copied_prefill_state_is_the_callers_own() -> None:
    """What a captured prefill returns is a deep copy of the graph's outputs: equal values in new
    storage (a later replay cannot change it), decoding on exactly as the original does."""
    model = make_model(MODES["recurrent-released"])
    prompt = forced_tokens(model, 2, seed=3)[:, : CHUNK + 5]
    logits, state = prefill(model, prompt)
    copied_logits, copied_state = copy.deepcopy((logits, state))
    for original, copied in zip((t for layer in state.layers for t in layer.tensors()),
                                (t for layer in copied_state.layers for t in layer.tensors())):  # fmt: skip
        assert copied.untyped_storage().data_ptr() != original.untyped_storage().data_ptr()
        assert torch.equal(copied, original)
    token = prompt[:, -1]
    assert torch.equal(decode_step(model, copied_state, token), decode_step(model, state, token))
