"""One training step under torch.profiler (`logging.profile_step`): where the trainer's time goes.

The model benchmark (`benchmarks.step`) times the model alone; a run also pays for what is around
it (the DeepSpeed engine, gradient accumulation, the loader, logging). Profiling one real step of
the run, after compilation and warm-up, shows that difference kernel by kernel. Rank 0 writes
`<run_dir>/profile/step_<N>.json` (a Chrome trace: chrome://tracing or Perfetto) and `step_<N>.txt`
(ops by device time, then by host time); every rank runs the profiler so the step stays in lockstep.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
from torch.profiler import ProfilerActivity, profile

from parallel.groups import ParallelDims
from train.config import LoggingConfig

TABLE_ROWS = 40


@contextlib.contextmanager
def profiled_step(logging: LoggingConfig, dims: ParallelDims, step: int) -> Iterator[None]:
    """Profile the body when `step` is `logging.profile_step`; otherwise do nothing."""
    if step != logging.profile_step:
        yield
        return
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dims.device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=False) as prof:
        yield
        if dims.device.type == "cuda":
            torch.cuda.synchronize(dims.device)
    if dims.is_main:
        write_profile(prof, Path(logging.run_dir) / "profile", step, dims.device.type == "cuda")


def write_profile(prof: profile, folder: Path, step: int, on_gpu: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(folder / f"step_{step:08d}.json"))
    averages = prof.key_averages()
    tables = [averages.table(sort_by="self_cpu_time_total", row_limit=TABLE_ROWS)]
    if on_gpu:
        tables.insert(0, averages.table(sort_by="self_device_time_total", row_limit=TABLE_ROWS))
    (folder / f"step_{step:08d}.txt").write_text("\n\n".join(tables) + "\n")
    print(f"profiled step {step}: {folder / f'step_{step:08d}.txt'}", flush=True)
