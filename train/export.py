"""A consolidated, framework-free model file for inference: `model.safetensors` + `model.yaml`.

`save_exported` writes the weights of one full (unsharded) model and its config; `load_model`
rebuilds a TTTLM from such a folder. Training checkpoints are sharded per rank; the training
code consolidates them into this format, which generation and evaluation read.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from model.config import LMConfig, load_model_config
from model.lm import TTTLM

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model.yaml"


def save_exported(model: TTTLM, folder: str | Path) -> Path:
    """Write the model's weights (tied weights once) and its config into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    OmegaConf.save(OmegaConf.structured(model.cfg), folder / CONFIG_FILE)
    return folder


def load_model(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> tuple[TTTLM, LMConfig]:
    """Rebuild the model saved by `save_exported`; a clear error names what is missing."""
    folder = Path(folder)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} not found: export a checkpoint first (python -m train.export)")
    cfg = load_model_config(str(folder / CONFIG_FILE))
    model = TTTLM(cfg)
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    return model.to(device=device, dtype=dtype).eval(), cfg
