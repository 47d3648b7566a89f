"""DeepSpeed ZeRO-2 over two gloo processes with parallel.sp=2 trains step for step like one process.

`torchrun --nproc_per_node=2 -m tests.test_parallel_deepspeed OUT.json` runs the split training
(ZeRO-2, float32, each rank holding half of every sequence, T/sp not a multiple of the chunk) and,
on rank 0, the plain single-process training of the same model on the whole sequences, and writes
both loss curves. SGD with momentum and gradient clipping, not Adam: Adam's update is invariant to
the gradient's scale (a wrong loss scaling would pass) and turns float32 noise in near-zero
gradients into full-size steps of either sign. The two runs differ only in float32 summation order
(split scans, the loss sum over ranks, the gradient all-reduce), about 1e-7 relative per step, so
2e-6 relative per step is the bound; a wrong scale or a missing state term is orders larger.

Both ranks end in order (tests/multiprocess.py `end_distributed`): once, rank 1 left while rank 0
still computed and aborted at interpreter exit with a gloo thread still holding a collective's
tensors.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from model.config import LMConfig, TTTConfig
from model.lm import TTTLM
from tests.multiprocess import end_distributed, run_torchrun

STEPS = 4
LR = 0.5
CLIP = 1.0
TOLERANCE = 2e-6


def tiny_model() -> TTTLM:
    torch.manual_seed(0)
    cfg = LMConfig(
        vocab_size=64, hidden_size=32, num_layers=2, num_attn_heads=2, window_size=12,
        ttt=TTTConfig(num_heads=2, chunk_size=16, momentum=True),
    )  # fmt: skip
    return TTTLM(cfg)


def batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (2, 75), generator=gen) for _ in range(STEPS)]  # T = 74: slices of 37 straddle a chunk


def single_process_losses() -> list[float]:
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    losses = []
    for tokens in batches():
        loss = model(tokens[:, :-1], tokens[:, 1:], return_logits=False).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        losses.append(loss.item())
    return losses


def split_losses() -> list[float]:
    import deepspeed

    from parallel.groups import ParallelDims, slice_sequence
    from parallel.sequence_parallel import SequenceParallelLM
    from train.distributed import skip_deepspeed_shm_allreduce

    skip_deepspeed_shm_allreduce()
    deepspeed.init_distributed(dist_backend="gloo")
    dims = ParallelDims.build(2)
    model = SequenceParallelLM(tiny_model(), dims)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "train_batch_size": 2 * dims.world,
        "zero_optimization": {"stage": 2, "contiguous_gradients": True, "overlap_comm": False},
        "gradient_clipping": CLIP,  # clipping reads the global gradient norm: its scale is checked too
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    losses = []
    for tokens in batches():
        inputs, targets = (slice_sequence(t, dims) for t in (tokens[:, :-1], tokens[:, 1:]))
        out = engine(inputs, targets, return_logits=False)
        engine.backward(out.loss)
        engine.step()
        losses.append(out.reported_loss.item())
    engine.destroy()
    return losses


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_zero2_sp2_matches_single_process_step_by_step(tmp_path):
    result = tmp_path / "losses.json"
    run_torchrun(["-m", "tests.test_parallel_deepspeed", str(result)], processes=2, timeout=280)
    losses = json.loads(result.read_text())
    for split, single in zip(losses["split"], losses["single"], strict=True):
        assert abs(split - single) / single < TOLERANCE, losses


if __name__ == "__main__":
    split = split_losses()
    if int(os.environ["RANK"]) == 0:
        Path(sys.argv[1]).write_text(json.dumps({"split": split, "single": single_process_losses()}))
    end_distributed()  # rank 1 waits for rank 0 here instead of exiting under its feet
