"""The simplification ladder benchmark: `python -m benchmarks.ladder [--smoke] [--out DIR]` (`make bench-ladder`).

Times one sequence-mixer layer (`model.ttt_layer.TTTMixer`: q/k/v projection, the TTT branch, the
sliding-window attention, o_proj) of every step of arXiv 2602.21204's Table 2
(`configs/model/ladder/v0..v6.yaml`, 760M width) in its recurrent form and, where the step allows it
(V2 onwards: W1 only, no weight norm), its parallel chunk scan. Tokens per second of the forward and
of forward + backward (a training step of the layer), bf16 autocast, B * T = 65536 tokens at
T = 16384, beside the paper's recurrent -> parallel numbers (its GPU and shapes are not stated, so
the ratios are what compare). On CUDA it writes ladder.json and ladder.md under --out.

`--smoke` runs the same code on a tiny width on the CPU (a few milliseconds per case) so the CPU suite
keeps it working; nothing is written unless --out is given.
"""

from __future__ import annotations

import argparse

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import torch

from model.config import LMConfig, load_model_config
from model.ttt_layer import TTTMixer

LADDER_DIR = Path(__file__).resolve().parents[1] / "configs" / "model" / "ladder"
STEPS = ("v0", "v1", "v2", "v3", "v4", "v5", "v6")
DESCRIPTIONS = {
    "v0": "LaCT-LLM (all fast weights, momentum, Muon, weight norm)",
    "v1": "W1-only",
    "v2": "no weight norm (parallel possible)",
    "v3": "single linear layer",
    "v4": "no per-token lr",
    "v5": "no momentum",
    "v6": "no Muon (linear attention)",
}
# arXiv 2602.21204, Table 2: tokens/s recurrent -> parallel, and Book-3 perplexity.
PAPER_TPS = {"v0": (4.30e6, None), "v1": (10.60e6, None), "v2": (11.02e6, 30.18e6), "v3": (12.95e6, 49.69e6),
             "v4": (13.31e6, 53.99e6), "v5": (14.40e6, 57.28e6), "v6": (89.67e6, 124.6e6)}  # fmt: skip
PAPER_PPL = {"v0": 16.43, "v1": 15.93, "v2": 16.31, "v3": 16.23, "v4": 16.12, "v5": 15.97, "v6": 16.80}
TOKENS, SEQ_LEN = 65536, 16384


def ladder_config(step: str, smoke: bool) -> LMConfig:
    """The step's model config; `smoke` shrinks it to a CPU-sized width with the same options."""
    cfg = load_model_config(str(LADDER_DIR / f"{step}.yaml"))
    if not smoke:
        return cfg
    ttt = replace(cfg.ttt, chunk_size=16, w02_rank=min(cfg.ttt.w02_rank, 4))
    return replace(cfg, hidden_size=64, num_attn_heads=4, window_size=16, ttt=ttt).validate()


# The paper's names of the two forms label the rows: `model.ttt.mode` -> row-key prefix.
FORM_OF_MODE = {"recurrent": "recurrent", "linear_attention": "parallel"}


def modes_of(cfg: LMConfig) -> list[str]:
    """Recurrent always; linear attention where the step is a prefix sum (W1 only, no weight norm)."""
    parallel_ok = cfg.ttt.fast_weights == "w1" and not cfg.ttt.weight_norm
    return ["recurrent", "linear_attention"] if parallel_ok else ["recurrent"]


