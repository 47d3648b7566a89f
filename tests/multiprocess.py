"""Launching the real multi-process jobs the CPU suite checks: torchrun with gloo workers on this host."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker_environment() -> dict[str, str]:
    """This environment with DeepSpeed on the CPU, one thread per worker, and the repository importable."""
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def run_torchrun(target: list[str], processes: int, timeout: int) -> str:
    """`torchrun --standalone --nproc_per_node=N TARGET...` from the repository root, with DeepSpeed on
    the CPU and one thread per worker; fails the test with the workers' output unless every worker
    exits cleanly. Returns their stdout."""
    env = worker_environment()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *target]
    finished = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert finished.returncode == 0, finished.stdout[-4000:] + finished.stderr[-8000:]
    return finished.stdout


def small_corpus(folder: Path, seq_len: int, val_fraction: float) -> Path:
    """The first 20 standard-library files, byte-tokenised and packed to seq_len: seconds to build."""
    from train.data.prepare import prepare, stdlib_files
    from train.data.tokenizer import ByteTokenizer

    prepare(stdlib_files()[:20], folder, seq_len, ByteTokenizer(), val_fraction=val_fraction, show_progress=False)
    return folder


def long_run_overrides(data: Path, run_dir: Path) -> list[str]:
    """A tiny model on `data` (seq_len 64) that trains until it is stopped, quietly, without checkpoints."""
    return [
        f"data.path={data}", "data.seq_len=64", "train.micro_batch_size=2", "train.steps=100000",
        "logging.log_every=1000", "logging.tensorboard=false", "eval.every=0", "checkpoint.every=100000",
        f"logging.run_dir={run_dir}", "model.hidden_size=64", "model.num_attn_heads=2", "model.window_size=16",
        "model.ttt.chunk_size=16",
    ]  # fmt: skip


def wait_until_training(run_dir: Path, launcher: subprocess.Popen, timeout: float = 120.0) -> None:
    """Until the job has logged its first step; fails if the launcher ends or the time runs out first."""
    deadline = time.monotonic() + timeout
    while not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "metrics.jsonl").read_text():
        assert launcher.poll() is None and time.monotonic() < deadline, "the job did not start training"
        time.sleep(0.5)


def end_distributed(*engines: object) -> None:
    """A torchrun worker script's last act: end its part of the job in order, while the interpreter is whole.

    Left to interpreter exit, a gloo worker thread may still hold the last reference to a finished
    collective's tensors while Python tears itself down, and the process aborts now and then
    ("terminate called without an active exception", SIGABRT) after its work is done. So: each
    DeepSpeed engine lets go of its hooks and buffers, garbage is collected, every rank reaches the
    same point (none is still in a collective with another), and destroying the process group joins
    gloo's threads.
    """
    import gc

    import torch.distributed as dist

    for engine in engines:
        engine.destroy()
    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
