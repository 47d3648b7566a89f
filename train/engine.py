"""The model and its DeepSpeed engine: ZeRO stage, precision, clipping, accumulation, schedule.

DeepSpeed averages gradients over all world = dp x sp ranks and shards optimizer state (ZeRO-1),
gradients (2) and parameters (3) over them. bf16 on CUDA (fp32 master weights in the optimizer),
fp32 on CPU. A step whose global gradient norm is non-finite is skipped by the ZeRO optimizer
(`engine.was_step_applied()` is then False), which the loop counts.
"""

from __future__ import annotations

from typing import Any, Optional

import deepspeed
import torch
from torch import nn

from model.config import ConfigError
from model.lm import TTTLM
from parallel.activation_checkpointing import checkpoint_blocks
from parallel.groups import ParallelDims
from parallel.sequence_parallel import SequenceParallelLM
from train.compile import blocks_are_one_graph, compile_blocks, compile_enabled
from train.config import RunConfig
from train.schedule import scheduler_factory

NEVER = 2**31 - 1


def use_bf16(cfg: RunConfig, device: torch.device) -> bool:
    precision = cfg.train.precision
    if precision == "bf16" and device.type != "cuda":
        raise ConfigError("train.precision='bf16' needs a CUDA device; use train.precision=auto or fp32 on CPU")
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def deepspeed_config(cfg: RunConfig, dims: ParallelDims, bf16: bool) -> dict[str, Any]:
    t, z = cfg.train, cfg.zero
    zero: dict[str, Any] = {
        "stage": z.stage,
        "overlap_comm": dims.world > 1 if z.overlap_comm is None else z.overlap_comm,
        "contiguous_gradients": True,
        "reduce_bucket_size": z.bucket_size,
    }
    if z.stage == 3:
        zero.update(stage3_prefetch_bucket_size=z.bucket_size, stage3_gather_16bit_weights_on_model_save=True)
    else:
        # ZeRO-1/2 make every parameter a view into one flat buffer per group; packed end to end, a
        # parameter after one of odd size (the 4- and 12-element learning-rate and momentum biases)
        # starts off a 16-byte boundary. A compiled block's Triton code assumes the alignment it saw
        # at compile time for parameters (Inductor never re-checks them at run time), and the one graph
        # all layers share was compiled on the first layer: a later layer's unaligned norm weight was a
        # misaligned vector load. Padding each parameter to 16 bytes costs a few bytes per parameter.
        zero.update(allgather_bucket_size=z.bucket_size, parameter_alignment=True)
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * dims.world,
        "gradient_clipping": t.grad_clip,
        "bf16": {"enabled": bf16, "check_grad_overflow": True},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": NEVER,
        "wall_clock_breakdown": False,
    }


def build_model(cfg: RunConfig, dims: ParallelDims) -> tuple[nn.Module, TTTLM]:
    """(what the engine wraps, the plain TTTLM inside it). Same seed on every rank: identical init."""
    torch.manual_seed(cfg.train.seed)
    model = TTTLM(cfg.model)
    if cfg.train.activation_checkpointing:
        checkpoint_blocks(model, selective=cfg.train.activation_checkpointing_policy == "selective")
    if compile_enabled(cfg.train.compile, dims.device, cfg.train.activation_checkpointing):
        compile_blocks(model, fullgraph=blocks_are_one_graph(cfg, dims.sp),
                       memory_budget=cfg.train.activation_memory_budget, options=cfg.train.compile_options)
    if dims.sp == 1:
        return model, model
    return SequenceParallelLM(model, dims), model


def optimizer_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (and the fast-weight initial tensors); leave norms and biases alone."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def build_engine(cfg: RunConfig, dims: ParallelDims) -> tuple[Any, TTTLM]:
    """(DeepSpeed engine, the TTTLM it trains)."""
    bf16 = use_bf16(cfg, dims.device)
    wrapped, lm = build_model(cfg, dims)
    t = cfg.train
    optimizer = torch.optim.AdamW(
        optimizer_param_groups(wrapped, t.weight_decay),
        lr=t.lr,
        betas=(t.beta1, t.beta2),
        eps=t.eps,
        fused=dims.device.type == "cuda",
    )
    engine, _, _, _ = deepspeed.initialize(
        model=wrapped,
        optimizer=optimizer,
        lr_scheduler=scheduler_factory(t),
        config=deepspeed_config(cfg, dims, bf16),
        dist_init_required=False,
    )
    if cfg.zero.stage == 3:
        # The output head reads embed/head weights outside those modules' own forward; ZeRO-3
        # must gather them for TTTLM.forward as well.
        deepspeed.zero.register_external_parameter(lm, lm.output_weight())
    else:
        check_parameter_alignment(wrapped)
        read_unpadded_checkpoints(engine.optimizer)
    return engine, lm


ALIGNMENT_BYTES = 16


def check_parameter_alignment(model: nn.Module) -> None:
    """Every parameter starts on a 16-byte boundary (see `deepspeed_config`): compiled blocks rely on it,
    and a misaligned one would fail far from its cause, inside a fused kernel."""
    misaligned = [name for name, p in model.named_parameters() if p.data_ptr() % ALIGNMENT_BYTES]
    if misaligned:
        raise RuntimeError(f"parameters not {ALIGNMENT_BYTES}-byte aligned after DeepSpeed set-up: {misaligned[:4]}")


def read_unpadded_checkpoints(optimizer: Any) -> None:
    """Let a ZeRO-1/2 optimizer resume from checkpoints written before its parameters were padded.

    DeepSpeed converts a checkpoint without a padding record into the padded layout, but refuses one
    whose record says "no padding" (all zeros), which is what runs saved before `deepspeed_config`
    asked for padding hold. Dropping an all-zero record sends those through the same conversion."""
    from deepspeed.checkpoint.constants import PARAM_ALIGNMENT_PADDINGS

    load = optimizer.load_state_dict

    def load_state_dict(state_dict_list: list[Optional[dict[str, Any]]], *args: Any, **kwargs: Any) -> Any:
        for rank_state in state_dict_list:
            paddings = None if rank_state is None else rank_state.get(PARAM_ALIGNMENT_PADDINGS)
            if paddings is not None and not any(any(group) for group in paddings):
                del rank_state[PARAM_ALIGNMENT_PADDINGS]
        return load(state_dict_list, *args, **kwargs)

    optimizer.load_state_dict = load_state_dict
