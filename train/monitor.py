"""What a run reports: TensorBoard scalars, a metrics.jsonl line per step, a progress line.

Rank 0 writes; every rank runs the TTT probes so the collectives stay symmetric. The probes read
what the model computes: each mixer's mean per-token learning rates of its last forward (a buffer it
writes while the probe is attached), and the fast-weight states that LMOutput returns give the
per-layer state norms.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import torch

from kernels.fast_weights import FastWeights
from model.lm import TTTLM

ETA_NAMES = ("eta0", "eta1", "eta2")


class LearningRateProbe:
    """Mean per-token TTT learning rates per layer: each mixer writes those of its last forward into
    its `mean_learning_rates` buffer while the probe is attached, and `scalars` reads them (on logging
    steps only: reading waits for the GPU). Nothing per layer runs in Python inside a compiled block."""

    def __init__(self, model: TTTLM) -> None:
        self.mixers = [block.mixer for block in model.blocks]
        for mixer in self.mixers:
            mixer.records_learning_rates = True

    def scalars(self) -> dict[str, float]:
        return {
            f"ttt_lr/{name}/layer{layer:02d}": value
            for layer, mixer in enumerate(self.mixers)
            for name, value in zip(ETA_NAMES, mixer.mean_learning_rates.float().tolist())
        }

    def detach(self) -> None:
        """Stop recording (the mixers skip the reduction again)."""
        for mixer in self.mixers:
            mixer.records_learning_rates = False


def state_norms(states: list[FastWeights], names: tuple[str, ...]) -> dict[str, float]:
    """Frobenius norm of each fast weight named in `names` (w0, w1, ...) per layer, averaged over batch and heads."""
    return {
        f"ttt_state_norm/{name}/layer{index:02d}": torch.linalg.vector_norm(getattr(state, name).float(), dim=(-2, -1)).mean().item()
        for index, state in enumerate(states)
        for name in names
    }


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the records of steps <= last_step (a resumed run logs the later ones again); drops a torn last line."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    staging = path.with_name(path.name + ".partial")
    staging.write_text("".join(kept))
    staging.replace(path)


class Monitor:
    """Rank 0's outputs; on other ranks every method is a no-op except timing bookkeeping.

    A run that starts at `start_step` (0, or the step it resumed from) first drops what an earlier
    run logged after that step, from metrics.jsonl and (with `purge_step`) from TensorBoard, so that
    each step is logged once however often the run was resumed.
    """

    def __init__(
        self, run_dir: Path, enabled: bool, tensorboard: bool, total_steps: int, config_yaml: str, start_step: int = 0
    ) -> None:
        self.enabled, self.total_steps = enabled, total_steps
        self.writer = None
        self.metrics = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            truncate_metrics(run_dir / "metrics.jsonl", start_step)
            self.metrics = open(run_dir / "metrics.jsonl", "a")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
                self.writer.add_text("config", "```\n" + config_yaml + "\n```", start_step)
        self.window_start = time.perf_counter()
        self.window_tokens = self.window_steps = 0

    def record_step(self, step: int, values: dict[str, Optional[float]]) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps({"step": step, **values}) + "\n")
            self.metrics.flush()

    def count_step(self, tokens: int) -> None:
        self.window_tokens += tokens
        self.window_steps += 1

    def pause(self, seconds: float) -> None:
        """Exclude time spent outside training (checkpointing) from the throughput window."""
        self.window_start += seconds

    def report(self, step: int, scalars: dict[str, float], flops_per_token: float, peak_flops: Optional[float], world: int) -> None:
        """TensorBoard scalars and one progress line for the steps since the last report."""
        elapsed = time.perf_counter() - self.window_start
        tokens_per_second = self.window_tokens / max(elapsed, 1e-9)
        seconds_per_step = elapsed / max(1, self.window_steps)
        self.window_start, self.window_tokens, self.window_steps = time.perf_counter(), 0, 0
        if not self.enabled:
            return
        scalars = {**scalars, "throughput/tokens_per_s": tokens_per_second}
        if peak_flops is not None:
            scalars["throughput/mfu"] = flops_per_token * tokens_per_second / (peak_flops * world)
        if torch.cuda.is_available():
            scalars["memory/max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
            scalars["memory/max_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
            self.writer.flush()
        line = (
            f"step {step}/{self.total_steps} | loss {scalars['train/loss']:.4f} | lr {scalars['train/lr']:.2e} "
            f"| gnorm {scalars['train/grad_norm']:.3f} | {tokens_per_second / 1e3:.1f}k tok/s"
        )
        if "throughput/mfu" in scalars:
            line += f" | mfu {100 * scalars['throughput/mfu']:.1f}%"
        if scalars.get("train/skipped_steps", 0):
            line += f" | skipped {int(scalars['train/skipped_steps'])}"
        print(line + f" | eta {format_duration(seconds_per_step * (self.total_steps - step))}", flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.metrics is not None:
            self.metrics.close()


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0)) if math.isfinite(loss) else float("nan")
