"""The training loop: batches -> DeepSpeed engine -> metrics, checkpoints, preemption, resume.

Before anything is built, rank 0 takes the run directory's lock (train/supervision.py) and every
rank checks the data against its index and picks, with the others, the checkpoint to resume from;
the resolved config is written only once those checks passed and the checkpoint loaded.

One optimizer step is `train.grad_accum` micro-batches. After every step all ranks agree (one
all-reduce) on the mean loss and on whether any rank was asked to stop (SIGTERM/SIGINT); a stop
saves a checkpoint and returns. A step whose gradients are non-finite is skipped by the ZeRO
optimizer and counted; `train.max_nonfinite_steps` of them in a row end the run with
NonFiniteLossError, leaving the last good checkpoint as it was (no periodic checkpoint is written
while a streak of skipped steps is running).
"""

from __future__ import annotations

import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Optional

import numpy as np
import torch

from model.config import ConfigError
from train.checkpoint import complete_checkpoints, load_checkpoint, save_checkpoint, select_checkpoint
from train.cli import warn
from train.config import RunConfig, to_yaml
from train.config_changes import check_config_changes
from train.data import build_loader, check_dataset, endless, input_doc_ids, split_inputs_targets
from train.distributed import Layout, agree_on_failure, all_reduce_sum, init_distributed, shard_sequence
from train.engine import build_engine
from train.errors import RunError
from train.flops import peak_flops_per_device, training_flops_per_token
from train.monitor import LearningRateProbe, Monitor, perplexity, state_norms
from train.periodic_eval import PeriodicEvaluator
from train.schedule import realign_after_resume
from train.supervision import RunLock, acquire_run_lock

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class NonFiniteLossError(RunError):
    """Too many consecutive steps had non-finite loss or gradients."""


@dataclass
class RunResult:
    step: int  # the last completed step
    checkpoint: Optional[Path]  # the newest checkpoint this run wrote or resumed from
    preempted: bool  # stopped early by SIGTERM/SIGINT (after saving)


class StopRequest:
    """SIGTERM/SIGINT set a flag the loop polls between steps; a second signal interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.requested:
            raise KeyboardInterrupt(f"second signal {signal.Signals(signum).name}")
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def hold_run_dir(run_dir: Path, layout: Layout) -> Optional[RunLock]:
    """Rank 0 takes the run directory's lock; every rank stops if it is held by another job."""
    lock, failure = None, None
    if layout.is_main:
        try:
            lock = acquire_run_lock(run_dir)
        except RunError as error:
            failure = str(error)
    agree_on_failure(failure)
    return lock


def start_checks(cfg: RunConfig, layout: Layout) -> Optional[Path]:
    """Everything that can refuse the run before it builds anything; returns the checkpoint to resume from."""
    check_dataset(cfg, layout.dp)
    root = cfg.checkpoint_dir()
    if cfg.train.resume == "none" and complete_checkpoints(root):
        raise ConfigError(
            f"{root} already holds checkpoints of an earlier run; continue it with train.resume=auto, "
            f"or start afresh with another logging.run_dir (or checkpoint.dir)"
        )
    checkpoint = select_checkpoint(cfg.train.resume, root, layout)
    if checkpoint is not None:
        check_config_changes(cfg, checkpoint)
    return checkpoint


def resume(engine: Any, loader: Any, checkpoint: Path, layout: Layout, cfg: RunConfig, sequences_per_step: int) -> tuple[int, int]:
    """Load `checkpoint` on every rank; returns (step, non-finite steps skipped so far)."""
    client_state, rank_state = load_checkpoint(engine, checkpoint, layout)
    loader.load_state_dict(rank_state["loader"])
    step, skipped = client_state["step"], client_state["nonfinite_skipped"]
    realign_after_resume(engine.lr_scheduler, cfg.train.lr)
    written_sequences = client_state.get("sequences_per_step", sequences_per_step)  # absent in older checkpoints
    if written_sequences != sequences_per_step:
        warn(
            f"train.resume: {checkpoint} was trained on {written_sequences} sequences per step, this run "
            f"reads {sequences_per_step} (train.micro_batch_size x train.grad_accum x dp); to keep the batch, set "
            f"train.micro_batch_size x train.grad_accum = {written_sequences / layout.dp:g}"
        )
    if layout.is_main:
        print(f"resumed from {checkpoint} at step {step}", flush=True)
        if step >= cfg.train.steps:
            print(f"train.steps={cfg.train.steps} is reached already; raise train.steps to train further", flush=True)
    return step, skipped


def train(cfg: RunConfig) -> RunResult:
    """Train on every rank of the launched world; holds the run directory's lock throughout."""
    layout = init_distributed(cfg.parallel.sp)
    cfg.resolve_layout(layout.world)
    lock = hold_run_dir(Path(cfg.logging.run_dir), layout)
    try:
        return train_holding_lock(cfg, layout)
    finally:
        if lock is not None:
            lock.release()


