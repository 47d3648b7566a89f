"""Sequence parallelism computes the single-process function: outputs, losses, states and gradients.

Every case builds one tiny float64 model, runs it once on the whole batch in one process (the
reference) and once split over `sp` ranks (and `dp` groups) through `SequenceParallelLM` with gloo,
with gradients averaged over all ranks as DeepSpeed does. Reference and split run differ only in
the order of floating-point sums, so logits, final fast-weight states and parameter gradients agree
to ~1e-14; 1e-10 leaves four orders of margin and still catches any missing term (an O(1) error).
The loss is computed by the LM in float32 (model/lm.py casts logits for the cross-entropy), so
losses agree to float32 rounding of a sum over a few hundred tokens: 1e-6 relative.

All cases of one world size share one spawn (processes start once); each test asserts one case.
"""

from __future__ import annotations

import copy
import json
import os
import socket
from dataclasses import dataclass, field

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model.config import LMConfig, TTTConfig
from model.lm import TTTLM
from parallel.groups import ParallelDims, slice_sequence
from parallel.sequence_parallel import SequenceParallelLM, average_gradients
from train.compile import compile_blocks

EXACT = 1e-10
LOSS_TOLERANCE = 1e-6


@dataclass
class Case:
    name: str
    sp: int
    seq_len: int
    ttt: dict = field(default_factory=dict)
    window_size: int = 8
    batch_per_group: int = 2
    compiled: bool = False  # the split model's blocks through torch.compile, as train.compile does


MOMENTUM = dict(momentum=True)
RING = dict(mode="recurrent", fast_weights="all", weight_norm=True, momentum=True, muon=True, w02_rank=2)  # the released layer
CASES = {
    2: [
        Case("parallel_aligned", sp=2, seq_len=64, ttt=dict(chunk_size=16)),
        Case("parallel_momentum_aligned", sp=2, seq_len=64, ttt=dict(chunk_size=16, **MOMENTUM)),
        Case("parallel_momentum_straddling_chunk_low_rank", sp=2, seq_len=74, ttt=dict(chunk_size=16, w02_rank=2, **MOMENTUM)),
        Case("parallel_token_causal_ascent", sp=2, seq_len=74, ttt=dict(chunk_size=16, token_causal=True, update_sign=-1.0, **MOMENTUM)),
        Case("window_crossing_boundary", sp=2, seq_len=74, window_size=30, ttt=dict(chunk_size=16, **MOMENTUM)),
        Case("ring_recurrent", sp=2, seq_len=64, ttt=dict(chunk_size=16, **RING)),
        Case("ring_recurrent_straddling_chunk", sp=2, seq_len=74, ttt=dict(chunk_size=16, **RING)),
        Case("plain_data_parallel", sp=1, seq_len=64, ttt=dict(chunk_size=16, **MOMENTUM)),
        Case("compiled_parallel_token_causal", sp=2, seq_len=74, window_size=30, compiled=True,
             ttt=dict(chunk_size=16, token_causal=True, **MOMENTUM)),
    ],
    4: [
        Case("sp4_parallel", sp=4, seq_len=64, ttt=dict(chunk_size=16)),
        Case("sp4_parallel_momentum_straddling_chunk", sp=4, seq_len=80, ttt=dict(chunk_size=16, **MOMENTUM)),
        Case("dp2_sp2_parallel_momentum", sp=2, seq_len=74, ttt=dict(chunk_size=16, **MOMENTUM)),
        Case("sp4_ring_recurrent", sp=4, seq_len=80, ttt=dict(chunk_size=16, **RING)),
    ],
    8: [  # slices of 18 tokens: chunks of 16 straddle every boundary, the 11-row halo crosses each one
        Case("sp8_parallel_momentum_straddling_window", sp=8, seq_len=144, window_size=12, ttt=dict(chunk_size=16, **MOMENTUM)),
        Case("dp2_sp4_parallel_momentum_straddling_window", sp=4, seq_len=72, window_size=12, ttt=dict(chunk_size=16, **MOMENTUM)),
    ],
}


def tiny_model(case: Case) -> TTTLM:
    torch.manual_seed(0)
    cfg = LMConfig(
        vocab_size=64, hidden_size=32, num_layers=2, num_attn_heads=2, window_size=case.window_size,
        ttt=TTTConfig(num_heads=2, **case.ttt),
    )  # fmt: skip
    model = TTTLM(cfg).double()
    for block in model.blocks:  # learning rates and decays away from their flat init, so every path matters
        torch.nn.init.normal_(block.mixer.lr_proj.weight, std=0.3)
        if block.mixer.momentum_proj is not None:
            torch.nn.init.normal_(block.mixer.momentum_proj.weight, std=0.5)
    return model


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def run_case(case: Case, world: int) -> dict[str, float]:
    """Errors of the split run against the reference, as maxima over ranks."""
    dims = ParallelDims.build(case.sp)
    dp = world // case.sp
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 64, (dp * case.batch_per_group, case.seq_len + 1), generator=gen)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    reference = tiny_model(case)
    split = SequenceParallelLM(copy.deepcopy(tiny_model(case)), dims)
    if case.compiled:  # Dynamo over the sliced blocks, breaking its graphs at the exchanges (train.compile)
        compile_blocks(split.model, fullgraph=False, backend="eager")
    expected = reference(inputs, targets)
    expected.loss.backward()

    rows = slice(dims.dp_rank * case.batch_per_group, (dims.dp_rank + 1) * case.batch_per_group)
    local_inputs, local_targets = (slice_sequence(t[rows], dims) for t in (inputs, targets))
    actual = split(local_inputs, local_targets)
    actual.loss.backward()
    average_gradients(split, dims)

    group_loss = reference(inputs[rows], targets[rows], return_logits=False).loss.item()  # this dp group's mean
    errors = {
        "logits": relative(actual.logits, slice_sequence(expected.logits[rows], dims)),
        "loss": abs(actual.loss.item() - group_loss) / group_loss,
        "reported_loss": abs(actual.reported_loss.item() - group_loss) / group_loss,
        "gradients": max(
            relative(p.grad, q.grad) for p, q in zip(split.model.parameters(), reference.parameters())
        ),
        "states": 0.0,
    }
    if dims.sp_rank == case.sp - 1:  # the last slice leaves with the sequence's final states
        errors["states"] = max(
            relative(getattr(a, name)[: case.batch_per_group], getattr(e, name)[rows])
            for a, e in zip(actual.states, expected.states)
            for name in ("w0", "w1", "w2", "m0", "m1", "m2")
            if getattr(e, name) is not None
        )
    values = torch.tensor(list(errors.values()), dtype=torch.float64)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return dict(zip(errors, values.tolist()))


def worker(rank: int, world: int, port: int, result_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {case.name: run_case(case, world) for case in CASES[world]}
    if rank == 0:
        with open(result_path, "w") as handle:
            json.dump(results, handle)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict[str, float]]:
    merged = {}
    for world in CASES:
        path = tmp_path_factory.mktemp("sp") / f"world{world}.json"
        mp.spawn(worker, args=(world, free_port(), str(path)), nprocs=world)
        merged.update(json.loads(path.read_text()))
    return merged


ALL_CASES = [case.name for cases in CASES.values() for case in cases]


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL_CASES)
def test_split_run_matches_single_process(results, name):
    errors = results[name]
    assert errors["logits"] < EXACT, errors
    assert errors["gradients"] < EXACT, errors
    assert errors["states"] < EXACT, errors
    assert errors["loss"] < LOSS_TOLERANCE, errors
    assert errors["reported_loss"] < LOSS_TOLERANCE, errors
