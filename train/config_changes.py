"""What a resumed run changes relative to its checkpoint: listed, and refused where the model's shape changes.

A resumed run may change the schedule, the batch or the logging, and says which settings differ
from the checkpoint's `run.yaml`. Weights of another shape cannot be loaded, so a change of the
model's parameter shapes is refused before anything is built. The shapes are compared by building
both models on the meta device (no memory, no arithmetic), so no list of shape-bearing keys has to
be kept in step with the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from model.config import ConfigError, LMConfig
from model.lm import TTTLM
from train.checkpoint import RUN_CONFIG
from train.config import RunConfig
from train.job.cli import warn

ALWAYS_DIFFERENT = {"train.resume"}  # how the run was started, not what it trains


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> {"a.b.c": leaf}."""
    if not isinstance(node, dict):
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every setting that differs (absent keys shown as such)."""
    before, after = flatten(old), flatten(new)
    missing = "(absent)"
    return [
        f"{key}: {before.get(key, missing)} -> {after.get(key, missing)}"
        for key in sorted(before.keys() | after.keys())
        if key not in ALWAYS_DIFFERENT and before.get(key, missing) != after.get(key, missing)
    ]


def parameter_shapes(model_cfg: LMConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = TTTLM(model_cfg)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def shape_changes(old: LMConfig, new: LMConfig) -> list[str]:
    """`parameter: old shape -> new shape` for every parameter that differs (added or removed too)."""
    before, after = parameter_shapes(old), parameter_shapes(new)
    return [
        f"{name}: {list(before[name]) if name in before else '(absent)'} -> {list(after[name]) if name in after else '(absent)'}"
        for name in sorted(before.keys() | after.keys())
        if before.get(name) != after.get(name)
    ]


def check_config_changes(cfg: RunConfig, checkpoint: Path) -> None:
    """Warn with the settings this run changes; raise ConfigError if the model's shape changes."""
    written = OmegaConf.to_container(OmegaConf.load(checkpoint / RUN_CONFIG))
    differences = config_differences(written, OmegaConf.to_container(OmegaConf.structured(cfg)))
    written_model: LMConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(LMConfig), written["model"]))
    reshaped = shape_changes(written_model.validate(), cfg.model)
    if reshaped:
        model_keys = [d for d in differences if d.startswith("model.")]
        raise ConfigError(
            f"train.resume: {checkpoint} holds a model of another shape ({'; '.join(model_keys)} changes "
            f"{len(reshaped)} parameter(s), e.g. {reshaped[0]}); keep the model settings of {checkpoint / RUN_CONFIG}, "
            f"or start a new run with another logging.run_dir"
        )
    if differences:
        warn(f"train.resume: this run changes {len(differences)} setting(s) of {checkpoint / RUN_CONFIG}: {'; '.join(differences)}")
