"""`train.activation_memory_budget`: the compiled blocks keep less for backward and compute the same.

The blocks compile with "aot_eager_decomp_partition": AOT autograd traces and partitions forward and
backward with the min-cut partitioner Inductor uses, budget included, and runs the partitioned graphs
eagerly, so what a block saves is what Inductor's graphs would save, and the gradients can be compared
with eager ones to fp32 rounding.
"""

from __future__ import annotations

import pytest
import torch
import torch._functorch.config as functorch_config

from benchmarks.saved_tensors import saved_for_backward
from parallel.activation_checkpointing import checkpoint_blocks
from tests.test_compile import assert_same, interpreted, make_block, run
from train.compile import compile_blocks
from train.config import ConfigError, load_run_config

BACKEND = "aot_eager_decomp_partition"


@pytest.fixture(autouse=True)
def restore_budget():
    """The budget is torch's process-wide setting: each test leaves it as it found it."""
    before = functorch_config.activation_memory_budget
    torch._dynamo.reset()
    yield
    functorch_config.activation_memory_budget = before
    torch._dynamo.reset()


def saved_mib(budget: float, x: torch.Tensor) -> float:
    block = make_block()
    compile_blocks(block, backend=BACKEND, memory_budget=budget)
    return sum(t.mib for t in saved_for_backward(block, x.clone().requires_grad_(), lambda b, y: b(y, None, 0)[0]))


def test_a_lower_budget_keeps_less():
    x = torch.randn(2, 256, 64)
    full = saved_mib(1.0, x)
    torch._dynamo.reset()
    assert saved_mib(0.5, x) < 0.8 * full


@pytest.mark.parametrize("budget", [0.7, 0.3])
def test_recomputed_activations_give_the_eager_gradients(budget):
    x = torch.randn(2, 40, 64)
    expected = run(make_block(), x)
    block = make_block()
    compile_blocks(block, backend=BACKEND, memory_budget=budget)
    assert functorch_config.activation_memory_budget == budget
    assert_same(expected, run(block, x))


@pytest.mark.parametrize("budget", [0.0, 1.5, -1.0])
def test_a_budget_outside_zero_to_one_is_a_config_error(budget):
    with pytest.raises(ConfigError, match="train.activation_memory_budget"):
        load_run_config("configs/train/tiny_cpu.yaml", [f"train.activation_memory_budget={budget}"])


def inputs_block(recompute_inputs: bool) -> torch.nn.Module:
    """The compile tests' block with `ttt.recompute_inputs` set (the same weights either way)."""
    block = make_block()
    block.mixer.cfg.ttt.recompute_inputs = recompute_inputs
    return block


@interpreted
def test_recomputed_branch_inputs_are_not_kept(monkeypatch):
    """`ttt.recompute_inputs` on the kernel path (the GPU's): the compiled block no longer keeps the
    branch's q, k, v, three [B, T, D] tensors, so what it keeps falls by at least 2.5 of them (the
    partitioner may shift a few small tensors)."""
    monkeypatch.setenv("TTTLA_KERNELS", "triton")
    x = torch.randn(2, 256, 64)
    saved = {}
    for recompute in (False, True):
        torch._dynamo.reset()
        block = inputs_block(recompute)
        compile_blocks(block, backend=BACKEND)
        saved[recompute] = sum(t.mib for t in saved_for_backward(block, x.clone().requires_grad_(),
                                                                 lambda b, y: b(y, None, 0)[0]))
    branch_tensor_mib = x.numel() * 4 / 2**20
    assert saved[True] <= saved[False] - 2.5 * branch_tensor_mib, saved


@pytest.mark.parametrize("kernels", ["reference", pytest.param("triton", marks=interpreted)])
def test_recomputed_branch_inputs_give_the_eager_gradients(kernels, monkeypatch):
    monkeypatch.setenv("TTTLA_KERNELS", kernels)
    x = torch.randn(2, 40, 64)
    expected = run(make_block(), x)
    block = inputs_block(True)
    compile_blocks(block, backend=BACKEND)
    assert_same(expected, run(block, x))


@pytest.mark.parametrize("selective", [False, True], ids=["full", "selective"])
def test_recomputed_branch_inputs_inside_a_checkpointed_block(selective):
    """With activation checkpointing too (`train.compile=true` with `train.activation_checkpointing=true`),
    the region nests inside the block's checkpoint and the compiled block still gives the eager gradients."""
    x = torch.randn(2, 40, 64)
    expected = run(make_block(), x)
    holder = torch.nn.Module()
    holder.blocks = torch.nn.ModuleList([inputs_block(True)])
    checkpoint_blocks(holder, selective=selective)
    compile_blocks(holder.blocks[0], backend=BACKEND, fullgraph=True)
    assert_same(expected, run(holder.blocks[0], x))
