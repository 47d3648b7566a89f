"""torch.compile per block, applied from outside the model (as torchtitan does).

Every `Block` is compiled on its own with `Module.compile`, so parameter names, state dicts and
checkpoints stay those of the plain model, and one compiled graph serves every layer (the blocks
share their code and shapes). The Triton kernels are torch.library ops (`tttla::chunk_scan`,
`tttla::swiglu_features` and their backwards), so a block is one graph, `fullgraph=True`, and
Inductor fuses the elementwise glue around the kernels (norms, SiLU, L2 norm, RoPE, learning-rate
heads, residuals).

Where a block cannot be one graph it is compiled with graph breaks (`fullgraph=False`): Dynamo
compiles the pieces between the breaks and runs the breaking calls eagerly.
* Sequence parallelism: the mixers' slice strategies exchange states and window halos with
  collectives (`parallel.sliced_mixer`), which Dynamo does not trace.
* Packed-document resets: the document bounds are read on the host (`DocumentSegments.bounds`).
* ZeRO-3: DeepSpeed gathers each module's parameters in forward hooks that call collectives.
* Activation checkpointing with the trainer's learning-rate probe (`train.monitor`): on logging
  steps the probe's forward hook stores the rates, a side effect a checkpointed region cannot hold,
  so those steps run the checkpointed blocks with a break; the other steps are one graph.

With activation checkpointing, `train.compile=auto` leaves the blocks eager on CUDA (see
`compile_enabled`); `train.compile=true` still compiles them. Activation checkpointing composes: it replaces `Block.forward` on the instance, and the compiled
call traces through it (Dynamo turns the non-reentrant checkpoint into a higher-order op, which
must be free of side effects on outside objects).
Decoding (`decoding.decode`) calls each block's own forward (`TTTLM.hidden_states(eager=True)`), not
`Block.__call__`, so it runs the same eager code whether or not the blocks are compiled.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch._functorch.config as functorch_config
import torch._inductor.config as inductor_config
from torch import nn

from model.baseline import BaselineBlock, BaselineLM
from model.lm import Block, TTTLM
from train.config import RunConfig, flat_compile_options


def compile_enabled(setting: str, device: torch.device, activation_checkpointing: bool = False) -> bool:
    """`train.compile`: auto compiles on CUDA only (on CPU the reference path gains little and
    Inductor's C++ build costs minutes), and not over checkpointed blocks: on an H100 with torch 2.11,
    Inductor failed to compile a checkpointed block that returns the fast-weight state ("Argument
    'neg' of Node 'output' does not belong to this Graph", tests/gpu/test_compile_gpu.py). true /
    false force it."""
    setting = setting.lower()
    return setting == "true" or (setting == "auto" and device.type == "cuda" and not activation_checkpointing)


def blocks_are_one_graph(cfg: RunConfig, sp: int) -> bool:
    """Whether a block traces as one graph in this run (see the module docstring for the exceptions)."""
    t = cfg.train
    return sp == 1 and not cfg.data.reset_at_doc_boundaries and cfg.zero.stage < 3 and not t.activation_checkpointing


def compile_blocks(model: nn.Module, *, fullgraph: bool = True, backend: str = "inductor", memory_budget: float = 1.0,
                   options: Optional[dict[str, Any]] = None) -> int:  # fmt: skip
    """Compile every block of `model` (a TTTLM's, or the baseline transformer's, so both are measured alike)
    in place, and the elementwise work of the chunked loss (`model.loss.chunk_terms`); returns how many
    blocks were compiled.

    `memory_budget` (`train.activation_memory_budget`) is the share of a block's activations the
    min-cut partitioner may keep for backward; below 1 it recomputes the cheapest (elementwise glue,
    norms) in the backward graph. It is torch's process-wide setting, read when a block first compiles;
    so are `options` (`train.compile_options`: Inductor options by name, e.g. cpp_wrapper).

    `backend` other than Inductor is for tests ("aot_eager" traces forward and backward like
    Inductor but runs the traced ops eagerly, so results are bit-identical to eager;
    "aot_eager_decomp_partition" also partitions as Inductor does, memory budget included)."""
    functorch_config.activation_memory_budget = memory_budget
    for name, value in flat_compile_options(options or {}).items():
        setattr(inductor_config, name, value)
    blocks = [module for module in model.modules() if isinstance(module, (Block, BaselineBlock))]
    for block in blocks:
        block.compile(fullgraph=fullgraph, backend=backend)
    for lm in (module for module in model.modules() if isinstance(module, (TTTLM, BaselineLM))):
        lm.loss_backend = backend
    return len(blocks)
