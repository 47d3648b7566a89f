"""`python -m train.generation.generate --model FOLDER --prompt TEXT`: sample continuations with constant memory.

The prompt is prefilled in the chunk form, then tokens are decoded one at a time from the recurrent
state of decoding/decode.py (fast weights + the partial chunk's running gradient + the sliding-window ring), so
memory does not grow with the context. Greedy (`--temperature 0`), temperature and top-p sampling,
on the device. Several `--prompt`s (and `--num-samples` continuations of each) decode as one batch,
every row at its own position (decoding/static.py); on CUDA the step is replayed from CUDA
graphs. With one prompt and one sample the text streams as it is produced.

Text is byte-level (train/data/tokenizer.py's byte tokenizer: ids < 256 are UTF-8 bytes, id 0 ends a
document); other ids print as `<id>`. FOLDER is an exported model (`model.safetensors` +
`model.yaml`); convert a sharded training checkpoint first with
`python -m train.generation.export CHECKPOINT_DIR OUT_DIR`.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from typing import Callable, Optional, Sequence

import torch

from decoding.graphs import DecodeRunner
from decoding.sampling import sample_tokens
from decoding.static import prefill_rows
from model.lm import TTTLM
from train.data.tokenizer import ByteTextStream, ByteTokenizer
from train.generation.export import load_model
from train.job.cli import DEBUG_HELP, run_command

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}

TokenCallback = Callable[[int, int], None]  # (index of the prompt, new token id)
RowDone = Callable[[int, list[int]], bool]  # (index of the prompt, its new tokens so far) -> has it ended


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Next tokens [B] from logits [B, V]: `decoding.sampling.sample_tokens` (greedy, temperature, top-p on the device)."""
    return sample_tokens(logits, temperature, top_p, generator)


@torch.no_grad()
def generate_batch(
    model: TTTLM,
    prompts: "torch.Tensor | Sequence[list[int]]",
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_id: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    on_token: Optional[TokenCallback] = None,
    graphs: Optional[bool] = None,
    row_done: Optional[RowDone] = None,
    compile_steps: Optional[bool] = None,
) -> list[list[int]]:
    """Continue prompts of any lengths ([B, P] or B lists) in one batch; a sequence ends at `stop_id`
    (included) or after max_new_tokens.

    Each row decodes at its own position from static buffers; `graphs` (default: on CUDA) replays the
    step from CUDA graphs, and `compile_steps` (default: on CUDA) fuses each layer's step with Inductor
    first (`decoding.compiled`: a one-off compile, then several times fewer kernels a token). Tokens stay on the device and are read back every `STOP_CHECK_EVERY`
    steps to see whether every row has stopped; `on_token(row, token)` (streaming) reads every step.
    `row_done(row, its new tokens)` (e.g. a stop string in their text) also counts a row as stopped
    when the rows are read; its tokens are returned whole, for the caller to cut.
    """
    rows = prompts.tolist() if isinstance(prompts, torch.Tensor) else [list(p) for p in prompts]
    last_logits, decoder = prefill_rows(model, rows)
    sample = partial(sample_tokens, temperature=temperature, top_p=top_p, generator=generator)
    decoder.tokens.copy_(sample(last_logits))
    use_graphs = decoder.tokens.is_cuda if graphs is None else graphs
    backend = "inductor" if (decoder.tokens.is_cuda if compile_steps is None else compile_steps) else None
    runner = DecodeRunner(decoder, sample, use_graphs, generator if temperature > 0 else None, backend)
    produced = [decoder.tokens.clone()]  # [B] per step, kept on the device
    streamed = [False] * len(rows)  # per row: has its stop token been streamed (on_token only)
    while True:
        if on_token is not None:
            for row, token in enumerate(produced[-1].tolist()):
                if not streamed[row]:
                    on_token(row, token)
                    streamed[row] = token == stop_id
        if len(produced) == max_new_tokens or _all_stopped(produced, stop_id, row_done, every=1 if on_token else STOP_CHECK_EVERY):
            break
        runner.step()
        produced.append(decoder.tokens.clone())
    return [_until_stop(row, stop_id) for row in torch.stack(produced, dim=1).tolist()]


STOP_CHECK_EVERY = 32  # steps between the device reads that ask whether every row has produced its stop token


def _all_stopped(produced: list[torch.Tensor], stop_id: Optional[int], row_done: Optional[RowDone], every: int) -> bool:
    """Whether every row has produced `stop_id` or satisfies `row_done`, read from the device only every `every` steps."""
    if (stop_id is None and row_done is None) or len(produced) % every:
        return False
    rows = torch.stack(produced, dim=1)  # [B, steps]
    stopped = (rows == stop_id).any(dim=1) if stop_id is not None else torch.zeros(rows.shape[0], dtype=torch.bool)
    if row_done is None:
        return bool(stopped.all())  # one value read back, not the tokens
    return all(done or row_done(row, tokens) for row, (done, tokens) in enumerate(zip(stopped.tolist(), rows.tolist())))


def _until_stop(tokens: list[int], stop_id: Optional[int]) -> list[int]:
    return tokens[: tokens.index(stop_id) + 1] if stop_id in tokens else tokens


def generate(
    model: TTTLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_id: Optional[int] = None,
    seed: int = 0,
    on_token: Optional[TokenCallback] = None,
    graphs: Optional[bool] = None,
    row_done: Optional[RowDone] = None,
    compile_steps: Optional[bool] = None,
) -> list[list[int]]:
    """Continuations of prompts of any lengths (each >= 1 token), all decoded as one batch; `on_token(prompt
    index, token)`, `row_done(prompt index, its new tokens)`, `graphs` and `compile_steps` as in `generate_batch`."""
    generator = torch.Generator(device=model.embed.weight.device).manual_seed(seed)
    return generate_batch(
        model, prompts, max_new_tokens, temperature, top_p, stop_id, generator, on_token, graphs, row_done, compile_steps
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.generation.generate", description=__doc__.split("\n\n")[0], epilog=DEBUG_HELP)
    parser.add_argument("--model", required=True, help="exported model folder (python -m train.generation.export writes one)")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--num-samples", type=int, default=1, help="continuations per prompt, decoded in the same batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cuda-graphs", action="store_true", help="run the CUDA decode step eagerly")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip fusing the CUDA decode step with Inductor (saves its one-off compile on short outputs)")
    parser.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-document token")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1 or args.num_samples < 1:
        parser.error(f"--max-new-tokens={args.max_new_tokens} and --num-samples={args.num_samples} must be >= 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        parser.error(f"--temperature={args.temperature} must be >= 0 and --top-p={args.top_p} in (0, 1]")
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    model, _ = load_model(args.model, device=args.device, dtype=DTYPES[args.dtype])
    tokenizer = ByteTokenizer()
    texts = [text for text in args.prompt for _ in range(args.num_samples)]
    prompts = [tokenizer.encode(text).ids.tolist() for text in texts]
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
        print_token if streaming else None, graphs=False if args.no_cuda_graphs else None,
        compile_steps=False if args.no_compile else None,
    )  # fmt: skip
    if streaming:
        sys.stdout.write(stream.flush() + "\n")
        return
    for index, (text, out) in enumerate(zip(texts, outputs)):
        print(f"--- [{index}] ---\n{text}{tokenizer.decode([t for t in out if t != stop_id])}")


if __name__ == "__main__":
    run_command("train.generation.generate", main, sys.argv[1:])
