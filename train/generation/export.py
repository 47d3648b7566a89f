"""A consolidated, framework-free model file for inference: `model.safetensors` + `model.yaml`.

`save_exported` writes the weights of one full (unsharded) model and its config; `load_model`
rebuilds a TTTLM from such a folder. Training checkpoints are sharded per rank (ZeRO 1/2/3);
`python -m train.generation.export CHECKPOINT_DIR OUT_DIR` consolidates one into this format, which
generation and evaluation read. CHECKPOINT_DIR is a `step_N` folder or a checkpoints root (its
newest complete checkpoint); the model config comes from the checkpoint's run.yaml.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from model.config import LMConfig, load_model_config
from model.lm import TTTLM
from train.checkpoint import MARKER, RUN_CONFIG, complete_checkpoints
from train.checkpoint_integrity import verify
from train.cli import DEBUG_HELP, run_command

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model.yaml"
DEFAULT_FILE_MODE = 0o666  # what open() would create, before the umask


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_exported(model: TTTLM, folder: str | Path) -> Path:
    """Write the model's weights (tied weights once) and its config into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    os.chmod(folder / WEIGHTS_FILE, DEFAULT_FILE_MODE & ~current_umask())  # safetensors creates it 0600
    OmegaConf.save(OmegaConf.structured(model.cfg), folder / CONFIG_FILE)
    return folder


def load_model(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> tuple[TTTLM, LMConfig]:
    """Rebuild the model saved by `save_exported`; a clear error names what is missing."""
    folder = Path(folder)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                errno.ENOENT, "no exported model here: export a checkpoint first (python -m train.generation.export CHECKPOINT OUT)", str(folder / name)
            )
    cfg = load_model_config(str(folder / CONFIG_FILE))
    model = TTTLM(cfg)
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    return model.to(device=device, dtype=dtype).eval(), cfg


def consolidated_state_dict(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a sharded training checkpoint folder (`.../checkpoints/step_N`), any ZeRO
    stage, as one state dict with the keys of the module the engine wrapped."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # heavy; export only

    checkpoint = Path(checkpoint)
    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)


def strip_wrapper_prefix(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Keys of a wrapped model (`<wrapper>.embed.weight`) renamed to the plain TTTLM's."""
    renamed = {}
    for key, tensor in state.items():
        parts = key.split(".")
        matches = [".".join(parts[i:]) for i in range(len(parts)) if ".".join(parts[i:]) in expected]
        if not matches:
            raise ValueError(f"checkpoint tensor {key!r} matches no parameter of the model in its run.yaml")
        renamed[matches[0]] = tensor
    missing = expected - renamed.keys()
    if missing:
        raise ValueError(f"checkpoint lacks model tensors {sorted(missing)}")
    return renamed


def resolve_checkpoint(path: str | Path) -> Path:
    """A `step_N` folder, or a checkpoints root (its newest complete checkpoint)."""
    path = Path(path)
    if (path / MARKER).is_file():
        return path
    found = complete_checkpoints(path)
    if not found:
        raise FileNotFoundError(errno.ENOENT, f"neither a complete checkpoint (no {MARKER}) nor a folder holding one", str(path))
    return found[-1]


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Consolidate a sharded checkpoint (ZeRO 1/2/3) into `out` as model.safetensors + model.yaml."""
    folder = resolve_checkpoint(checkpoint)
    reason = verify(folder, rank=0, world=1)
    if reason:
        raise ValueError(f"{folder} is damaged: {reason}; export an older step_* folder")
    model_cfg = OmegaConf.merge(OmegaConf.structured(LMConfig), OmegaConf.load(folder / RUN_CONFIG).model)
    cfg: LMConfig = OmegaConf.to_object(model_cfg)
    model = TTTLM(cfg.validate())
    state = strip_wrapper_prefix(consolidated_state_dict(folder), set(model.state_dict()))
    model.load_state_dict(state)
    return save_exported(model, out)


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[0] in ("-h", "--help"):
        raise SystemExit(f"usage: python -m train.generation.export CHECKPOINT_DIR OUT_DIR  (a step_N folder or a checkpoints root); {DEBUG_HELP}")
    folder = export_checkpoint(argv[0], argv[1])
    print(f"exported {resolve_checkpoint(argv[0])} -> {folder / WEIGHTS_FILE}")


if __name__ == "__main__":
    run_command("train.generation.export", main, sys.argv[1:])