def train_holding_lock(cfg: RunConfig, layout: Layout) -> RunResult:
    checkpoint = start_checks(cfg, layout)
    config_yaml = to_yaml(cfg)
    run_dir = Path(cfg.logging.run_dir)
    t = cfg.train
    root = cfg.checkpoint_dir()
    seed_everything(t.seed)
    engine, lm = build_engine(cfg, layout)
    loader = build_loader(cfg.data, cfg.data.train_split, t.micro_batch_size, layout.sp, cfg.data.shuffle)
    step = skipped = 0
    sequences_per_step = t.micro_batch_size * t.grad_accum * layout.dp
    if checkpoint is not None:
        step, skipped = resume(engine, loader, checkpoint, layout, cfg, sequences_per_step)
    if layout.is_main:
        (run_dir / "config.yaml").write_text(config_yaml)
    monitor = Monitor(run_dir, layout.is_main, cfg.logging.tensorboard, t.steps, config_yaml, step)
    probe = LearningRateProbe(lm)
    fast = ("w0", "w1", "w2") if cfg.model.ttt.fast_weights == "all" else ("w1",)
    flops_per_token = training_flops_per_token(cfg.model, cfg.data.seq_len)
    peak_flops = peak_flops_per_device(cfg.logging.peak_tflops, layout.device)
    tokens_per_step = sequences_per_step * cfg.data.seq_len
    batches = endless(loader)
    evaluator = PeriodicEvaluator(cfg, layout, engine.module, monitor.writer, run_dir / "eval")
    stop = StopRequest()
    streak = 0
    preempted = False

    def save(at_step: int) -> Path:
        started = time.perf_counter()
        folder = save_checkpoint(
            engine, root, at_step, layout,
            {"step": at_step, "nonfinite_skipped": skipped, "sequences_per_step": sequences_per_step},
            {"loader": loader.state_dict()}, config_yaml, cfg.checkpoint.keep_last,
        )  # fmt: skip
        monitor.pause(time.perf_counter() - started)
        if layout.is_main:
            print(f"saved {folder}", flush=True)
        return folder

    try:
        while step < t.steps:
            step += 1
            log_now = step % cfg.logging.log_every == 0 or step == t.steps
            probe.active = log_now
            lr = engine.get_lr()[0]
            step_loss = torch.zeros((), dtype=torch.float64, device=layout.device)
            norms: dict[str, float] = {}
            for micro in range(t.grad_accum):
                batch = next(batches)
                input_ids, targets = split_inputs_targets(batch["tokens"].to(layout.device, non_blocking=True))
                doc_ids = input_doc_ids(batch, cfg.data, layout.device)
                output = engine(
                    shard_sequence(input_ids, layout), shard_sequence(targets, layout), return_logits=False, doc_ids=doc_ids
                )
                loss = output.loss
                if step in cfg.debug.nonfinite_loss_steps:
                    loss = loss * float("nan")
                engine.backward(loss)
                engine.step()
                step_loss += loss.detach().double()
                if log_now and micro == t.grad_accum - 1:
                    with torch.no_grad():
                        norms = state_norms(output.states, fast)
                del output, loss
            applied = engine.was_step_applied()
            streak = 0 if applied else streak + 1
            skipped += 0 if applied else 1
            if cfg.debug.signal_at_step == step:
                os.kill(os.getpid(), signal.SIGTERM)
            loss_total, stop_votes = all_reduce_sum([step_loss.item() / t.grad_accum, float(stop.requested)], layout.device)
            mean_loss = loss_total / layout.world
            grad_norm = engine.get_global_grad_norm()
            grad_norm = float("nan") if grad_norm is None else float(grad_norm)
            monitor.count_step(tokens_per_step)
            monitor.record_step(step, {"loss": mean_loss, "lr": lr, "grad_norm": grad_norm, "applied": applied})
            if not applied and layout.is_main:
                print(f"step {step}: non-finite loss or gradients, update skipped ({streak} in a row)", flush=True)
            if log_now:
                scalars = {
                    "train/loss": mean_loss,
                    "train/perplexity": perplexity(mean_loss),
                    "train/lr": lr,
                    "train/grad_norm": grad_norm,
                    "train/skipped_steps": float(skipped),
                    "train/tokens": float(step * tokens_per_step),
                    **norms,
                    **probe.scalars(),
                }
                monitor.report(step, scalars, flops_per_token, peak_flops, layout.world)
            if evaluator.due(step):
                evaluator.run(step)
            if streak >= t.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{streak} consecutive steps (up to step {step}) had non-finite loss or gradients "
                    f"(train.max_nonfinite_steps={t.max_nonfinite_steps}); the last good checkpoint is "
                    f"{checkpoint or 'none'}. Lower train.lr or raise train.warmup_steps, check the data, "
                    f"then resume with train.resume=auto"
                )
            preempted = stop_votes > 0
            periodic = streak == 0 and (step % cfg.checkpoint.every == 0 or step == t.steps)
            if preempted or periodic:
                checkpoint = save(step)
            if preempted:
                if layout.is_main:
                    print(f"stopped by signal after step {step}; resume with train.resume=auto", flush=True)
                break
    finally:
        stop.restore()
        probe.active = False
        monitor.close()
    return RunResult(step, checkpoint, preempted)
