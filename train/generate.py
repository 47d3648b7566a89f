"""`python -m train.generate --model FOLDER --prompt TEXT`: sample continuations with constant memory.

The prompt is prefilled in the chunk form, then tokens are decoded one at a time from the recurrent
state of model/decode.py (fast weights + the pending partial chunk + the sliding-window ring), so
memory does not grow with the context. Greedy (`--temperature 0`), temperature and top-p sampling;
several `--prompt`s form a batch (prompts of equal token length are decoded together, because the
chunk boundaries of a batch must line up). With one prompt the text streams as it is produced.

Text is byte-level (train/tokenizer.py's byte tokenizer: ids < 256 are UTF-8 bytes, id 0 ends a
document); other ids print as `<id>`. FOLDER is an exported model (`model.safetensors` +
`model.yaml`); convert a sharded training checkpoint first with
`python -m train.export CHECKPOINT_DIR OUT_DIR`.
"""

from __future__ import annotations

import argparse
import codecs
import sys
from collections import defaultdict
from typing import Callable, Optional

import torch

from model.decode import decode_step, prefill
from model.lm import TTTLM
from train.cli import DEBUG_HELP, run_command
from train.export import load_model
from train.tokenizer import ByteTokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
BYTE_VOCAB = 256

TokenCallback = Callable[[int, int], None]  # (index of the prompt, new token id)


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Next tokens [B] from logits [B, V]: argmax when temperature == 0, else nucleus sampling.

    Top-p keeps the smallest set of most likely tokens whose probability reaches `top_p` (the most
    likely token is always kept), renormalised.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely tokens
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate_batch(
    model: TTTLM,
    prompts: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_id: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    on_token: Optional[TokenCallback] = None,
) -> list[list[int]]:
    """Continue equal-length prompts [B, P]; a sequence ends at `stop_id` (included) or after max_new_tokens.

    `on_token(row, token)` is called for every kept token as soon as it exists (streaming).
    """
    logits, state = prefill(model, prompts)
    next_logits = logits[:, -1]
    outputs: list[list[int]] = [[] for _ in range(prompts.shape[0])]
    finished = [False] * prompts.shape[0]
    for step in range(max_new_tokens):
        tokens = sample_next(next_logits, temperature, top_p, generator)
        for row, token in enumerate(tokens.tolist()):
            if finished[row]:
                continue
            outputs[row].append(token)
            if on_token is not None:
                on_token(row, token)
            finished[row] = token == stop_id
        if all(finished) or step == max_new_tokens - 1:
            break
        next_logits = decode_step(model, state, tokens)
    return outputs


def generate(
    model: TTTLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_id: Optional[int] = None,
    seed: int = 0,
    on_token: Optional[TokenCallback] = None,
) -> list[list[int]]:
    """Continuations of prompts of any lengths (each >= 1 token), batched by length; `on_token(prompt index, token)`."""
    device = model.embed.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {index} is empty: generation needs at least one prompt token")
        by_length[len(prompt)].append(index)
    results: list[list[int]] = [[] for _ in prompts]
    for indices in by_length.values():
        batch = torch.tensor([prompts[i] for i in indices], dtype=torch.long, device=device)
        callback = None if on_token is None else (lambda row, token, indices=indices: on_token(indices[row], token))
        for index, out in zip(indices, generate_batch(model, batch, max_new_tokens, temperature, top_p, stop_id, generator, callback)):
            results[index] = out
    return results


class ByteTextStream:
    """Turns byte-token ids into text incrementally: a UTF-8 character split over tokens prints whole."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        if token >= BYTE_VOCAB:
            return self._decoder.decode(b"", final=True) + f"<{token}>"
        return self._decoder.decode(bytes([token]))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


def decode_bytes(tokens: list[int]) -> str:
    stream = ByteTextStream()
    return "".join(stream.push(t) for t in tokens) + stream.flush()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.generate", description=__doc__.split("\n\n")[0], epilog=DEBUG_HELP)
    parser.add_argument("--model", required=True, help="exported model folder (python -m train.export writes one)")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-document token")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        parser.error(f"--temperature={args.temperature} must be >= 0 and --top-p={args.top_p} in (0, 1]")
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    model, _ = load_model(args.model, device=args.device, dtype=DTYPES[args.dtype])
    tokenizer = ByteTokenizer()
    prompts = [tokenizer.encode(text).ids.tolist() for text in args.prompt]
    stop_id = None if args.no_stop else tokenizer.eos_id
    streaming = len(prompts) == 1
    stream = ByteTextStream()

    def print_token(index: int, token: int) -> None:
        if token != stop_id:
            sys.stdout.write(stream.push(token))
            sys.stdout.flush()

    if streaming:
        sys.stdout.write(args.prompt[0])
    outputs = generate(
        model, prompts, args.max_new_tokens, args.temperature, args.top_p, stop_id, args.seed,
        print_token if streaming else None,
    )  # fmt: skip
    if streaming:
        sys.stdout.write(stream.flush() + "\n")
        return
    for index, (text, out) in enumerate(zip(args.prompt, outputs)):
        print(f"--- [{index}] ---\n{text}{decode_bytes([t for t in out if t != stop_id])}")


if __name__ == "__main__":
    run_command("train.generate", main, sys.argv[1:])
