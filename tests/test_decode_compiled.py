"""Compiled decode steps (decoding/compiled.py) compute what the eager steps compute, one graph for every layer.

The compiler here is "aot_eager" (Dynamo and AOTAutograd trace the step as Inductor's input; the
traced ops then run eagerly), so on the CPU the comparison checks the tracing: that the whole step is
one graph (`fullgraph=True` fails on a break), that the strategies and caches enter as inputs, and
that the in-place writes survive functionalisation. Float64 and the same ops, so the results agree to
the reference's 1e-12 (test_decode_static.py). Inductor's fused kernels run in the GPU suite.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from decoding.compiled import block_step
from decoding.decode import prefill
from decoding.graphs import DecodeRunner
from decoding.kv_cache import StaticKVDecoder
from decoding.sampling import sample_tokens
from model.baseline import BaselineLM
from model.config import LMConfig
from tests.test_decode_static import TOLERANCE, forced_tokens, reference_logits, static_logits
from tests.test_generate_decode import CHUNK, MODES, make_model
from verification.proof import relative_error

GREEDY = partial(sample_tokens, temperature=0.0, top_p=1.0)


@pytest.fixture(autouse=True)
def fresh_compile_caches():
    """Each test starts without compiled entries: every model variant adds its own to the code objects'
    caches, and past Dynamo's recompile limit a step would silently run eagerly."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("mode, deferred", [(mode, False) for mode in sorted(MODES)] + [
    ("parallel", True), ("recurrent-released", True)])
def test_compiled_steps_equal_the_reference_decoder(mode: str, deferred: bool) -> None:
    """Rows at three chunk phases, decoded across three chunk boundaries with compiled steps (running
    sums, or pending tokens written in place inside the graph)."""
    model = make_model(MODES[mode])
    prompts = [t.tolist() for t in forced_tokens(model, 3, seed=5)[:, : CHUNK + 3]]
    prompts = [prompts[0][:1], prompts[1][:CHUNK], prompts[2]]
    continuations = forced_tokens(model, 3, seed=6)
    batched = static_logits(model, prompts, continuations, step_backend="aot_eager", deferred=deferred)
    for row, prompt in enumerate(prompts):
        assert relative_error(batched[row], reference_logits(model, prompt, continuations[row])) < TOLERANCE


def test_one_graph_serves_every_layer_and_every_decoder_of_a_batch_size() -> None:
    """Four layers, two decoders of batch 2 and one of batch 1: the token step compiles once per batch
    size, and so does the chunk update. A guard on a layer's module or cache would compile per layer."""
    model = make_model(MODES["parallel-token-causal-momentum-muon"])
    model.blocks.extend(make_model(MODES["parallel-token-causal-momentum-muon"], seed=1).blocks)
    counter = CompileCounter()
    for rows in (2, 2, 1):
        prompts = [t.tolist() for t in forced_tokens(model, rows, seed=rows)[:, :CHUNK - 1]]
        static_logits(model, prompts, forced_tokens(model, rows, seed=9)[:, :CHUNK], step_backend=counter)
    assert counter.frame_count == 2 * 2, counter.frame_count


def test_compiled_transformer_step_equals_the_eager_one() -> None:
    torch.manual_seed(0)
    model = BaselineLM(LMConfig(vocab_size=40, hidden_size=32, num_layers=2, num_attn_heads=4)).double().eval()
    tokens = torch.randint(0, 40, (2, 19))
    results = []
    for backend in (None, "aot_eager"):
        decoder = StaticKVDecoder.around(model, model.prefill(tokens[:, :7], capacity=19)[1])
        runner = DecodeRunner(decoder, GREEDY, graphs=False, step_backend=backend)
        steps = []
        for t in range(7, 19):
            decoder.tokens.copy_(tokens[:, t])
            runner.step()
            steps.append(decoder.logits.clone())
        results.append(torch.stack(steps, dim=1))
    assert relative_error(results[1], results[0]) < TOLERANCE


@pytest.mark.parametrize("mode", ["parallel-token-causal-momentum-muon", "recurrent-released"])
def test_compiled_prefill_equals_the_eager_one(mode: str) -> None:
    """Two complete chunks and a remainder: the chunk form, the remainder's running sums and the window
    ring, each block one compiled graph; the fast weights own their storage afterwards either way."""
    model = make_model(MODES[mode])
    ids = forced_tokens(model, 2, seed=7)[:, : 2 * CHUNK + 3]
    expected_logits, expected = prefill(model, ids)
    logits, state = prefill(model, ids, call_block=block_step("aot_eager"))
    assert relative_error(logits, expected_logits) < TOLERANCE
    for cache, expected_cache in zip(state.layers, expected.layers):
        for tensor, expected_tensor in zip(cache.tensors(), expected_cache.tensors()):
            assert relative_error(tensor, expected_tensor) < TOLERANCE
        for tensor in cache.fast_weights.tensors():
            assert tensor.untyped_storage().nbytes() <= tensor.numel() * tensor.element_size()


def test_each_batch_size_compiles_past_the_global_recompile_limit() -> None:
    """Decoding with compiled steps at more batch sizes than Dynamo's per-code-object recompile limit
    (here 1; 8 by default) still compiles each: its graphs are specialised per batch size, and a
    harness that generates in batches of whatever size its tasks leave must not stop at the ninth."""
    model = make_model(MODES["parallel"])
    with torch._dynamo.config.patch(recompile_limit=1):
        for rows in (1, 2, 3):
            prompts = [t.tolist() for t in forced_tokens(model, rows, seed=rows)[:, :CHUNK - 1]]
            static_logits(model, prompts, forced_tokens(model, rows, seed=9)[:, :2], step_backend="aot_eager")
