"""Specification of train/generation/generate.py: sampling rules, batching by length, the command line."""

from __future__ import annotations

import torch

from model.config import load_model_config
from model.lm import TTTLM
from train.data.tokenizer import ByteTextStream
from train.generation.export import save_exported
from train.generation.generate import STOP_CHECK_EVERY, generate, main, sample_next


def tiny_model(seed: int = 0) -> TTTLM:
    torch.manual_seed(seed)
    cfg = load_model_config("configs/model/tiny.yaml", ["ttt.chunk_size=8", "window_size=8"])
    return TTTLM(cfg).eval()


def test_greedy_is_argmax_and_tiny_top_p_keeps_only_the_best() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    best = logits.argmax(dim=-1)
    assert torch.equal(sample_next(logits, 0.0, 1.0), best)
    assert torch.equal(sample_next(logits, 1.0, 1e-6, torch.Generator().manual_seed(1)), best)


def test_top_p_never_samples_outside_the_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(2000, -1)
    samples = sample_next(logits, 1.0, 0.7, torch.Generator().manual_seed(0))
    assert set(samples.tolist()) == {0, 1}  # 0.5 < 0.7 needs token 1; 0.8 >= 0.7 stops there


def test_greedy_generation_equals_recomputing_the_whole_sequence() -> None:
    """Decoding from the recurrent state picks what argmax over a fresh full forward pass picks (5 chunks)."""
    model = tiny_model()
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]
    out = generate(model, [prompt], max_new_tokens=30)[0]
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(30):
            sequence.append(int(model(torch.tensor([sequence])).logits[0, -1].argmax()))
    assert out == sequence[len(prompt) :]


def test_a_batch_of_mixed_lengths_equals_one_prompt_at_a_time() -> None:
    model = tiny_model()
    prompts = [[7, 8, 9], [1, 2, 3, 4, 5], [9, 9, 9], [42]]
    batched = generate(model, prompts, max_new_tokens=12)
    assert batched == [generate(model, [p], max_new_tokens=12)[0] for p in prompts]


def test_stop_token_ends_a_sequence() -> None:
    model = tiny_model()
    first = generate(model, [[5, 6]], max_new_tokens=10)[0]
    stopped = generate(model, [[5, 6]], max_new_tokens=10, stop_id=first[2])[0]
    assert stopped == first[: first.index(first[2]) + 1]


def test_a_callers_rule_ends_the_batch_at_the_next_check_and_keeps_the_tokens_whole() -> None:
    """Every row `done` after its third token: decoding stops at the first read of the rows
    (STOP_CHECK_EVERY steps), not at max_new_tokens, and the tokens so far come back uncut."""
    model = tiny_model()
    full = generate(model, [[7, 8, 9], [1, 2]], max_new_tokens=3 * STOP_CHECK_EVERY)
    ended = generate(model, [[7, 8, 9], [1, 2]], max_new_tokens=3 * STOP_CHECK_EVERY, row_done=lambda row, tokens: len(tokens) >= 3)
    assert ended == [tokens[:STOP_CHECK_EVERY] for tokens in full]


def test_byte_stream_holds_a_split_character_until_it_is_complete() -> None:
    stream = ByteTextStream()
    pieces = [stream.push(b) for b in "é!".encode("utf-8")]
    assert pieces == ["", "é", "!"]


def test_command_line_streams_a_continuation(tmp_path, capsys) -> None:
    save_exported(tiny_model(), tmp_path / "export")
    main(["--model", str(tmp_path / "export"), "--prompt", "def f(x):", "--max-new-tokens", "20", "--no-stop"])
    printed = capsys.readouterr().out
    assert printed.startswith("def f(x):") and len(printed) > len("def f(x):")
    main(["--model", str(tmp_path / "export"), "--prompt", "ab", "--prompt", "xyz", "--max-new-tokens", "5"])
    printed = capsys.readouterr().out
    assert "--- [0] ---\nab" in printed and "--- [1] ---\nxyz" in printed
