"""Perplexity by position on the held-out split every `eval.every` steps of training.

Every rank takes part, because the forward pass is collective (ZeRO-3 gathers parameters inside it,
sequence parallelism exchanges fast-weight states): each data-parallel rank scores its own
`eval.batches` micro-batches of `data.val_split` through the model it trains, the sp ranks of a
sequence gather their per-position losses, and one all-reduce combines the ranks. Rank 0 writes
`<run_dir>/eval/ppl_by_position_step<N>.json|png`, the figure to TensorBoard, and the scalars
`eval/loss` and `eval/ppl`.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from parallel.groups import ParallelDims, gather_sequence, slice_sequence
from train.config import RunConfig
from train.data.loader import build_loader, input_doc_ids, split_inputs_targets
from train.evaluation.eval import (
    accumulate_position_losses,
    per_token_cross_entropy,
    plot_perplexity_by_position,
    publish,
    summarize_position_losses,
)


class PeriodicEvaluator:
    def __init__(
        self, cfg: RunConfig, dims: ParallelDims, model: nn.Module, writer: Optional[SummaryWriter], out_dir: Path
    ) -> None:
        self.cfg = cfg
        self.dims = dims
        self.model = model  # what the engine runs: the LM, or its sequence-parallel wrapper
        self.writer = writer
        self.out_dir = out_dir
        self.loader = None
        if cfg.eval.every > 0:
            self.loader = build_loader(cfg.data, cfg.data.val_split, cfg.train.micro_batch_size, dims.sp, shuffle=False)

    def due(self, step: int) -> bool:
        every = self.cfg.eval.every
        return every > 0 and (step % every == 0 or step == self.cfg.train.steps)

    @torch.no_grad()
    def run(self, step: int) -> dict:
        """Evaluate, publish on rank 0, and return the bucketed result (the same on every rank)."""
        dims = self.dims
        was_training = self.model.training
        self.model.eval()

        def losses_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            input_ids, targets = split_inputs_targets(batch["tokens"].to(dims.device))
            doc_ids = input_doc_ids(batch, self.cfg.data, dims.device)
            logits = self.model(slice_sequence(input_ids, dims), None, return_logits=True, doc_ids=doc_ids).logits
            return gather_sequence(per_token_cross_entropy(logits, slice_sequence(targets, dims)), dims)

        batches = islice(iter(self.loader), self.cfg.eval.batches)
        loss_sums, count = accumulate_position_losses(losses_of, batches)
        self.model.train(was_training)
        totals = torch.cat([loss_sums, torch.tensor([float(count)], dtype=loss_sums.dtype, device=loss_sums.device)])
        if dist.is_initialized():
            dist.all_reduce(totals)
            totals /= dims.sp  # the sp ranks of one sequence all hold its gathered losses
        result = summarize_position_losses(totals[:-1], round(totals[-1].item()), self.cfg.eval.bucket_size)
        if dims.is_main:
            figure = plot_perplexity_by_position({f"step {step}": result}, train_len=self.cfg.data.seq_len)
            publish(figure, result, f"ppl_by_position_step{step:08d}", self.out_dir, self.writer, step)
            if self.writer is not None:
                self.writer.add_scalar("eval/loss", result["loss"], step)
                self.writer.add_scalar("eval/ppl", result["ppl"], step)
            print(f"eval step {step} | loss {result['loss']:.4f} | ppl {result['ppl']:.3f} | {result['tokens']} tokens", flush=True)
        return result
