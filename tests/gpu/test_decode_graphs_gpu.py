"""CUDA-graph decoding (decoding/graphs.py) equals the same step run eagerly, on the GPU.

125M-shaped TTT model with 2 layers, chunk 64 and window 128, bf16 parameters, so 200 decoded tokens
cross three chunk boundaries; rows of different prompt lengths sit at different chunk phases.
Tolerance: graph replay launches the very kernels eager runs, so the results should be identical;
the bound allows bf16 rounding (2^-8 relative per op) in case a kernel picks another algorithm under
capture, and greedy tokens must agree exactly.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import pytest
import torch

from decoding.graphs import DecodeRunner
from decoding.kv_cache import StaticKVDecoder
from decoding.sampling import sample_tokens
from decoding.static import prefill_rows
from model.baseline import BaselineLM
from model.config import load_model_config
from model.lm import TTTLM
from verification.proof import relative_error

pytestmark = pytest.mark.gpu
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

OVERRIDES = ["num_layers=2", "ttt.chunk_size=64", "window_size=128"]
STEPS = 200
BF16_TOLERANCE = 2e-2
GREEDY = partial(sample_tokens, temperature=0.0, top_p=1.0)


def run(decoder, graphs: bool, step_backend: Optional[str] = None) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy tokens [B, STEPS] and the logits of every step [B, STEPS, V] (fp32)."""
    runner = DecodeRunner(decoder, GREEDY, graphs=graphs, step_backend=step_backend)
    tokens, logits = [], []
    for _ in range(STEPS):
        runner.step()
        tokens.append(decoder.tokens.clone())
        logits.append(decoder.logits.float())
    return torch.stack(tokens, dim=1).tolist(), torch.stack(logits, dim=1)


def ttt_decoder(prompts: list[list[int]], variant: tuple[str, ...] = (), dtype: torch.dtype = torch.bfloat16,
                deferred: Optional[bool] = None):  # fmt: skip
    torch.manual_seed(0)
    model = TTTLM(load_model_config("configs/model/125m.yaml", OVERRIDES + list(variant))).cuda().to(dtype).eval()
    first, decoder = prefill_rows(model, prompts, deferred=deferred)
    decoder.tokens.copy_(GREEDY(first))
    return decoder


@requires_cuda
@pytest.mark.parametrize("variant", [(), ("ttt.mode=recurrent", "ttt.fast_weights=all", "ttt.weight_norm=true", "ttt.token_causal=false")])
def test_graph_decoding_equals_eager_ttt(variant: tuple[str, ...]) -> None:
    prompts = [list(range(1, 101)), list(range(5, 42)), list(range(7, 71))]  # lengths 100, 37, 64: three phases
    eager_tokens, eager_logits = run(ttt_decoder(prompts, variant), graphs=False)
    graph_tokens, graph_logits = run(ttt_decoder(prompts, variant), graphs=True)
    assert graph_tokens == eager_tokens
    assert relative_error(graph_logits, eager_logits) < BF16_TOLERANCE


@requires_cuda
@pytest.mark.parametrize("variant", [(), ("ttt.mode=recurrent", "ttt.fast_weights=all", "ttt.weight_norm=true", "ttt.token_causal=false")])
def test_compiled_graph_decoding_equals_eager_ttt(variant: tuple[str, ...]) -> None:
    """Inductor's fused steps replayed from CUDA graphs against the eager steps, in fp32 (fusion changes
    the rounding order, ~1e-6 relative; a greedy token that flipped would show as a larger error)."""
    prompts = [list(range(1, 101)), list(range(5, 42)), list(range(7, 71))]
    eager_tokens, eager_logits = run(ttt_decoder(prompts, variant, torch.float32), graphs=False)
    fused_tokens, fused_logits = run(ttt_decoder(prompts, variant, torch.float32), graphs=True, step_backend="inductor")
    assert fused_tokens == eager_tokens
    assert relative_error(fused_logits, eager_logits) < 1e-4


