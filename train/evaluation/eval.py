"""`python -m train.evaluation.eval --model FOLDER --data PATH`: perplexity by position on a held-out MDS split.

Does the model use long context? The loss of the token at position t, averaged per bucket of
`bucket_size` positions (0-1K, 1K-2K, ...), falls with t when earlier tokens help, and stays flat
(or rises) past the training length when the model does not extrapolate. Positions count from the
start of the packed sequence, so to measure lengths beyond training, prepare the split with a longer
`--seq-len` (`python -m train.data.prepare ... --seq-len 32768`) and pass `--eval-len` to cut it.

`evaluate_perplexity_by_position` is the library entry point (the trainer calls it periodically);
the command line adds the data loader, a JSON file and a TensorBoard figure.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Optional

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter

from model.baseline import BaselineLM
from model.lm import TTTLM
from train.config import DataConfig
from train.data.loader import build_loader, check_split, split_inputs_targets
from train.generation.export import load_model
from train.job.cli import DEBUG_HELP, run_command

LanguageModel = TTTLM | BaselineLM  # anything whose forward(input_ids) returns an LMOutput with logits
LOSS_SLICE = 4096  # positions per cross-entropy slice: bounds the fp32 copy of [B, T, V] logits


def token_losses(model: LanguageModel, tokens: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every next-token prediction: tokens [B, L] -> [B, L - 1] (fp32)."""
    input_ids, targets = split_inputs_targets(tokens)
    return per_token_cross_entropy(model(input_ids).logits, targets)


