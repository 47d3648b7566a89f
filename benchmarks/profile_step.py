"""`python -m benchmarks.profile_step CONFIG [key=value ...] [--seq-len T]`: where one training step's time goes.

Runs forward + backward of the model config on one GPU in bf16 autocast at one sequence, prints
tokens/s and the CUDA kernels that take the most time (torch.profiler), so throughput work starts
from a measurement rather than a guess.
"""

from __future__ import annotations

import argparse
import time

import torch

from model.config import load_model_config
from model.lm import TTTLM


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.profile_step needs a CUDA device")
    model = TTTLM(load_model_config(args.config, args.overrides)).cuda()
    ids = torch.randint(0, model.cfg.vocab_size, (1, args.seq_len + 1), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids[:, :-1], ids[:, 1:], return_logits=False).loss
        loss.backward()

    step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.iters
    print(f"{args.seq_len / seconds / 1e3:.1f}k tok/s, {seconds * 1e3:.1f} ms per fwd+bwd, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
