"""`python -m model.summary configs/model/125m.yaml [key=value ...]`: parameter counts of a model config.

Builds the model on the meta device, so even the 1.3B config is counted instantly without memory.
"""

from __future__ import annotations

import sys

import torch
from omegaconf import OmegaConf

from model.config import LMConfig
from model.lm import TTTLM, count_parameters


def load_model_config(path: str, overrides: list[str] | None = None) -> LMConfig:
    """A model YAML merged onto the LMConfig schema; unknown keys and wrong types fail naming the key."""
    schema = OmegaConf.structured(LMConfig)
    merged = OmegaConf.merge(schema, OmegaConf.load(path), OmegaConf.from_dotlist(overrides or []))
    cfg: LMConfig = OmegaConf.to_object(merged)
    return cfg.validate()


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit("usage: python -m model.summary CONFIG.yaml [key=value ...]")
    cfg = load_model_config(argv[0], argv[1:])
    with torch.device("meta"):
        model = TTTLM(cfg)
    total = count_parameters(model)
    print(f"{argv[0]}: {total / 1e6:.1f}M parameters ({count_parameters(model, include_embeddings=False) / 1e6:.1f}M without embeddings)")


if __name__ == "__main__":
    main(sys.argv[1:])
