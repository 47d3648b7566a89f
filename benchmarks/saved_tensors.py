"""`python -m benchmarks.saved_tensors [--config 125m] [--seq-len 16384] [--compile on] [--memory-budget B] [KEY=VALUE ...]`: what one
block keeps for its backward, tttla beside the transformer.

Peak training memory without recomputation is the tensors each block saves for its backward, times
the layers. This runs one block of each model (`model.lm.Block`, `model.baseline.BaselineBlock`, the
trainer's compiled blocks when `--compile on`) forward under bf16 autocast with fp32 parameters, as
the trainer does, and lists every distinct tensor saved for backward (one storage counted once, with
the shape, dtype and the op's name where autograd knows it), largest first, and the totals per
token. The difference between the two lists is what tttla pays for its mixer.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from benchmarks.step import PARALLEL_FORM
from model.baseline import BaselineBlock
from model.config import LMConfig, load_model_config
from model.lm import Block
from model.swa import window_block_mask
from train.compile import compile_blocks

CONFIG_DIR = Path("configs/model")


@dataclass
class SavedTensor:
    shape: tuple[int, ...]
    dtype: str
    mib: float


def saved_for_backward(block: nn.Module, x: torch.Tensor, call) -> list[SavedTensor]:
    """Distinct storages `call(block, x)` saves for backward, largest first (parameters left out)."""
    parameters = {p.untyped_storage().data_ptr() for p in block.parameters()}
    seen: dict[int, SavedTensor] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters and storage.data_ptr() not in seen and storage.nbytes():
            seen[storage.data_ptr()] = SavedTensor(tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."),
                                                   round(storage.nbytes() / 2**20, 2))  # fmt: skip
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.is_cuda):
            out = call(block, x)
    out.float().sum().backward()
    return sorted(seen.values(), key=lambda t: -t.mib)


def block_pair(size: str, device: torch.device, compile_on: bool, overrides: tuple[str, ...] = (),
               memory_budget: float = 1.0) -> dict[str, nn.Module]:
    """One block of each model, compiled as the trainer compiles them (`train.compile.compile_blocks`,
    with its memory budget) when `compile_on`."""
    cfg: LMConfig = load_model_config(str(CONFIG_DIR / f"{size}.yaml"), [*PARALLEL_FORM, *overrides])
    blocks = {"tttla": Block(cfg).to(device), "sdpa": BaselineBlock(cfg).to(device)}
    if compile_on:
        for block in blocks.values():
            compile_blocks(block, memory_budget=memory_budget)
    return blocks


def run_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block's output, called as the model's layer loop calls it (the window's block mask built
    outside the block, once per forward, as `TTTLM.window_mask` does on CUDA)."""
    if isinstance(block, Block):
        window = block.mixer.cfg.window_size
        mask = window_block_mask(x.shape[1], window, x.device, None) if x.is_cuda and window > 0 else None
        return block(x, None, 0, None, mask)[0]
    return block(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="125m")
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--compile", choices=["on", "off"], default="on")
    parser.add_argument("--memory-budget", type=float, default=1.0,
                        help="train.activation_memory_budget of the compiled blocks (with --compile on)")
    parser.add_argument("--out", help="write the lists as JSON here")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="model config overrides, e.g. ttt.save_feature_projections=false")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    blocks = block_pair(args.config, device, args.compile == "on", tuple(args.overrides), args.memory_budget)
    hidden = blocks["tttla"].mlp_norm.weight.numel()
    report = {}
    for name, block in blocks.items():
        x = torch.randn(1, args.seq_len, hidden, device=device, requires_grad=True)
        saved = saved_for_backward(block, x, run_block)
        total = sum(t.mib for t in saved)
        report[name] = {"total_mib": round(total, 1), "bytes_per_token": round(total * 2**20 / args.seq_len),
                        "tensors": [asdict(t) for t in saved]}  # fmt: skip
        print(f"{name}: {total:.1f} MiB saved by one block at T={args.seq_len} ({total * 2**20 / args.seq_len:.0f} B/token)")
        for t in saved:
            print(f"  {t.mib:9.2f} MiB  {t.dtype:9s} {list(t.shape)}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
