"""The training loop: batches -> DeepSpeed engine -> metrics, checkpoints, preemption, resume.

Before anything is built, rank 0 takes the run directory's lock (train/job/supervision.py) and every
rank checks the data against its index and picks, with the others, the checkpoint to resume from;
the resolved config is written only once those checks passed and the checkpoint loaded.

    resume()       the engine and the TrainState (train/state.py) continue from a checkpoint
    train_step()   one optimizer step of `train.grad_accum` micro-batches, agreed over the ranks
    after_step()   metrics and progress, periodic evaluation, the non-finite check, checkpoints

After every step all ranks agree (one all-reduce) on the mean loss and on whether any rank was
asked to stop (SIGTERM/SIGINT); a stop saves a checkpoint and returns, with the signal in the result
(the command line exits with 128 + its number). A step whose gradients are
non-finite is skipped by the ZeRO optimizer and counted; `train.max_nonfinite_steps` of them in a
row end the run with NonFiniteLossError, leaving the last good checkpoint as it was (no periodic
checkpoint is written while a streak of skipped steps is running).
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

from kernels.fast_weights import FAST_WEIGHT_NAMES
from model.config import ConfigError
from model.lm import TTTLM
from parallel.groups import ParallelDims, slice_sequence
from train.checkpoint import complete_checkpoints, load_checkpoint, save_checkpoint, select_checkpoint
from train.config import RunConfig, to_yaml
from train.config_changes import check_config_changes
from train.data.loader import build_loader, check_dataset, endless, input_doc_ids, split_inputs_targets
from train.distributed import agree_on_failure, all_gather_objects, all_reduce_sum, init_distributed
from train.engine import build_engine
from train.flops import peak_flops_per_device, training_flops_per_token
from train.job.cli import warn
from train.job.errors import RunError
from train.job.supervision import RunLock, acquire_run_lock
from train.monitor import LearningRateProbe, Monitor, perplexity, state_norms
from train.periodic_eval import PeriodicEvaluator
from train.schedule import realign_after_resume
from train.state import TrainState
from train.step_profile import profiled_step

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# A stop signal this soon after the first is the same request delivered twice (see StopRequest).
REPEAT_WINDOW_S = 5.0


class NonFiniteLossError(RunError):
    """Too many consecutive steps had non-finite loss or gradients."""


@dataclass
class RunResult:
    step: int  # the last completed step
    checkpoint: Optional[Path]  # the newest checkpoint this run wrote or resumed from
    preempted: bool  # stopped early by SIGTERM/SIGINT (after saving)
    stop_signal: Optional[int] = None  # the signal that stopped it (the lowest rank's that received one)


@dataclass
class StepResult:
    """One optimizer step as every rank agreed on it."""

    loss: float  # mean over the ranks of each rank's mean over its micro-batches
    lr: float  # the learning rate the step ran with
    grad_norm: float  # the global gradient norm (nan when the engine reports none)
    applied: bool  # False: non-finite loss or gradients, the optimizer skipped the update
    stop_requested: bool  # some rank was sent SIGTERM/SIGINT
    state_norms: dict[str, float]  # fast-weight norms of the last micro-batch (logging steps only)


class StopRequest:
    """SIGTERM/SIGINT set a flag the loop polls between steps; a signal well after the first interrupts at once.

    One request often reaches a worker twice: stopping the whole job (`kill` of its process group,
    systemd, a scheduler's cancel) signals the launcher and the workers at once, and the launcher
    forwards the signal to its workers again. A stop signal within `repeat_window_s` of the first is
    that same request and counts once; a later one raises KeyboardInterrupt.
    """

    def __init__(self, repeat_window_s: float = REPEAT_WINDOW_S) -> None:
        self.signum: Optional[int] = None  # the first stop signal received
        self.received_at = 0.0
        self.repeat_window_s = repeat_window_s
        self.previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self.received_at = signum, now
        elif now - self.received_at > self.repeat_window_s:
            raise KeyboardInterrupt(f"second signal {signal.Signals(signum).name}")

    def agreed_signal(self) -> int:
        """The stop signal of the lowest rank that received one, the same on every rank: one collective."""
        received = [signum for signum in all_gather_objects(self.signum) if signum is not None]
        return received[0] if received else signal.SIGTERM

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def hold_run_dir(run_dir: Path, dims: ParallelDims) -> Optional[RunLock]:
    """Rank 0 takes the run directory's lock; every rank stops if it is held by another job."""
    lock, failure = None, None
    if dims.is_main:
        try:
            lock = acquire_run_lock(run_dir)
        except RunError as error:
            failure = str(error)
    agree_on_failure(failure)
    return lock


def start_checks(cfg: RunConfig, dims: ParallelDims) -> Optional[Path]:
    """Everything that can refuse the run before it builds anything; returns the checkpoint to resume from."""
    check_dataset(cfg, dims.dp)
    root = cfg.checkpoint_dir()
    if cfg.train.resume == "none" and complete_checkpoints(root):
        raise ConfigError(
            f"{root} already holds checkpoints of an earlier run; continue it with train.resume=auto, "
            f"or start afresh with another logging.run_dir (or checkpoint.dir)"
        )
    checkpoint = select_checkpoint(cfg.train.resume, root, dims)
    if checkpoint is not None:
        check_config_changes(cfg, checkpoint)
    return checkpoint


def resume(engine: Any, state: TrainState, checkpoint: Path, cfg: RunConfig, dims: ParallelDims) -> None:
    """Load `checkpoint` into the engine and `state` on every rank."""
    written, rank_written = load_checkpoint(engine, checkpoint, dims)
    state.load_state_dict(written, rank_written)
    realign_after_resume(engine.lr_scheduler, cfg.train.lr)
    written_sequences = written.get("sequences_per_step", state.sequences_per_step)  # absent in older checkpoints
    if written_sequences != state.sequences_per_step:
        warn(
            f"train.resume: {checkpoint} was trained on {written_sequences} sequences per step, this run "
            f"reads {state.sequences_per_step} (train.micro_batch_size x train.grad_accum x dp); to keep the batch, "
            f"set train.micro_batch_size x train.grad_accum = {written_sequences / dims.dp:g}"
        )
    if dims.is_main:
        print(f"resumed from {checkpoint} at step {state.step}", flush=True)
        if state.step >= cfg.train.steps:
            print(f"train.steps={cfg.train.steps} is reached already; raise train.steps to train further", flush=True)


def train(cfg: RunConfig) -> RunResult:
    """Train on every rank of the launched world; holds the run directory's lock throughout."""
    dims = init_distributed(cfg.parallel.sp)
    cfg.resolve_layout(dims)
    lock = hold_run_dir(Path(cfg.logging.run_dir), dims)
    try:
        return train_holding_lock(cfg, dims)
    finally:
        if lock is not None:
            lock.release()


def train_holding_lock(cfg: RunConfig, dims: ParallelDims) -> RunResult:
    """Check, build, resume, then step until `train.steps` or a stop signal."""
    checkpoint = start_checks(cfg, dims)
    config_yaml = to_yaml(cfg)
    t = cfg.train
    seed_everything(t.seed)
    engine, lm = build_engine(cfg, dims)
    loader = build_loader(cfg.data, cfg.data.train_split, t.micro_batch_size, dims.sp, cfg.data.shuffle)
    state = TrainState(loader, sequences_per_step=t.micro_batch_size * t.grad_accum * dims.dp)
    if checkpoint is not None:
        resume(engine, state, checkpoint, cfg, dims)
    if dims.is_main:
        (Path(cfg.logging.run_dir) / "config.yaml").write_text(config_yaml)
    trainer = Trainer(cfg, dims, engine, lm, state, config_yaml, checkpoint)
    try:
        while state.step < t.steps and not trainer.preempted:
            with profiled_step(cfg.logging, dims, state.step + 1):
                result = trainer.train_step()
            trainer.after_step(result)
    finally:
        trainer.close()
    return RunResult(state.step, trainer.checkpoint, trainer.preempted, trainer.stop_signal)


class Trainer:
    """The steps of one run on this rank: the engine, its TrainState, and what reports on them."""

    def __init__(
        self, cfg: RunConfig, dims: ParallelDims, engine: Any, lm: TTTLM, state: TrainState, config_yaml: str,
        checkpoint: Optional[Path],
    ) -> None:  # fmt: skip
        run_dir = Path(cfg.logging.run_dir)
        self.cfg, self.dims, self.engine, self.state, self.config_yaml = cfg, dims, engine, state, config_yaml
        self.checkpoint = checkpoint  # the newest checkpoint written or resumed from
        self.preempted = False
        self.stop_signal: Optional[int] = None  # set with `preempted`
        self.monitor = Monitor(run_dir, dims.is_main, cfg.logging.tensorboard, cfg.train.steps, config_yaml, state.step)
        self.probe = LearningRateProbe(lm)
        self.fast_weights = FAST_WEIGHT_NAMES[cfg.model.ttt.fast_weights]
        self.flops_per_token = training_flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak_flops = peak_flops_per_device(cfg.logging.peak_tflops, dims.device)
        self.tokens_per_step = state.sequences_per_step * cfg.data.seq_len
        self.batches = endless(state.loader)
        self.evaluator = PeriodicEvaluator(cfg, dims, engine.module, self.monitor.writer, run_dir / "eval")
        self.stop = StopRequest()

    def logging_due(self, step: int) -> bool:
        return step % self.cfg.logging.log_every == 0 or step == self.cfg.train.steps

    def train_step(self) -> StepResult:
        """One optimizer step: forward and backward of each micro-batch, then one all-reduce over the ranks."""
        cfg, state, engine = self.cfg, self.state, self.engine
        state.step += 1
        log_now = self.logging_due(state.step)
        lr = engine.get_lr()[0]
        step_loss = torch.zeros((), dtype=torch.float64, device=self.dims.device)
        norms: dict[str, float] = {}
        for micro in range(cfg.train.grad_accum):
            loss, micro_norms = self.micro_step(measure_state_norms=log_now and micro == cfg.train.grad_accum - 1)
            step_loss += loss
            norms.update(micro_norms)
        applied = engine.was_step_applied()
        state.nonfinite_streak = 0 if applied else state.nonfinite_streak + 1
        state.nonfinite_skipped += 0 if applied else 1
        if cfg.debug.signal_at_step == state.step:
            os.kill(os.getpid(), signal.SIGTERM)
        loss_total, stop_votes = all_reduce_sum(
            [step_loss.item() / cfg.train.grad_accum, float(self.stop.requested)], self.dims.device
        )
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float("nan") if grad_norm is None else float(grad_norm)
        return StepResult(loss_total / self.dims.world, lr, grad_norm, applied, stop_votes > 0, norms)

    def micro_step(self, measure_state_norms: bool) -> tuple[torch.Tensor, dict[str, float]]:
        """Forward and backward of the next micro-batch: (its loss, fp64 and detached; fast-weight norms if asked)."""
        device = self.dims.device
        batch = next(self.batches)
        input_ids, targets = split_inputs_targets(batch["tokens"].to(device, non_blocking=True))
        doc_ids = input_doc_ids(batch, self.cfg.data, device)
        input_ids, targets = slice_sequence(input_ids, self.dims), slice_sequence(targets, self.dims)  # [B, T/sp]
        output = self.engine(input_ids, targets, return_logits=False, doc_ids=doc_ids)
        loss = output.loss
        if self.state.step in self.cfg.debug.nonfinite_loss_steps:
            loss = loss * float("nan")
        self.engine.backward(loss)
        self.engine.step()
        norms: dict[str, float] = {}
        if measure_state_norms:
            with torch.no_grad():
                norms = state_norms(output.states, self.fast_weights)
        return loss.detach().double(), norms

    def after_step(self, result: StepResult) -> None:
        """Metrics and progress, periodic evaluation, the non-finite check, and the checkpoint that is due."""
        step = self.state.step
        self.record(result)
        if self.evaluator.due(step):
            self.evaluator.run(step)
        self.check_nonfinite_streak()
        self.preempted = result.stop_requested
        if self.preempted:
            self.stop_signal = self.stop.agreed_signal()
        due = step % self.cfg.checkpoint.every == 0 or step == self.cfg.train.steps
        if self.preempted or (due and self.state.nonfinite_streak == 0):
            self.checkpoint = self.save()
        if self.preempted and self.dims.is_main:
            name = signal.Signals(self.stop_signal).name
            print(f"stopped by {name} after step {step}; resume with train.resume=auto", flush=True)

    def record(self, result: StepResult) -> None:
        """metrics.jsonl every step; TensorBoard scalars and a progress line on logging steps."""
        state = self.state
        self.monitor.count_step(self.tokens_per_step)
        self.monitor.record_step(
            state.step, {"loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm, "applied": result.applied}
        )
        if not result.applied and self.dims.is_main:
            print(
                f"step {state.step}: non-finite loss or gradients, update skipped ({state.nonfinite_streak} in a row)",
                flush=True,
            )
        if not self.logging_due(state.step):
            return
        scalars = {
            "train/loss": result.loss,
            "train/perplexity": perplexity(result.loss),
            "train/lr": result.lr,
            "train/grad_norm": result.grad_norm,
            "train/skipped_steps": float(state.nonfinite_skipped),
            "train/tokens": float(state.step * self.tokens_per_step),
            **result.state_norms,
            **self.probe.scalars(),
        }
        self.monitor.report(state.step, scalars, self.flops_per_token, self.peak_flops, self.dims.world)

    def check_nonfinite_streak(self) -> None:
        streak, limit = self.state.nonfinite_streak, self.cfg.train.max_nonfinite_steps
        if streak >= limit:
            raise NonFiniteLossError(
                f"{streak} consecutive steps (up to step {self.state.step}) had non-finite loss or gradients "
                f"(train.max_nonfinite_steps={limit}); the last good checkpoint is {self.checkpoint or 'none'}. "
                f"Lower train.lr or raise train.warmup_steps, check the data, then resume with train.resume=auto"
            )

    def save(self) -> Path:
        """A checkpoint of the engine and the TrainState at the current step; its time is kept out of the throughput."""
        started = time.perf_counter()
        folder = save_checkpoint(
            self.engine, self.cfg.checkpoint_dir(), self.state.step, self.dims, self.state.state_dict(),
            self.state.rank_state_dict(), self.config_yaml, self.cfg.checkpoint.keep_last,
        )  # fmt: skip
        self.monitor.pause(time.perf_counter() - started)
        if self.dims.is_main:
            print(f"saved {folder}", flush=True)
        return folder

    def close(self) -> None:
        self.stop.restore()
        self.probe.detach()
        self.monitor.close()
