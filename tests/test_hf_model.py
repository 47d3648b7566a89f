"""Specification of the transformers model class (train/hf/): loading an export, generate() on the
constant-size decoding state, padding, the loss, save_pretrained.

The logits comparisons run in float64 against one `TTTLM.forward` over the whole sequence: decoding
sums the same terms in another order (~1e-14 relative, `tests/test_generate_decode.py`), so 1e-9
leaves room for rounding and none for a semantic slip (a token at the wrong position, a pad token in
the state). Offline: everything is built here, nothing is fetched.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from model.config import ConfigError
from model.lm import TTTLM
from tests.test_generate_cli import tiny_model
from tests.test_generate_decode import MODES, make_model
from train.data.tokenizer import JsonTokenizer
from train.generation.export import HF_CONFIG_FILE, save_exported
from train.hf import TTTLACache, TTTLAConfig, TTTLAForCausalLM
from verification.proof import relative_error

TOLERANCE = 1e-9
HF_MODES = ["parallel-token-causal-momentum-muon", "recurrent-released"]  # both TTT modes, every option on
NEW_TOKENS = 21  # from a 5-token prompt: crosses the chunk boundaries at 8, 16, 24 and the window of 12


def hf_model(mode: str, seed: int = 0) -> tuple[TTTLAForCausalLM, TTTLM]:
    """The float64 model of the decoding tests, and the same weights inside the transformers class."""
    lm = make_model(MODES[mode], seed=seed)
    wrapped = TTTLAForCausalLM(TTTLAConfig.from_lm_config(lm.cfg, eos_token_id=None)).double().eval()
    wrapped.model.load_state_dict(lm.state_dict())
    return wrapped, lm


def prompts(model: TTTLM, lengths: list[int], seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, model.cfg.vocab_size, (n,), generator=generator).tolist() for n in lengths]


def generated(wrapped: TTTLAForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    return wrapped.generate(
        input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS, do_sample=False,
        output_logits=True, return_dict_in_generate=True, pad_token_id=0,
    )  # fmt: skip


def cached_logits(wrapped: TTTLAForCausalLM, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """The calls generate() makes: the prompt with use_cache=True, then one token per call on the
    returned cache -> logits [B, T, V] in the model's dtype (generate() hands them out as float32)."""
    out = wrapped(ids[:, :prompt_len], use_cache=True)
    steps = [out.logits] + [wrapped(ids[:, t : t + 1], past_key_values=out.past_key_values).logits for t in range(prompt_len, ids.shape[1])]
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("mode", HF_MODES)
def test_decoding_through_the_cache_gives_the_logits_of_one_forward_pass(mode: str) -> None:
    wrapped, lm = hf_model(mode)
    ids = torch.tensor(prompts(lm, [5 + NEW_TOKENS] * 2))
    assert relative_error(cached_logits(wrapped, ids, prompt_len=5), lm(ids).logits) < TOLERANCE


@pytest.mark.parametrize("mode", HF_MODES)
def test_generate_picks_the_argmax_of_one_forward_pass(mode: str) -> None:
    """generate() decodes on the cache: its tokens are the full forward pass's greedy choices, and its
    logits are that pass's up to float32 rounding (transformers casts them: 1e-6 relative)."""
    wrapped, lm = hf_model(mode)
    prompt = torch.tensor(prompts(lm, [5, 5]))
    out = generated(wrapped, prompt)
    full = lm(out.sequences[:, :-1]).logits[:, prompt.shape[1] - 1 :]
    assert torch.equal(out.sequences[:, prompt.shape[1] :], full.argmax(dim=-1))
    assert relative_error(torch.stack(out.logits, dim=1).double(), full) < 1e-6


@pytest.mark.parametrize("mode", HF_MODES)
def test_a_left_padded_batch_generates_every_row_as_if_alone(mode: str) -> None:
    """Rows of 3, 9 and 16 tokens (three chunk phases) padded on the left: each row's pads stay out of
    its state and its positions, so it continues exactly as its unpadded prompt does on its own."""
    wrapped, lm = hf_model(mode)
    rows = prompts(lm, [3, 9, 16])
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    batched = generated(wrapped, ids, mask)
    for row, prompt in enumerate(rows):
        alone = generated(wrapped, torch.tensor([prompt]))
        assert torch.equal(batched.sequences[row, width:], alone.sequences[0, len(prompt) :])
        assert relative_error(torch.stack(batched.logits, 1)[row], torch.stack(alone.logits, 1)[0]) < 1e-6  # float32, as above