def per_token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits [B, T, V], targets [B, T] -> [B, T] fp32 losses, upcast slice by slice to bound memory."""
    return torch.cat(
        [
            F.cross_entropy(logits[:, s : s + LOSS_SLICE].float().transpose(1, 2), targets[:, s : s + LOSS_SLICE], reduction="none")
            for s in range(0, targets.shape[1], LOSS_SLICE)
        ],
        dim=1,
    )


@torch.no_grad()
def evaluate_perplexity_by_position(
    model: LanguageModel, batches: Iterable[torch.Tensor | dict], bucket_size: int, eval_len: Optional[int] = None
) -> dict:
    """Mean loss and perplexity per position bucket over `batches` of tokens [B, L] (or dicts with "tokens").

    Position t is the t-th prediction of a sequence (of token t + 1 from tokens 0..t). `eval_len` cuts
    each sequence to that many predictions. Returns {"bucket_size", "tokens", "loss", "ppl",
    "buckets": [{"start", "end", "tokens", "loss", "ppl"}]}; the last bucket may be shorter.
    """
    if bucket_size < 1:
        raise ValueError(f"bucket_size={bucket_size} must be >= 1")
    was_training = model.training
    model.eval()
    device = model.embed.weight.device

    def losses_of(batch: torch.Tensor | dict) -> torch.Tensor:
        tokens = (batch["tokens"] if isinstance(batch, dict) else batch).to(device)
        return token_losses(model, tokens if eval_len is None else tokens[:, : eval_len + 1])

    loss_sums, count = accumulate_position_losses(losses_of, batches)
    model.train(was_training)
    return summarize_position_losses(loss_sums, count, bucket_size)


def accumulate_position_losses(
    losses_of: Callable[[torch.Tensor | dict], torch.Tensor], batches: Iterable[torch.Tensor | dict]
) -> tuple[torch.Tensor, int]:
    """Per-position loss summed over sequences ([T] fp64) and the number of sequences.

    `losses_of(batch) -> [B, T]` scores one batch as it comes from `batches`: a plain forward pass
    of an exported model, or the sharded forward of the training engine during training.
    """
    loss_sums: Optional[torch.Tensor] = None
    count = 0
    for batch in batches:
        per_token = losses_of(batch).double()
        losses = per_token.sum(dim=0)
        if loss_sums is None:
            loss_sums = losses
        elif losses.shape != loss_sums.shape:
            raise ValueError(f"sequences of {losses.shape[0] + 1} and {loss_sums.shape[0] + 1} tokens: batches must share a length")
        else:
            loss_sums += losses
        count += per_token.shape[0]
    if loss_sums is None:
        raise ValueError("no batches to evaluate: the split is empty or shorter than one batch")
    return loss_sums, count


def summarize_position_losses(loss_sums: torch.Tensor, count: int, bucket_size: int) -> dict:
    """Bucketed mean loss and perplexity from per-position loss sums over `count` sequences."""
    buckets = []
    for start in range(0, loss_sums.shape[0], bucket_size):
        bucket = loss_sums[start : start + bucket_size]
        loss = (bucket.sum() / (bucket.numel() * count)).item()
        buckets.append({"start": start, "end": start + bucket.numel(), "tokens": bucket.numel() * count, "loss": loss, "ppl": math.exp(loss)})
    loss = (loss_sums.sum() / loss_sums.numel() / count).item()
    return {"bucket_size": bucket_size, "tokens": loss_sums.numel() * count, "loss": loss, "ppl": math.exp(loss), "buckets": buckets}


def plot_perplexity_by_position(results: dict[str, dict], train_len: Optional[int] = None) -> plt.Figure:
    """One line per named result of `evaluate_perplexity_by_position`; a dashed line marks the training length."""
    figure, axis = plt.subplots(figsize=(7, 4))
    for name, result in results.items():
        centres = [(b["start"] + b["end"]) / 2 for b in result["buckets"]]
        axis.plot(centres, [b["ppl"] for b in result["buckets"]], marker="o", label=name)
    if train_len is not None:
        axis.axvline(train_len, color="grey", linestyle="--", label=f"training length {train_len}")
    axis.set_xlabel("position in the sequence (tokens)")
    axis.set_ylabel("perplexity")
    axis.set_title(f"perplexity by position (buckets of {next(iter(results.values()))['bucket_size']})")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    return figure


def publish(figure: plt.Figure, payload: dict, name: str, out_dir: Path, writer: Optional[SummaryWriter], step: int) -> None:
    """Write `<name>.json` and `<name>.png` into out_dir, and the figure to TensorBoard under `eval/<name>`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    figure.savefig(out_dir / f"{name}.png", dpi=120)
    if writer is not None:
        writer.add_figure(f"eval/{name}", figure, global_step=step)
    plt.close(figure)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model/--device/--dtype, shared by the evaluation command lines."""
    parser.add_argument("--model", required=True, help="exported model folder (python -m train.generation.export writes one)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")


def load_for_eval(args: argparse.Namespace) -> TTTLM:
    return load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))[0]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.evaluation.eval", description=__doc__.split("\n\n")[0], epilog=DEBUG_HELP)
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, help="prepared dataset folder (python -m train.data.prepare writes one)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--bucket-size", type=int, default=1024)
    parser.add_argument("--eval-len", type=int, default=None, help="predictions per sequence (default: the whole sample)")
    parser.add_argument("--train-len", type=int, default=None, help="marks the training length on the plot")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--max-batches", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("runs/eval"), help="folder for ppl_by_position.{json,png}")
    parser.add_argument("--tensorboard", type=Path, default=None, help="TensorBoard log folder (default: --out)")
    parser.add_argument("--step", type=int, default=0, help="global step recorded with the TensorBoard figure")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    model = load_for_eval(args)
    data = DataConfig(path=args.data)
    if check_split(data, args.split) == 0:
        raise ValueError(
            f"--split {args.split}: {Path(args.data) / args.split} holds no samples; prepare the data with a larger "
            f"--val-fraction (python -m train.data.prepare ... --val-fraction 0.01) or evaluate another --split"
        )
    loader = build_loader(data, args.split, args.batch_size, sp=1, shuffle=False)
    result = evaluate_perplexity_by_position(model, islice(loader, args.max_batches), args.bucket_size, args.eval_len)
    writer = SummaryWriter(str(args.tensorboard or args.out))
    publish(plot_perplexity_by_position({Path(args.model).name: result}, args.train_len), result, "ppl_by_position", args.out, writer, args.step)
    writer.close()
    for bucket in result["buckets"]:
        print(f"positions {bucket['start']:>7}-{bucket['end']:<7} loss {bucket['loss']:.4f}  ppl {bucket['ppl']:.3f}")
    print(f"all {result['tokens']} predictions: loss {result['loss']:.4f}  ppl {result['ppl']:.3f} -> {args.out}/ppl_by_position.json")


if __name__ == "__main__":
    run_command("train.evaluation.eval", main, sys.argv[1:])
