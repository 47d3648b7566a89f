"""A prefill replayed from a CUDA graph (decoding/captured_prefill.py) equals the same prefill run eagerly.

125M-shaped TTT model with 2 layers, chunk 64 and window 128 in fp32, prompts of 150 tokens (two complete
chunks and a partial one, so the state holds both the chunk form's weights and the partial chunk), its
blocks compiled as the benchmark runs them. A replay launches the kernels the warm-up ran, so the
results agree to fp32 rounding (1e-5 relative allows a kernel that picks another reduction order under
capture; a stale input or a clobbered output differs at order one).
"""

from __future__ import annotations

import pytest
import torch

from decoding.captured_prefill import CapturedPrefill
from decoding.compiled import block_step
from decoding.decode import prefill
from model.baseline import BaselineLM
from model.config import load_model_config
from model.lm import TTTLM
from verification.proof import relative_error

pytestmark = pytest.mark.gpu
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

OVERRIDES = ["num_layers=2", "ttt.chunk_size=64", "window_size=128"]
PROMPT = (2, 150)
TOLERANCE = 1e-5


def prompts(config_vocab: int, count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, config_vocab, PROMPT, generator=generator).cuda() for _ in range(count)]


@requires_cuda
@pytest.mark.parametrize("deferred", [False, True])
def test_captured_ttt_prefill_equals_eager(deferred: bool) -> None:
    """Logits and every state tensor; the second prompt's replay reads its own tokens, and the state
    returned for the first prompt is the caller's (the replay does not overwrite it)."""
    torch.manual_seed(0)
    model = TTTLM(load_model_config("configs/model/125m.yaml", OVERRIDES)).cuda().eval()
    call_block = block_step("inductor")

    def run(ids: torch.Tensor):
        return prefill(model, ids, call_block=call_block, deferred=deferred)

    first, second = prompts(model.cfg.vocab_size, 2)
    captured = CapturedPrefill(run, first)
    first_logits, first_state = captured(first)
    second_logits, second_state = captured(second)
    for ids, logits, state in ((first, first_logits, first_state), (second, second_logits, second_state)):
        eager_logits, eager_state = run(ids)
        assert relative_error(logits, eager_logits) < TOLERANCE
        assert state.position == eager_state.position == PROMPT[1]
        for layer, eager_layer in zip(state.layers, eager_state.layers):
            for got, expected in zip(layer.tensors(), eager_layer.tensors(), strict=True):
                assert relative_error(got, expected) < TOLERANCE


@requires_cuda
def test_captured_transformer_prefill_equals_eager() -> None:
    torch.manual_seed(0)
    model = BaselineLM(load_model_config("configs/model/125m.yaml", OVERRIDES)).cuda().eval()
    capacity = PROMPT[1] + 8

    def run(ids: torch.Tensor):
        return model.prefill(ids, capacity)

    first, second = prompts(model.cfg.vocab_size, 2)
    captured = CapturedPrefill(run, first)
    outputs = [captured(first), captured(second)]
    for ids, (logits, cache) in zip((first, second), outputs):
        eager_logits, eager_cache = run(ids)
        assert relative_error(logits, eager_logits) < TOLERANCE
        assert relative_error(cache.keys, eager_cache.keys) < TOLERANCE
        assert relative_error(cache.values, eager_cache.values) < TOLERANCE
        assert cache.length == eager_cache.length


@requires_cuda
def test_captured_prefill_refuses_another_shape() -> None:
    model = BaselineLM(load_model_config("configs/model/125m.yaml", OVERRIDES)).cuda().eval()
    captured = CapturedPrefill(lambda ids: model.prefill(ids, 256), prompts(model.cfg.vocab_size, 1)[0])
    with pytest.raises(ValueError, match="captured for prompts of shape"):
        captured(torch.zeros(1, 150, dtype=torch.long, device="cuda"))
