"""`python -m train.evaluation.quality [--quick]`: what does each sequence layer buy, at equal size and equal tokens?

Trains three models of one config on the same batches of the offline stdlib corpus (Python standard
library sources, byte tokenizer) with a small self-contained loop (AdamW, warmup + cosine, bf16
autocast on CUDA, clipping), independent of the DeepSpeed trainer:
* `lact-recurrent`: the faithful LaCT layer (all fast weights, momentum, weight norm) + sliding window;
* `ttt-la-parallel`: W1-only fast weights, no weight norm (the chunk scan) + sliding window;
* `sdpa-transformer`: full causal softmax attention (model/baseline.py), same blocks and width.
Then reports final training loss, held-out loss and perplexity by position, and passkey accuracy at
lengths up to twice the training length, in `<out>.md` / `<out>.json` / `<out>_ppl.png` (default
docs/quality). The default budget fits one H100 in well under an hour; `--quick` is a CPU smoke test.
The stdlib corpus holds ~12M byte tokens, so large budgets repeat it (the same batches for every model).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from streaming import StreamingDataset

from model.baseline import BaselineLM
from model.config import load_model_config
from model.lm import TTTLM, count_parameters
from train.data.prepare import prepare, read_manifest, stdlib_files
from train.data.tokenizer import ByteTokenizer
from train.evaluation.eval import evaluate_perplexity_by_position, plot_perplexity_by_position
from train.evaluation.retrieval import evaluate_retrieval

VARIANTS = {
    "lact-recurrent": ["ttt.mode=recurrent", "ttt.fast_weights=all", "ttt.weight_norm=true", "ttt.momentum=true"],
    "ttt-la-parallel": ["ttt.mode=linear_attention", "ttt.fast_weights=w1", "ttt.weight_norm=false"],
    "sdpa-transformer": [],
}
DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]
MIN_PASSKEY_LENGTH = 512  # the passkey instructions and question take ~290 tokens; leave room for a haystack


def corpus(folder: Path, seq_len: int, max_files: int | None) -> Path:
    """The stdlib corpus packed to seq_len in `folder` (reused when an earlier run prepared the same length)."""
    manifest = read_manifest(folder)
    if manifest is None or manifest["seq_len"] != seq_len:
        files = stdlib_files()[:max_files]
        prepare(files, folder, seq_len, ByteTokenizer(), val_fraction=0.02, show_progress=False)
    return folder


def load_split(folder: Path, split: str) -> torch.Tensor:
    """All samples of one MDS split in memory: [N, seq_len + 1] int64 (the corpus is small)."""
    dataset = StreamingDataset(local=str(folder / split), shuffle=False, batch_size=1)
    return torch.stack([torch.from_numpy(dataset[i]["tokens"].astype("int64")) for i in range(len(dataset))])


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model: torch.nn.Module, samples: torch.Tensor, args: argparse.Namespace, device: torch.device) -> dict:
    """`args.steps` AdamW steps on batches drawn in a fixed (seeded) order; returns losses and throughput."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda")
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(args.seed))
    model.train()
    losses = []
    start = time.perf_counter()
    for step in range(args.steps):
        index = torch.arange(step * args.batch, (step + 1) * args.batch) % len(samples)
        batch = samples[order[index]].to(device)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(batch[:, :-1], batch[:, 1:]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % args.log_every == 0 or step == args.steps - 1:
            print(f"  step {step:>5}/{args.steps}  loss {losses[-1]:.4f}", flush=True)
    seconds = time.perf_counter() - start
    tail = losses[-max(1, args.steps // 20) :]
    return {"final_train_loss": sum(tail) / len(tail), "train_seconds": seconds, "tokens_per_second": args.steps * args.batch * args.seq_len / seconds, "losses": losses}


def evaluate(model: torch.nn.Module, val: torch.Tensor, args: argparse.Namespace, device: torch.device) -> dict:
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        batches = [val[i : i + args.batch].to(device) for i in range(0, min(len(val), args.eval_samples), args.batch)]
        ppl = evaluate_perplexity_by_position(model, batches, args.bucket_size)
        model.eval()
        passkey = evaluate_retrieval(model, "passkey", args.passkey_lengths, DEPTHS, args.passkey_samples, seed=args.seed)
    accuracy = {str(n): sum(row) / len(row) for n, row in zip(args.passkey_lengths, passkey["accuracy"])}
    return {"val": ppl, "passkey": passkey, "passkey_accuracy_by_length": accuracy}


def markdown(results: dict, args: argparse.Namespace) -> str:
    lengths = [str(n) for n in args.passkey_lengths]
    buckets = next(iter(results.values()))["val"]["buckets"]
    shown = sorted({0, len(buckets) // 2, len(buckets) - 1})
    bucket_names = [f"ppl {buckets[i]['start']}-{buckets[i]['end']}" for i in shown]
    lines = [
        "# Quality at equal size and tokens: LaCT recurrent vs TTT-LA parallel vs SDPA transformer",
        "",
        f"`python -m train.evaluation.quality {' '.join(args.argv)}`: config `{args.config}` {' '.join(args.override)}, "
        f"byte tokenizer on the stdlib corpus, {args.steps} steps x {args.batch} x {args.seq_len} = "
        f"{args.steps * args.batch * args.seq_len:,} tokens per model, lr {args.lr}, device {args.device_name}. "
        f"Held-out perplexity by position over {args.eval_samples} validation sequences; passkey accuracy "
        f"(greedy, exact 5 digits) over {len(DEPTHS)} depths x {args.passkey_samples} samples per length.",
        "",
        "| model | params | train loss | val loss | val ppl | " + " | ".join(bucket_names) + " | "
        + " | ".join(f"passkey@{n}" for n in lengths) + " | tokens/s |",
        "|---|---:|---:|---:|---:|" + "---:|" * (len(shown) + len(lengths) + 1),
    ]
    for name, r in results.items():
        cells = [
            name, f"{r['parameters'] / 1e6:.1f}M", f"{r['final_train_loss']:.4f}", f"{r['val']['loss']:.4f}", f"{r['val']['ppl']:.3f}",
            *(f"{r['val']['buckets'][i]['ppl']:.3f}" for i in shown),
            *(f"{r['passkey_accuracy_by_length'][n]:.2f}" for n in lengths),
            f"{r['tokens_per_second']:.0f}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.evaluation.quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny config, short sequences, a few steps on CPU")
    parser.add_argument("--config", default="configs/model/125m.yaml")
    parser.add_argument("--override", nargs="*", default=["ttt.chunk_size=512", "window_size=512"],
                        help="model config dotlist applied to every variant (vocab_size=256 is always added)")  # fmt: skip
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=float, default=25e6, help="training tokens per model")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-samples", type=int, default=64, help="validation sequences for perplexity by position")
    parser.add_argument("--bucket-size", type=int, default=512)
    parser.add_argument("--passkey-samples", type=int, default=4, help="per (length, depth) cell")
    parser.add_argument("--data", type=Path, default=Path("runs/quality/data"))
    parser.add_argument("--max-files", type=int, default=None, help="use only the first N stdlib files")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--out", type=Path, default=None, help="output path without suffix (default docs/quality)")
    args = parser.parse_args(argv)
    args.argv = argv
    if args.quick:
        args.config, args.override = "configs/model/tiny.yaml", ["ttt.chunk_size=32", "window_size=32"]
        args.seq_len, args.batch, args.tokens, args.warmup = 256, 4, 4 * 256 * 20, 5
        args.eval_samples, args.bucket_size, args.passkey_samples, args.log_every = 8, 64, 1, 10
        args.data, args.max_files = Path("runs/quality_quick/data"), 150
        args.out = args.out or Path("runs/quality_quick/quality")
    args.out = args.out or Path("docs/quality")
    args.steps = max(1, int(args.tokens // (args.batch * args.seq_len)))
    args.passkey_lengths = [n for n in (args.seq_len // 4, args.seq_len // 2, args.seq_len, 2 * args.seq_len) if n >= MIN_PASSKEY_LENGTH]
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    folder = corpus(args.data, args.seq_len, args.max_files)
    train_samples, val_samples = load_split(folder, "train"), load_split(folder, "val")
    print(f"{len(train_samples)} training and {len(val_samples)} validation sequences of {args.seq_len} tokens; {args.steps} steps per model")
    results = {}
    for name in args.variants:
        cfg = load_model_config(args.config, ["vocab_size=256", *args.override, *VARIANTS[name]])
        torch.manual_seed(args.seed)
        model = (BaselineLM(cfg) if name == "sdpa-transformer" else TTTLM(cfg)).to(device)
        print(f"{name}: {count_parameters(model) / 1e6:.1f}M parameters", flush=True)
        results[name] = {"parameters": count_parameters(model), **train(model, train_samples, args, device), **evaluate(model, val_samples, args, device)}
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(results, args))
    figure = plot_perplexity_by_position({name: r["val"] for name, r in results.items()}, train_len=args.seq_len)
    figure.savefig(args.out.with_name(args.out.name + "_ppl.png"), dpi=120)
    print(markdown(results, args))


if __name__ == "__main__":
    main(sys.argv[1:])
