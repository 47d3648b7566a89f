"""The model `tttla` of lm-evaluation-harness: an exported tttla model answering its three request types.

Importing this module registers it, so that `lm_eval.simple_evaluate(model="tttla",
model_args="pretrained=FOLDER", ...)` evaluates an export (`python -m train.evaluation.harness` is the
command line; the `lm_eval` command has no plugin hook for models). The requests are answered with
the project's own computations:

* `loglikelihood` (multiple choice, lambada-style scoring): the chunk form, one forward pass per
  batch of requests; rows are padded on the right, which leaves every real position unchanged (the
  form is causal);
* `loglikelihood_rolling` (perplexity of whole documents): the same, over lm-evaluation-harness's
  rolling windows of `max_length` tokens, or the whole document in one window when no limit is set
  (the TTT state has none);
* `generate_until`: the constant-size decoding state, prompts of any lengths in one batch
  (`train.generation.generate.generate`), stopped at the end token or at a task's stop strings.

Text goes through the export's tokenizer (its tokenizer.json, or UTF-8 bytes).
"""

from __future__ import annotations

import json
from typing import Any, Iterator, Optional, Sequence

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from train.generation.export import load_exported_tokenizer, load_model
from train.generation.generate import DTYPES, generate

DEFAULT_MAX_GEN_TOKS = 256
SAMPLING_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_p"}  # what generate_until reads

Scored = tuple[list[int], list[int]]  # (context ids, continuation ids): the continuation's tokens are scored


def batches(order: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(order), size):
        yield list(order[start : start + size])


@register_model("tttla")
class TTTLAHarnessLM(TemplateLM):
    """An exported tttla model for lm-evaluation-harness: `pretrained` is the export folder;
    `max_length` (default: none) refuses any request longer than it."""

    def __init__(
        self, pretrained: str, device: Optional[str] = None, dtype: str = "float32", batch_size: int | str = 8,
        max_length: Optional[int] = None, **_: Any,
    ) -> None:
        super().__init__()
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a positive number (automatic sizing is not offered)")
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} must be one of {sorted(DTYPES)}")
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, cfg = load_model(pretrained, device=self._device, dtype=DTYPES[dtype])
        self.tokenizer = load_exported_tokenizer(pretrained)
        if self.tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(f"{pretrained}: the tokenizer has {self.tokenizer.vocab_size} ids but model.vocab_size={cfg.vocab_size}; export the run again")
        self.batch_size, self.max_length = int(batch_size), None if max_length is None else int(max_length)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **_: Any) -> list[int]:
        return self.tokenizer.encode(string).ids.tolist()

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def check_fits(self, tokens: int) -> None:
        """A request of `tokens` tokens (context and continuation) must fit `max_length`, if one is set."""
        if self.max_length is not None and tokens > self.max_length:
            raise ValueError(
                f"a request needs {tokens} tokens but max_length={self.max_length}: raise --max-length "
                "(the TTT state has no length limit) or ask for shorter contexts (--lengths)"
            )

    @torch.no_grad()
    def score(self, requests: list[Scored]) -> list[tuple[float, bool]]:
        """(log-probability of the continuation, whether greedy decoding reproduces it) per request,
        in batches of similar lengths, longest first (memory runs out at the start, if at all)."""
        for context, continuation in requests:
            self.check_fits(len(context) + len(continuation))
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]) - len(requests[i][1]))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
        for batch in batches(order, self.batch_size):
            for index, result in zip(batch, self._score_batch([requests[i] for i in batch])):
                results[index] = result
        return results

    def _score_batch(self, requests: list[Scored]) -> list[tuple[float, bool]]:
        rows = [(context + continuation)[:-1] for context, continuation in requests]  # the inputs that predict each token
        width = max(len(row) for row in rows)
        ids = torch.tensor([row + [self.eot_token_id] * (width - len(row)) for row in rows], device=self._device)
        logits = self.model(ids).logits  # [B, width, V]
        results = []
        for row, (ids_row, (_, continuation)) in enumerate(zip(rows, requests)):
            predicted = logits[row, len(ids_row) - len(continuation) : len(ids_row)]  # [n, V]
            logprobs = torch.log_softmax(predicted.to(torch.promote_types(predicted.dtype, torch.float32)), dim=-1)
            target = torch.tensor(continuation, device=self._device)
            total = logprobs.gather(1, target[:, None]).sum()
            results.append((float(total), bool((logprobs.argmax(dim=-1) == target).all())))
        return results

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **_: Any) -> list[tuple[float, bool]]:
        results = self.score([(context, continuation) for _, context, continuation in requests])
        for (texts, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", texts, result)
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Each document's log-probability, every token predicted once (after the end token)."""
        windows: list[tuple[int, Scored]] = []
        for index, (text,) in enumerate(request.args for request in requests):
            tokens = self.tok_encode(text)
            length = self.max_length or max(len(tokens), 1)
            for window in get_rolling_token_windows(tokens, self.prefix_token_id, length, context_len=1):
                windows.append((index, make_disjoint_window(window)))
        totals = [0.0] * len(requests)
        for (index, _), (logprob, _) in zip(windows, self.score([window for _, window in windows])):
            totals[index] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Continuations decoded with the constant-size state, requests with the same settings in one
        batch; each is cut before the first of its stop strings."""
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        outputs = [""] * len(requests)
        for indices in groups.values():
            settings = normalize_gen_kwargs(requests[indices[0]].args[1], DEFAULT_MAX_GEN_TOKS)
            for batch in batches(indices, self.batch_size):
                for index, text in zip(batch, self._generate_batch([requests[i].args[0] for i in batch], settings)):
                    outputs[index] = text
                    self.cache_hook.add_partial("generate_until", requests[index].args, text)
        return outputs

    def _generate_batch(self, contexts: list[str], settings: dict) -> list[str]:
        unknown = sorted(set(settings) - SAMPLING_KEYS)
        if unknown:
            raise ValueError(f"generation settings {unknown} are not offered by the tttla model (it reads {sorted(SAMPLING_KEYS)})")
        until = handle_stop_sequences(settings["until"], eos=None)
        prompts = [self.tok_encode(context) or [self.eot_token_id] for context in contexts]
        for prompt in prompts:
            self.check_fits(len(prompt) + settings["max_gen_toks"])

        def stopped(row: int, tokens: list[int]) -> bool:
            return any(stop in self.tok_decode(tokens) for stop in until)

        temperature = float(settings["temperature"]) if settings["do_sample"] else 0.0
        produced = generate(self.model, prompts, settings["max_gen_toks"], temperature, float(settings.get("top_p", 1.0)),
                            stop_id=self.eot_token_id, row_done=stopped if until else None)  # fmt: skip
        texts = [self.tok_decode([t for t in tokens if t != self.eot_token_id]) for tokens in produced]
        return [text[: min([text.index(stop) for stop in until if stop in text], default=len(text))] for text in texts]