def seconds(fn: Callable[[], None], device: torch.device) -> float:
    """Wall time of fn: triton's do_bench median on CUDA; elsewhere (the CPU smoke run, which only keeps
    the code working) one run after a warm-up."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median") / 1e3
    fn()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_layer(cfg: LMConfig, mode: str, batch: int, seq_len: int, device: torch.device) -> dict:
    """Forward and forward+backward tokens/s of one mixer in `mode`."""
    cfg = replace(cfg, ttt=replace(cfg.ttt, mode=mode)).validate()
    torch.manual_seed(0)
    mixer = TTTMixer(cfg).to(device)
    x = torch.randn(batch, seq_len, cfg.hidden_size, device=device, requires_grad=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def forward() -> torch.Tensor:
        with autocast:
            return mixer(x)[0]

    def forward_only() -> None:
        with torch.no_grad():
            forward()

    def forward_backward() -> None:
        forward().float().sum().backward()

    tokens = batch * seq_len
    return {"fwd_tok_s": tokens / seconds(forward_only, device), "fwdbwd_tok_s": tokens / seconds(forward_backward, device)}


def run_ladder(smoke: bool, device: torch.device) -> list[dict]:
    batch, seq_len = (2, 40) if smoke else (TOKENS // SEQ_LEN, SEQ_LEN)
    rows = []
    for step in STEPS:
        cfg = ladder_config(step, smoke)
        row = {"step": step, "what": DESCRIPTIONS[step], "batch": batch, "seq_len": seq_len,
               "paper_recurrent_tok_s": PAPER_TPS[step][0], "paper_parallel_tok_s": PAPER_TPS[step][1],
               "paper_book3_ppl": PAPER_PPL[step]}  # fmt: skip
        for mode in modes_of(cfg):
            for key, value in time_layer(cfg, mode, batch, seq_len, device).items():
                row[f"{FORM_OF_MODE[mode]}_{key}"] = value
        print(summary_line(row), flush=True)
        rows.append(row)
    return rows


def millions(value: Optional[float]) -> str:
    return "-" if value is None else f"{value / 1e6:.2f}M"


def ratio(a: Optional[float], b: Optional[float]) -> str:
    return "-" if a is None or b is None else f"{a / b:.2f}x"


def summary_line(row: dict) -> str:
    return (f"{row['step']} {row['what']}: recurrent {millions(row.get('recurrent_fwdbwd_tok_s'))} -> parallel "
            f"{millions(row.get('parallel_fwdbwd_tok_s'))} tok/s fwd+bwd (paper {millions(row['paper_recurrent_tok_s'])} "
            f"-> {millions(row['paper_parallel_tok_s'])})")  # fmt: skip


def markdown(rows: list[dict], device_name: str) -> str:
    """The table docs/bench/ladder.md holds: ours (fwd and fwd+bwd), the paper's, and the ratios."""
    base = rows[0].get("recurrent_fwdbwd_tok_s")
    lines = [
        f"# Simplification ladder (arXiv 2602.21204, Table 2), one 760M mixer layer on {device_name}",
        "",
        f"`make bench-ladder` (`python -m benchmarks.ladder`): B = {rows[0]['batch']}, T = {rows[0]['seq_len']}, "
        "bf16 autocast, tokens/s of the forward and of forward + backward; the paper's GPU and shapes are not "
        "stated, so compare ratios.",
        "",
        "| step | what | ours recurrent fwd / fwd+bwd | ours parallel fwd / fwd+bwd | ours parallel / recurrent (fwd+bwd) "
        "| ours fwd+bwd vs V0 recurrent | paper recurrent -> parallel | paper parallel / recurrent | paper vs V0 "
        "| paper Book-3 ppl |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        rec, par = row.get("recurrent_fwdbwd_tok_s"), row.get("parallel_fwdbwd_tok_s")
        paper_rec, paper_par = row["paper_recurrent_tok_s"], row["paper_parallel_tok_s"]
        best, paper_best = par or rec, paper_par or paper_rec
        lines.append(
            f"| {row['step'].upper()} | {row['what']} "
            f"| {millions(row.get('recurrent_fwd_tok_s'))} / {millions(rec)} "
            f"| {millions(row.get('parallel_fwd_tok_s'))} / {millions(par)} | {ratio(par, rec)} | {ratio(best, base)} "
            f"| {millions(paper_rec)} -> {millions(paper_par)} | {ratio(paper_par, paper_rec)} "
            f"| {ratio(paper_best, PAPER_TPS['v0'][0])} | {row['paper_book3_ppl']} |"
        )  # fmt: skip
    return "\n".join(lines) + "\n"


def main(smoke: bool, out: Optional[str]) -> None:
    """Times the ladder and writes ladder.json and ladder.md to `out` (docs/bench on CUDA by default)."""
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    rows = run_ladder(smoke, device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke)"
    if out is None and device.type == "cuda":
        out = "docs/bench"
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "ladder.json").write_text(json.dumps({"device": device_name, "rows": rows}, indent=1) + "\n")
        (folder / "ladder.md").write_text(markdown(rows, device_name))
        print(f"wrote {folder / 'ladder.json'} and {folder / 'ladder.md'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a tiny width on the CPU")
    parser.add_argument("--out", default=None, help="folder for the results (default docs/bench on CUDA; --smoke: none)")
    arguments = parser.parse_args()
    main(arguments.smoke, arguments.out)