def test_right_padding_is_refused_for_decoding() -> None:
    wrapped, _ = hf_model(HF_MODES[0])
    with pytest.raises(ValueError, match="padding_side='left'"):
        wrapped(torch.tensor([[5, 6, 0]]), attention_mask=torch.tensor([[1, 1, 0]]), use_cache=True)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_leaves_the_chunk_form_of_every_real_token_unchanged(side: str) -> None:
    """Without a cache (scoring) pads are documents of their own: the state and positions restart at
    the real tokens, so their logits are those of the unpadded row, whichever side the pads are on."""
    wrapped, lm = hf_model(HF_MODES[1])
    short, long = prompts(lm, [11, 19])
    pad = [0] * (len(long) - len(short))
    ids = torch.tensor([pad + short if side == "left" else short + pad, long])
    real = torch.tensor([[False] * len(pad) + [True] * len(short) if side == "left" else [True] * len(short) + [False] * len(pad)])
    logits = wrapped(ids, attention_mask=torch.cat([real, torch.ones_like(real)]).long()).logits
    assert relative_error(logits[0][real[0]], lm(torch.tensor([short])).logits[0]) < TOLERANCE
    assert relative_error(logits[1], lm(torch.tensor([long])).logits[0]) < TOLERANCE


def test_labels_give_the_mean_cross_entropy_of_the_next_token() -> None:
    wrapped, lm = hf_model(HF_MODES[0])
    ids = torch.tensor(prompts(lm, [17, 17]))
    labels = ids.clone()
    labels[0, :4] = -100  # ignored, as transformers' convention has it
    out = wrapped(ids, labels=labels)
    logits = lm(ids).logits
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert relative_error(out.loss, expected) < TOLERANCE
    assert relative_error(out.logits, logits) < TOLERANCE


def test_beam_search_reorders_the_decoding_rows() -> None:
    """A cache reordered to rows (1, 0, 1) continues as those rows' states do."""
    wrapped, lm = hf_model(HF_MODES[1])
    ids = torch.tensor(prompts(lm, [9, 9]))
    cache = TTTLACache()
    wrapped(ids, past_key_values=cache)
    order = torch.tensor([1, 0, 1])
    cache.reorder_cache(order)
    step = torch.tensor([[7], [8], [9]])
    logits = wrapped(step, past_key_values=cache).logits[:, -1]
    expected = lm(torch.cat([ids[order], step], dim=1)).logits[:, -1]
    assert relative_error(logits, expected) < TOLERANCE


def test_a_decoding_state_cannot_be_cut_back() -> None:
    with pytest.raises(ValueError, match="cannot be cut back"):
        TTTLACache().crop(3)


def test_an_export_loads_with_the_auto_classes_and_save_pretrained_round_trips(tmp_path: Path) -> None:
    lm = tiny_model()
    folder = save_exported(lm, tmp_path / "export")
    assert AutoConfig.from_pretrained(folder).lm_config() == lm.cfg
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor(prompts(lm, [13]))
    assert torch.equal(loaded(ids).logits, lm(ids).logits)
    loaded.save_pretrained(tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert isinstance(again, TTTLAForCausalLM) and torch.equal(again(ids).logits, lm(ids).logits)


def test_a_tokenizer_json_export_loads_with_auto_tokenizer(tmp_path: Path, word_tokenizer: Path) -> None:
    tokenizer = JsonTokenizer(word_tokenizer)
    lm = make_model(MODES[HF_MODES[0]]).float()
    folder = save_exported(lm, tmp_path / "export", tokenizer)
    loaded = AutoTokenizer.from_pretrained(folder)
    text = "hello world world hello"
    assert loaded(text)["input_ids"] == tokenizer.encode(text).ids.tolist()
    assert loaded.eos_token_id == tokenizer.eos_id == AutoConfig.from_pretrained(folder).eos_token_id
    assert loaded.padding_side == "left"


def test_a_bad_config_value_is_named(tmp_path: Path) -> None:
    folder = save_exported(tiny_model(), tmp_path / "export")
    settings = json.loads((folder / HF_CONFIG_FILE).read_text())
    settings["ttt"]["chunk_size"] = 0
    (folder / HF_CONFIG_FILE).write_text(json.dumps(settings))
    with pytest.raises(ConfigError, match=r"config.ttt.chunk_size=0 must be >= 1"):
        AutoModelForCausalLM.from_pretrained(folder)


@pytest.fixture
def word_tokenizer(tmp_path: Path) -> Path:
    """A small word-level tokenizer.json with an end token (ids below the test model's vocabulary of 50)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tokenizer = Tokenizer(WordLevel({"<unk>": 0, "</s>": 1, "hello": 2, "world": 3}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    return tmp_path / "tokenizer.json"