@requires_cuda
@pytest.mark.parametrize("fold", [16, 64], ids=["folded_every_16", "folded_at_the_chunk_end"])
@pytest.mark.parametrize("variant", [(), ("ttt.mode=recurrent", "ttt.fast_weights=all", "ttt.weight_norm=true", "ttt.token_causal=false")])
def test_pending_tokens_under_graphs_equal_eager_running_sums(variant: tuple[str, ...], fold: int, monkeypatch) -> None:
    """The partial chunk kept as pending tokens (the read kernel, the tokens' gradient folded into the
    running sums every `fold` tokens), compiled and replayed from graphs, against eager steps with running
    sums, fp32: the two hold the same chunk and sum its gradient in another order (~1e-6 relative)."""
    import decoding.pending

    monkeypatch.setattr(decoding.pending, "FOLD_TOKENS", fold)
    prompts = [list(range(1, 101)), list(range(5, 42)), list(range(7, 71))]
    eager_tokens, eager_logits = run(ttt_decoder(prompts, variant, torch.float32, deferred=False), graphs=False)
    pending = ttt_decoder(prompts, variant, torch.float32, deferred=True)
    fused_tokens, fused_logits = run(pending, graphs=True, step_backend="inductor")
    assert fused_tokens == eager_tokens
    assert relative_error(fused_logits, eager_logits) < 1e-4


@requires_cuda
@pytest.mark.parametrize("fold", [16, 64], ids=["folded_every_16", "folded_at_the_chunk_end"])
def test_bf16_pending_chunk_gradient_matches_running_sums(fold: int, monkeypatch) -> None:
    """In bf16 the pending chunk's gradient is formed from the slots' bf16 key features (the prompt's
    remainder featurised in torch, the decoded token by the read kernel) with fp32 accumulation
    (`decoding.pending.w1_chunk_gradient`), the running sums add fp32 terms token by token: the chunk's
    update (W1 after it minus W1 before, every layer) agrees to the bf16 rounding of the operands
    (2^-8 relative each, summed over 64 tokens: 2e-2 bounds it; a wrong sign, learning rate or slot is
    order one). Eight rows of 63 tokens, so the first decoded token completes their chunk; folded every 16
    tokens, the prefill folds 48 of them and the first step the last 16."""
    import decoding.pending

    monkeypatch.setattr(decoding.pending, "FOLD_TOKENS", fold)
    prompts = [list(range(1 + row, 64 + row)) for row in range(8)]
    updates = []
    for deferred in (False, True):
        decoder = ttt_decoder(prompts, dtype=torch.bfloat16, deferred=deferred)
        before = [layer.fast_weights.w1.clone() for layer in decoder.layers]
        DecodeRunner(decoder, GREEDY, graphs=True, step_backend="inductor").step()
        updates.append(torch.stack([layer.fast_weights.w1 - w1 for layer, w1 in zip(decoder.layers, before)]))
    running, pending = updates
    assert running.abs().amax() > 0  # the step did complete the chunk
    assert relative_error(pending, running) < BF16_TOLERANCE


@requires_cuda
def test_graph_decoding_equals_eager_transformer() -> None:
    def decoder():
        torch.manual_seed(0)
        model = BaselineLM(load_model_config("configs/model/125m.yaml", OVERRIDES)).cuda().to(torch.bfloat16).eval()
        logits, cache = model.prefill(torch.arange(1, 101, device="cuda")[None].expand(2, -1), capacity=100 + STEPS + 1)
        static = StaticKVDecoder.around(model, cache)
        static.tokens.copy_(GREEDY(logits[:, -1]))
        return static

    eager_tokens, eager_logits = run(decoder(), graphs=False)
    graph_tokens, graph_logits = run(decoder(), graphs=True)
    assert graph_tokens == eager_tokens
    assert relative_error(graph_logits, eager_logits) < BF16_TOLERANCE


@requires_cuda
def test_sampling_with_a_generator_replays_like_eager() -> None:
    """Temperature and top-p under graphs: the registered generator advances as eager draws do."""
    prompts = [list(range(1, 51))]
    outputs = []
    for graphs in (False, True):
        decoder = ttt_decoder(prompts)
        generator = torch.Generator(device="cuda").manual_seed(7)
        runner = DecodeRunner(decoder, partial(sample_tokens, temperature=0.8, top_p=0.9, generator=generator), graphs, generator)
        tokens = []
        for _ in range(80):
            runner.step()
            tokens.append(decoder.tokens.clone())
        outputs.append(torch.stack(tokens).tolist())
    assert outputs[0] == outputs[1]
